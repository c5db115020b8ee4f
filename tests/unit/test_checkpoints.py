"""Checkpoint pruning: newest K kept while a job runs, all removed once it succeeded, failed/dead jobs'
after the retention period; ledger rows stay, marked ``pruned_at``."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from domain import checkpoints
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint, Job, utcnow
from domain.paths import data_root


def make_job(job_id: str, status: str, finished_days_ago: float | None = None, steps=(5, 10, 15)) -> None:
    now = utcnow()
    finished = now - timedelta(days=finished_days_ago) if finished_days_ago is not None else None
    with session_scope() as s:
        s.add(Job(id=job_id, kind="retrain", tenant_id="acme", payload={}, status=status, finished_at=finished))
        s.flush()
        for step in steps:
            rel = f"checkpoints/retrain/{job_id}/step-{step:07d}"
            folder = data_root() / rel
            folder.mkdir(parents=True)
            (folder / "state.pt").write_bytes(b"x" * 100)
            s.add(Checkpoint(job_id=job_id, kind="retrain", step=step, path=rel, sha256="0" * 64, size_bytes=100))


def state(job_id: str) -> list[tuple[int, bool, bool]]:
    """(step, row pruned, folder still on disk) per checkpoint row."""
    with session_scope() as s:
        rows = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
        return [(c.step, c.pruned_at is not None, (data_root() / c.path).exists()) for c in rows]


def test_prune_job_keeps_the_newest_checkpoints(ledger):
    make_job("j1", "running")
    report = checkpoints.prune_job("j1", keep=2)
    assert state("j1") == [(5, True, False), (10, False, True), (15, False, True)]
    assert report.checkpoints == 1 and report.bytes_freed == 100 and report.jobs == ["j1"]
    checkpoints.prune_job("j1", keep=0)
    assert state("j1") == [(5, True, False), (10, True, False), (15, True, False)]
    assert not (data_root() / "checkpoints/retrain/j1").exists()  # the emptied job folder goes too


def test_sweep_prunes_succeeded_jobs_and_old_failures_only(ledger):
    make_job("done", "succeeded", 0)
    make_job("failed-recent", "failed", 1)
    make_job("dead-old", "dead", 30)
    make_job("running", "running")
    make_job("queued", "queued")

    preview = checkpoints.prune_finished(retention_days=7, dry_run=True)
    assert preview.as_dict() == {"jobs": 2, "checkpoints": 6, "bytes_freed": 600}
    assert all(not pruned and exists for _, pruned, exists in state("done"))  # a dry run removes nothing

    report = checkpoints.prune_finished(retention_days=7)
    assert sorted(report.jobs) == ["dead-old", "done"] and report.checkpoints == 6 and report.bytes_freed == 600
    for job_id in ("done", "dead-old"):
        assert all(pruned and not exists for _, pruned, exists in state(job_id))
    for job_id in ("failed-recent", "running", "queued"):
        assert all(not pruned and exists for _, pruned, exists in state(job_id))
    assert checkpoints.prune_finished(retention_days=7).checkpoints == 0  # nothing left to do the second time
    assert checkpoints.prune_finished(retention_days=0.5).jobs == ["failed-recent"]


def test_a_path_outside_the_data_root_is_never_removed(ledger, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "precious"
    outside.mkdir()
    with session_scope() as s:
        s.add(Job(id="evil", kind="retrain", tenant_id="acme", payload={}, status="succeeded", finished_at=utcnow()))
        s.flush()
        s.add(Checkpoint(job_id="evil", kind="retrain", step=1, path=f"../../{outside.parent.name}/precious",
                         sha256="0" * 64))
        s.add(Checkpoint(job_id="evil", kind="retrain", step=2, path=str(outside), sha256="0" * 64))
    checkpoints.prune_finished()
    assert outside.is_dir()
    assert [pruned for _, pruned, _ in state("evil")] == [True, True]  # marked, so the sweep does not retry forever


def test_after_success_only_touches_checkpointing_kinds(ledger):
    make_job("r1", "succeeded", 0)
    checkpoints.after_success("review", "r1")
    assert all(not pruned for _, pruned, _ in state("r1"))
    checkpoints.after_success("retrain", "r1")
    assert all(pruned and not exists for _, pruned, exists in state("r1"))


def test_cli_prune_checkpoints_dry_run_then_for_real(ledger, capsys):
    import json

    from worker.cli import main

    make_job("done", "succeeded", 0)
    make_job("failed-recent", "failed", 1)
    assert main(["ledger", "prune-checkpoints", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"jobs": 1, "checkpoints": 3, "bytes_freed": 300, "dry_run": True}
    assert main(["ledger", "prune-checkpoints", "--retention-days", "0.5"]) == 0
    assert "removed 6 checkpoints of 2 jobs" in capsys.readouterr().out
    assert all(pruned and not exists for job in ("done", "failed-recent") for _, pruned, exists in state(job))


def test_beats_schedule_tick_sweeps_finished_jobs(ledger):
    from domain.adapters import schedule

    make_job("done", "succeeded", 0)
    assert schedule.tick(utcnow(), lambda *a, **k: "x", "beat-a") == []  # no schedules: nothing enqueued
    assert all(pruned and not exists for _, pruned, exists in state("done"))
