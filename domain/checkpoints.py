"""Checkpoint files of long jobs (retrain, distill): kept while the job can resume from them, removed when
it cannot.

- While a job runs, only its newest ``checkpoint_keep`` checkpoints stay on disk; older ones are pruned
  after each save (``prune_job(job_id, keep=...)``).
- When the job succeeds, its product (an adapter version, an artifact) supersedes them: every one is
  removed right after the success is committed (``domain.jobs`` calls ``prune_job(job_id, keep=0)``).
- A failed or dead job keeps its checkpoints for ``checkpoint_retention_days``, for an engineer to look
  into (losses, optimizer state) before they go; ``prune_finished`` removes them after that. Beat's tick
  runs it; ``foundry ledger prune-checkpoints`` runs it by hand.

A pruned checkpoint keeps its ledger row with ``pruned_at`` set, so the ledger still tells which
checkpoints a job wrote; a resuming job only looks at rows that are not pruned.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select

from domain.config import get_settings
from domain.kinds import CHECKPOINTING_KINDS
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint, Job, utcnow
from domain.paths import UnsafePath, resolve_in_data_root

log = logging.getLogger(__name__)

_REMOVABLE = ("failed", "dead", "rejected")  # final statuses whose checkpoints wait out the retention period


@dataclass
class PruneReport:
    jobs: list[str] = field(default_factory=list)
    checkpoints: int = 0
    bytes_freed: int = 0

    def as_dict(self) -> dict:
        return {"jobs": len(self.jobs), "checkpoints": self.checkpoints, "bytes_freed": self.bytes_freed}


def _remove(path: str) -> bool:
    """Delete one checkpoint folder under the data root (and the job's folder once it is empty); False for a
    path outside the data root, which is left alone."""
    try:
        folder = resolve_in_data_root(path)
    except UnsafePath:
        log.warning("checkpoint path %s points outside the data root; left alone", path)
        return False
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
    else:
        folder.unlink(missing_ok=True)
    try:
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()
    except OSError:
        pass
    return True


def prune_job(job_id: str, keep: int = 0, url: str | None = None, report: PruneReport | None = None) -> PruneReport:
    """Remove the files of all but the newest ``keep`` unpruned checkpoints of one job and mark their rows."""
    report = report or PruneReport()
    now = utcnow()
    with session_scope(url) as s:
        rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.pruned_at.is_(None))
                              .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())))
        kept_paths = {r.path for r in rows[:keep]}
        for row in rows[keep:]:
            # a re-recorded step may share a folder with a kept row; sizes as recorded (the dry run reports the same)
            if row.path not in kept_paths and _remove(row.path):
                report.bytes_freed += row.size_bytes or 0
            row.pruned_at = now
            report.checkpoints += 1
        if rows[keep:]:
            report.jobs.append(job_id)
    return report


def prune_finished(now: datetime | None = None, *, retention_days: float | None = None, url: str | None = None,
                   dry_run: bool = False) -> PruneReport:
    """Prune every checkpoint of succeeded jobs, and of failed/dead/rejected jobs finished more than
    ``retention_days`` ago. With ``dry_run`` nothing is removed; the report says what would be."""
    now = now or utcnow()
    days = get_settings().checkpoint_retention_days if retention_days is None else retention_days
    cutoff = now - timedelta(days=days)
    with session_scope(url) as s:
        due = select(Checkpoint.job_id, Checkpoint.size_bytes).join(Job, Job.id == Checkpoint.job_id).where(
            Checkpoint.pruned_at.is_(None),
            or_(Job.status == "succeeded", and_(Job.status.in_(_REMOVABLE), Job.finished_at < cutoff)))
        rows = s.execute(due).all()
    report = PruneReport()
    if dry_run:
        report.jobs = sorted({r.job_id for r in rows})
        report.checkpoints = len(rows)
        report.bytes_freed = sum(r.size_bytes or 0 for r in rows)
        return report
    for job_id in sorted({r.job_id for r in rows}):
        prune_job(job_id, keep=0, url=url, report=report)
    if report.checkpoints:
        log.info("pruned %d checkpoints of %d finished jobs (%d bytes)", report.checkpoints, len(report.jobs),
                 report.bytes_freed)
    return report


def after_success(kind: str, job_id: str) -> None:
    """A succeeded job's checkpoints are superseded by its product: remove them (best effort; the beat
    sweep catches whatever this misses)."""
    if kind not in CHECKPOINTING_KINDS:
        return
    try:
        prune_job(job_id, keep=0)
    except Exception as exc:  # noqa: BLE001 - the job already succeeded; pruning is housekeeping
        log.warning("job %s: checkpoints not pruned: %s", job_id, exc)
