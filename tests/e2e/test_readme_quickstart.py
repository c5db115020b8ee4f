"""The README's "Enqueue jobs" quick start, run as written on a fresh folder: its shell lines (prepare the
model, create the ledger, add the tenant, start a worker), its Python snippet, then its command line.
Only the model differs: a tiny random one (FOUNDRY_BASE_MODEL) with SmolLM2's 8k context window (the
snippet uses the default max_new_tokens), so the test takes seconds, not minutes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]


def quickstart_blocks() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Enqueue jobs", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def long_context_tiny_model(tmp_path_factory):
    from tests.fixtures.tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-8k")
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 8192
    tiny_model(tokenizer, max_positions=8192).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_readme_quick_start_works_as_written(tmp_path, long_context_tiny_model):
    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks] == ["sh", "python", "sh"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_")}
    env.update(FOUNDRY_BASE_MODEL=str(long_context_tiny_model), PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    setup = subprocess.Popen(["bash", "-e", "-c", blocks[0][1]], cwd=tmp_path, env=env, start_new_session=True,
                             stdout=open(tmp_path / "setup.log", "w"), stderr=subprocess.STDOUT)
    try:
        assert setup.wait(timeout=300) == 0, (tmp_path / "setup.log").read_text()[-3000:]
        python = subprocess.run([sys.executable, "-c", blocks[1][1]], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert python.returncode == 0, python.stderr[-3000:] + (tmp_path / "setup.log").read_text()[-3000:]
        cli = subprocess.run(["bash", "-e", "-c", blocks[2][1]], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    finally:
        os.killpg(setup.pid, signal.SIGTERM)  # the worker the snippet left running in the background
    engine = create_engine(f"sqlite:///{tmp_path / '.foundry' / 'ledger.db'}")
    with engine.connect() as conn:
        jobs = conn.execute(text("SELECT kind, tenant_id, status FROM jobs")).all()
        verdicts = conn.execute(text("SELECT verdict FROM feedback")).scalars().all()
    engine.dispose()
    assert [tuple(j) for j in jobs] == [("review", "acme", "succeeded")] * 2
    assert verdicts == ["accept"]
