"""Shared pieces of the fault-injection suite (no tests here): the summary table, exactly-once tallies,
and throwaway Redis / PostgreSQL servers that a test may stop and start without disturbing anyone.

Every fault test calls ``record(...)``; the table is printed once at the end of the session:
faults injected, jobs expected, jobs finished once, lost, duplicated.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from domain.ledger.db import session_scope
from domain.ledger.models import FINAL_STATUSES, Job, JobAttempt, UsageCost

ROWS: list[tuple] = []
_printed = {"done": False}


@dataclass
class Tally:
    expected: int
    finished_once: int
    lost: int
    duplicated: int
    statuses: dict


def tally(job_ids: list[str], want: str = "succeeded", url: str | None = None) -> Tally:
    """Per job: finished once (final status ``want`` with exactly one attempt of that outcome), lost (not
    final, or missing), duplicated (more than one attempt with that outcome, or more than one usage row)."""
    once = lost = dup = 0
    statuses: dict = {}
    with session_scope(url) as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))}
        outcomes: dict = {}
        for a in s.scalars(select(JobAttempt).where(JobAttempt.job_id.in_(job_ids))):
            outcomes.setdefault(a.job_id, []).append(a.outcome)
        usage = dict(s.execute(select(UsageCost.job_id, func.count()).where(UsageCost.job_id.in_(job_ids))
                               .group_by(UsageCost.job_id)).all())
    for jid in job_ids:
        j = jobs.get(jid)
        status = j.status if j else "missing"
        statuses[status] = statuses.get(status, 0) + 1
        n = outcomes.get(jid, []).count(want)
        if j is None or j.status not in FINAL_STATUSES:
            lost += 1
        elif n > 1 or usage.get(jid, 0) > 1:
            dup += 1
        elif j.status == want and n == 1:
            once += 1
    return Tally(len(job_ids), once, lost, dup, statuses)


def record(fault: str, t: Tally, note: str = "") -> None:
    ROWS.append((fault, t.expected, t.finished_once, t.lost, t.duplicated, note))


@pytest.fixture(scope="session", autouse=True)
def fault_summary(request):
    yield ROWS
    if _printed["done"] or not ROWS:
        return
    _printed["done"] = True
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["", "fault-injection summary",
             f"{'fault injected':44} {'expected':>8} {'once':>6} {'lost':>5} {'dup':>5}  note"]
    for fault, exp, once, lost, dup, note in ROWS:
        lines.append(f"{fault[:44]:44} {exp:>8} {once:>6} {lost:>5} {dup:>5}  {note}")
    for line in lines:
        (tr.write_line(line) if tr else print(line))


def wait_final(job_ids: list[str], timeout: float, url: str | None = None, sweep=None, sweep_every_s: float = 10.0) -> dict:
    """Wait until every job is final; returns status counts (raises with the stragglers on timeout).
    ``sweep`` (optional) runs every ``sweep_every_s`` meanwhile, as beat's periodic tasks would."""
    deadline = time.monotonic() + timeout
    next_sweep = time.monotonic() + sweep_every_s
    while True:
        if sweep is not None and time.monotonic() >= next_sweep:
            sweep()
            next_sweep = time.monotonic() + sweep_every_s
        with session_scope(url) as s:
            rows = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())
        pending = [j for j in job_ids if rows.get(j) not in FINAL_STATUSES]
        if not pending:
            counts: dict = {}
            for st in rows.values():
                counts[st] = counts.get(st, 0) + 1
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} jobs not final after {timeout}s, e.g. "
                                 f"{[(j, rows.get(j)) for j in pending[:5]]}")
        time.sleep(0.2)


def lost_sweep(handed_back: list[str], resent: list[str]):
    """What beat's ``foundry.resend_stranded`` runs, for ``wait_final`` to call every few seconds: running jobs
    of dead workers handed back, queued jobs whose message no live worker holds sent again."""
    from worker import maintenance

    def sweep() -> None:
        resent.extend(maintenance.resend_stranded(older_than_s=20, source="test")["resent"])
        handed_back.extend(maintenance.hand_back_lost_running(source="test")["handed_back"])

    return sweep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class ThrowawayRedis:
    """A loopback redis-server with an append-only file in a temp dir: stop and start it at will."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="foundry-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--dir", str(self.dir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        """A clean shutdown (the AOF is flushed), like `docker compose restart redis`."""
        if self.proc and self.proc.poll() is None:
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True, timeout=10)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: cannot start a throwaway PostgreSQL")
    return found


class ThrowawayPostgres:
    """A separate PostgreSQL cluster (initdb + pg_ctl) on its own port in a temp dir, run as the
    ``postgres`` user when we are root. Never touches the machine's shared cluster."""

    def __init__(self):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="foundry-pg-"))
        self.data = self.dir / "data"
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            os.chmod(self.dir, 0o777)

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        if self.user:
            argv = ["su", self.user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
        subprocess.run(argv, check=True, capture_output=True, timeout=timeout)

    def init(self) -> None:
        self._run([_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"], timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} -c fsync=off"
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def stop(self) -> None:
        try:
            self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass

    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
