"""Packaging: the client and the operator commands import no ML code; the version bounds that pyproject.toml
declares are the ones checked at start-up, and a worker refuses to start on an unsupported version."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from domain import versions

ROOT = Path(__file__).resolve().parents[2]
ML_MODULES = ("torch", "transformers", "faiss", "sentence_transformers", "bitsandbytes", "peft", "accelerate")

# Runs the client API and the client CLI commands on an embedded ledger and broker, then names every ML
# module that ended up in sys.modules.
CLIENT_SESSION = textwrap.dedent("""
    import sys
    from worker.cli import main
    from worker.client import enqueue, job_status, wait  # noqa: F401
    from worker.client import feedback  # noqa: F401
    assert main(["db", "upgrade"]) == 0
    assert main(["tenants", "add", "acme"]) == 0
    job_id = enqueue("noop", {"tenant": "acme"})
    assert job_status(job_id)["status"] == "queued"
    for argv in (["enqueue", "noop", "--tenant", "acme"], ["jobs"], ["job", job_id], ["schema", "review"],
                 ["audit", "jobs"], ["audit", "failures"], ["audit", "costs"], ["tenants", "list"]):
        assert main(argv) == 0, argv
    assert main(["feedback", "no-such-review", "--accept"]) != 0
    print("ML:" + ",".join(sorted(m for m in %r if m in sys.modules)))
""" % (ML_MODULES,))


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_")}
    env.update(PYTHONPATH=str(ROOT), FOUNDRY_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


def test_client_and_cli_commands_import_no_ml_code(tmp_path):
    out = subprocess.run([sys.executable, "-c", CLIENT_SESSION], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ML:", out.stdout[-2000:]


def _declared_bounds() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs if not r.startswith("foundry")}


def test_checked_bounds_are_the_declared_ones():
    declared = _declared_bounds()
    for name, (low, high, _) in versions.SUPPORTED.items():
        spec = {(s.operator, s.version) for s in declared[name].specifier}
        assert spec == {(">=", low), ("<", high)}, f"{name}: pyproject says {declared[name]}, versions.py {low}..{high}"


def test_ml_stack_is_an_extra_not_a_base_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    worker = {Requirement(r).name.lower() for r in project["optional-dependencies"]["worker"]}
    ml = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "sentence-transformers", "faiss-cpu",
          "numpy", "tokenizers", "safetensors"}
    assert not base & ml
    assert ml <= worker


def test_installed_stack_is_supported():
    assert versions.problems() == []


def test_worker_start_up_names_an_unsupported_version(tmp_path):
    fake = tmp_path / "site"
    info = fake / "transformers-5.40.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.40.0\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = f"{fake}{os.pathsep}{ROOT}"  # found first by importlib.metadata, as a drifted install would be
    out = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--flavour", "cpu"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    message = " ".join((out.stdout + out.stderr).split())
    assert "transformers 5.40.0 is not supported" in message
    assert "transformers>=5.0,<5.40" in message


def test_release_parsing_ignores_local_and_pre_release_tails():
    assert versions._release("2.13.0+cpu") == (2, 13, 0)
    assert versions._release("5.40.0.dev0") == (5, 40, 0)
    assert versions._release("5.4") < versions._release("5.40")
