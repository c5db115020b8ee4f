"""Real Celery worker processes for integration tests.

    env = worker_env(redis_url, pg_ledger, tmp_path)
    with running_worker(env, queues=["control"]) as w:
        ...
        w.kill()            # SIGKILL, like an OOM kill
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_env(broker_url: str, database_url: str, data_dir, **extra) -> dict:
    """Environment for a worker (and for the test process's client: apply it with monkeypatch too)."""
    env = {
        "FOUNDRY_BROKER_URL": broker_url,
        "FOUNDRY_RESULT_BACKEND": broker_url,
        "FOUNDRY_DATABASE_URL": database_url,
        "FOUNDRY_DATA_DIR": str(data_dir),
        "FOUNDRY_ALLOW_FAULT_INJECTION": "1",
        "FOUNDRY_HEARTBEAT_S": "1",
        "FOUNDRY_STALE_AFTER_S": "5",
        "FOUNDRY_VISIBILITY_TIMEOUT_S": "4",
        "FOUNDRY_RESTORE_INTERVAL_S": "1",
        "FOUNDRY_RETRY_BACKOFF_S": "0.2",
        "FOUNDRY_RETRY_BACKOFF_MAX_S": "1",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def apply_env(monkeypatch, env: dict) -> None:
    from domain.config import reset_settings
    from domain.ledger import db
    from tests.conftest import forget_tenants

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    db.dispose_all()
    forget_tenants()


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, name: str):
        self.proc, self.log, self.name = proc, log, name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole worker (process group): no cleanup, no ack, like an OOM kill."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass


_STARTED: list["WorkerProcess"] = []


@atexit.register
def _kill_leftovers() -> None:
    """No test leaves a worker behind, even when it fails before stopping its own."""
    for w in _STARTED:
        if w.alive():
            w.kill()


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the test process dies, so a killed pytest leaves no worker behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_worker(env: dict, queues=("control",), pool: str = "solo", concurrency: int = 1, name: str | None = None,
                 log_dir: Path | None = None, ready_timeout: float = 90, loglevel: str = "INFO") -> WorkerProcess:
    name = name or f"test-{uuid.uuid4().hex[:6]}@%h"
    log_dir = Path(log_dir or env.get("FOUNDRY_DATA_DIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", ",".join(queues),
           "-P", pool, "-c", str(concurrency), "-n", name, "--without-gossip", "--without-mingle",
           "--without-heartbeat", "-l", loglevel]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        # PR_SET_PDEATHSIG follows the spawning *thread*: only the main thread's exit should take the worker down.
        on_main = threading.current_thread() is threading.main_thread()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent if on_main else None)
    w = WorkerProcess(proc, log, name)
    _STARTED.append(w)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if " ready." in w.output() or (loglevel != "INFO" and _pinged(env, name)):
            return w
        if not w.alive():
            raise RuntimeError(f"worker exited during start:\n{w.output()[-4000:]}")
        time.sleep(0.2)
    w.kill()
    raise RuntimeError(f"worker not ready after {ready_timeout}s:\n{w.output()[-4000:]}")


def _pinged(env: dict, name: str) -> bool:
    """Ask the worker over the broker whether it is up (when its log level hides the 'ready.' line)."""
    from domain.config import Settings
    from worker.celery_app import make_celery

    app = make_celery(Settings(broker_url=env["FOUNDRY_BROKER_URL"], result_backend=env.get("FOUNDRY_RESULT_BACKEND", ""),
                               data_dir=env.get("FOUNDRY_DATA_DIR", ".foundry")))
    node = name.replace("%h", __import__("socket").gethostname())
    try:
        return bool(app.control.ping(destination=[node], timeout=0.5))
    finally:
        app.close()


@contextmanager
def running_worker(env: dict, queues=("control",), pool: str = "solo", concurrency: int = 1, name: str | None = None,
                   log_dir: Path | None = None):
    w = start_worker(env, queues, pool, concurrency, name, log_dir)
    try:
        yield w
    finally:
        w.stop()
        if os.environ.get("FOUNDRY_TEST_SHOW_WORKER_LOG"):
            print(w.output()[-6000:])


@contextmanager
def running_beat(env: dict, log_dir: Path, name: str = "beat"):
    """A real `celery beat` process (its schedule file under log_dir); stopped at the end."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "-l", "INFO",
                                 "-s", str(log_dir / f"{name}-schedule")], cwd=ROOT,
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def wait_for_value(what: str, fn, timeout: float, *workers):
    """``fn()``'s first truthy value within ``timeout`` s; else an AssertionError with the workers' output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout}s:\n" + "\n----\n".join(w.output()[-4000:] for w in workers))
