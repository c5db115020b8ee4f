"""Install Foundry as a user would: build the wheel, install it without the worker extra in a fresh virtual
environment, migrate a SQLite ledger with it, and enqueue a job that a worker of the full install runs.

The base dependencies come from a wheelhouse kept in the temporary folder (filled from the package index the
first time, about 10 s), so later runs install offline; the whole test took 45-48 s here (load average 5).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration.workers import running_worker, worker_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "alembic.ini", "domain", "worker", "migrations")
ML_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "faiss", "sentence_transformers", "accelerate")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def build_wheel(dest: Path) -> Path:
    """The wheel of a clean copy of the sources (the build leaves nothing in the work tree)."""
    src = dest / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)])
    (wheel,) = dest.glob("foundry-*.whl")
    return wheel


def base_wheelhouse(pip: Path) -> Path:
    """Wheels of the base dependencies, downloaded once per dependency list and Python version."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256("\n".join([sys.version, *deps]).encode()).hexdigest()[:12]
    house = Path(tempfile.gettempdir()) / f"foundry-wheelhouse-{key}"
    if not (house / ".complete").exists():
        partial = Path(tempfile.mkdtemp(prefix="foundry-wheelhouse-"))
        _run([str(pip), "download", "-q", "-d", str(partial), *deps], env=user_env({}))
        (partial / ".complete").touch()
        shutil.rmtree(house, ignore_errors=True)
        partial.rename(house)
    return house


def user_env(extra: dict) -> dict:
    """The user's shell: nothing of this checkout or of the test's own environment on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("FOUNDRY_")}
    return {**env, **extra}


def test_base_install_migrates_and_enqueues_for_a_full_worker(tmp_path, redis_url):
    wheel = build_wheel(tmp_path / "dist")
    home = tmp_path / "venv"
    venv.create(home, with_pip=True)
    py, pip, foundry = home / "bin" / "python", home / "bin" / "pip", home / "bin" / "foundry"
    _run([str(pip), "install", "-q", "--no-index", "--find-links", str(base_wheelhouse(pip)), str(wheel)],
         env=user_env({}))

    for module in ML_MODULES:
        out = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True, cwd=tmp_path,
                             env=user_env({}))
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, f"{module} is importable in the base install"

    ledger = tmp_path / "ledger.db"
    env = worker_env(redis_url, f"sqlite:///{ledger}", tmp_path / "data")
    run_env = user_env(env)
    version = _run([str(foundry), "--version"], cwd=tmp_path, env=run_env).stdout
    assert version.strip() == "foundry " + tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    _run([str(foundry), "db", "upgrade"], cwd=tmp_path, env=run_env)
    engine = create_engine(f"sqlite:///{ledger}")
    with engine.connect() as conn:
        tables = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).scalars())
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert {"jobs", "tenants", "adapter_versions", "usage_costs"} <= tables
    heads = sorted(p.name.split("_")[0] for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    assert head.startswith(heads[-1])
    _run([str(foundry), "tenants", "add", "acme"], cwd=tmp_path, env=run_env)

    with running_worker(env, queues=["control"]):  # the full install (this test's Python) runs the job
        _run([str(foundry), "enqueue", "noop", "--tenant", "acme", "--wait", "--timeout", "60"], cwd=tmp_path,
             env=run_env)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT kind, tenant_id, status FROM jobs")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("noop", "acme", "succeeded")]
