"""Checkpoints of long jobs (retrain, distill): one format, one writer, one reader, one pruning rule.

The format: one folder per checkpoint, ``checkpoints/<kind>/<job id>/step-NNNNNNNN/`` under the data root::

    checkpoint.json     the manifest: format, step, the weights/state file names, tied weight names,
                        config (the job's hyperparameters) and extra (what the job needs to resume)
    model.safetensors   the trainable weights (LoRA weights for retrain, the whole student for distill)
    trainer_state.pt    optimizer, scheduler and RNG states (``torch.load(weights_only=True)``)

``write`` lays one out (temp folder, then rename) and returns it with its sha256 (``paths.sha256_tree``);
``save`` is the one place a job's checkpoint is written, stored, recorded (``ctx.record_checkpoint``) and
pruned; ``latest`` hands a redelivered job its last checkpoint if the files still match the recorded sha256,
read by ``read``; ``restore`` puts optimizer, scheduler and RNG states back. Torch is imported only by the
functions that need it, so the ledger side (jobs, beat) stays light.

Through the artifact store (``domain.storage``, ``FOUNDRY_ARTIFACT_URL``), so a job resumes on any host:
- The recorded path is the checkpoint's store key. With the default store (the data folder itself) the
  written folder already is the stored object: nothing is copied, and the checkpoint is recorded at once.
- With any other store (``s3://...``), ``save`` writes the folder on local disk on the training thread
  (a consistent snapshot; milliseconds for LoRA weights), then hands it to one background thread that
  uploads it (``storage.publish_tree``: each file to a temporary key, read back and checked, then its final
  key, the manifest last), and only then records it in the ledger and prunes older ones. Training goes on
  meanwhile; at most one upload per job is in flight: the next ``save`` waits for the previous one, and so
  does the job's end (``domain.jobs`` calls ``wait_for_upload`` when the handler returns or raises, before
  the result is committed or the job requeued). An upload that fails is not recorded (a ``checkpoint``
  ``upload_failed`` health event): a job that dies resumes from its previous recorded checkpoint.
- ``latest`` reads the folder this host wrote when it still matches the recorded sha256, else fetches the
  object into this host's node cache (``storage.fetch_tree``, verified by sha256) and reads it there.

Retention:
- While a job runs, only its newest ``checkpoint_keep`` checkpoints stay on disk; older ones are pruned
  after each save (``prune_job(job_id, keep=...)``).
- When the job succeeds, its product (an adapter version, an artifact) supersedes them: every one is
  removed right after the success is committed (``domain.jobs`` calls ``prune_job(job_id, keep=0)``).
- A failed or dead job keeps its checkpoints for ``checkpoint_retention_days``, for an engineer to look
  into (losses, optimizer state) before they go; ``prune_finished`` removes them after that. Beat's tick
  runs it; ``foundry ledger prune-checkpoints`` runs it by hand.

Pruning removes the local folder and the store's objects. A pruned checkpoint keeps its ledger row with ``pruned_at`` set, so the ledger still tells which
checkpoints a job wrote; a resuming job only looks at rows that are not pruned.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import and_, or_, select

from domain import storage
from domain.config import get_settings
from domain.kinds import CHECKPOINTING_KINDS
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint, Job, utcnow
from domain.paths import UnsafePath, fresh_dir, publish_dir, resolve_in_data_root, sha256_tree

if TYPE_CHECKING:
    import torch

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
    """Delete one checkpoint: its folder under the data root (and the job's folder once it is empty) and its
    objects in the artifact store (when the store is not the data folder itself); False for a path outside
    the data root, which is left alone. Raises ``storage.StoreUnavailable`` when the store cannot be reached."""
    try:
        folder = resolve_in_data_root(path)
        key = storage.check_key(path)
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
    if not storage.holds_data_folder():
        storage.get_store().delete(key)
    return True


def prune_job(job_id: str, keep: int = 0, url: str | None = None, report: PruneReport | None = None) -> PruneReport:
    """Remove the files and store objects of all but the newest ``keep`` unpruned checkpoints of one job and
    mark their rows. A store that cannot be reached leaves the rest unmarked, for the next sweep."""
    report = report or PruneReport()
    now = utcnow()
    with session_scope(url) as s:
        rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.pruned_at.is_(None))
                              .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())))
        kept_paths = {r.path for r in rows[:keep]}
        for row in rows[keep:]:
            # a re-recorded step may share a folder with a kept row; sizes as recorded (the dry run reports the same)
            try:
                if row.path not in kept_paths and _remove(row.path):
                    report.bytes_freed += row.size_bytes or 0
            except storage.StoreUnavailable as exc:
                log.warning("job %s: checkpoint %s not pruned yet: %s", job_id, row.path, exc)
                break
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


# ---- the format: one writer, one reader -----------------------------------------------------------

FORMAT = 1
MANIFEST = "checkpoint.json"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"


@dataclass(frozen=True)
class Written:
    """A checkpoint folder in place, with what the ledger records about it."""

    folder: Path
    step: int
    sha256: str  # paths.sha256_tree of the folder
    size_bytes: int


@dataclass
class Loaded:
    """A checkpoint as read back: the manifest's fields, the weights (on the CPU) and the trainer state."""

    folder: Path
    step: int
    weights: dict[str, torch.Tensor]
    state: dict  # optimizer, scheduler, rng
    config: dict
    extra: dict


def folder_for(kind: str, job_id: str, step: int) -> str:
    """Where a job's checkpoint of ``step`` lives, relative to the data root."""
    return f"checkpoints/{kind}/{job_id}/step-{step:08d}"


def rng_state() -> dict:
    """Python's and torch's RNG states (CUDA's too when there is one), as ``torch.save`` keeps them."""
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _untied(weights: dict) -> tuple[dict, dict[str, str]]:
    """safetensors refuses tensors that share memory (a tied head and embedding): keep the first name of
    each, and say which names are the same tensor as a kept one."""
    kept, tied, seen = {}, {}, {}
    for name, t in weights.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().contiguous()
    return kept, tied


def write(folder: str | os.PathLike, weights: dict, *, step: int, optimizer, scheduler, config: dict,
          extra: dict) -> Written:
    """Write one complete checkpoint folder: into ``.<name>.tmp`` beside it, then renamed into place (a
    folder of the same step from an earlier delivery is replaced). ``config`` and ``extra`` must be JSON.
    ``optimizer``: the optimizer, or its ``state_dict()`` as gathered from shards (FSDP: one format either way)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = fresh_dir(folder.with_name(f".{folder.name}.tmp"))
    kept, tied = _untied(weights)
    save_file(kept, str(tmp / WEIGHTS), metadata={"format": "pt"})
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()  # a dict: gathered (FSDP)
    torch.save({"optimizer": state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / STATE)
    manifest = {"format": FORMAT, "step": step, "weights": WEIGHTS, "state": STATE, "tied": tied,
                "config": config, "extra": extra}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    publish_dir(tmp, folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return Written(folder=folder, step=step, sha256=sha256_tree(folder), size_bytes=size)


def read(folder: str | os.PathLike) -> Loaded:
    """Read a checkpoint folder written by ``write``. Raises OSError (a file missing) or ValueError (not this
    format)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: not a checkpoint of format {FORMAT}")
    weights = load_file(str(folder / manifest["weights"]))
    for name, same_as in manifest.get("tied", {}).items():
        weights[name] = weights[same_as]
    state = torch.load(folder / manifest["state"], weights_only=True, map_location="cpu")
    return Loaded(folder=folder, step=int(manifest["step"]), weights=weights, state=state,
                  config=manifest.get("config") or {}, extra=manifest.get("extra") or {})


def restore(ckpt: Loaded, optimizer, scheduler) -> None:
    """Put a checkpoint's optimizer, scheduler and RNG states back (the caller loads the weights)."""
    optimizer.load_state_dict(ckpt.state["optimizer"])
    scheduler.load_state_dict(ckpt.state["scheduler"])
    set_rng_state(ckpt.state["rng"])


# ---- a job's checkpoints: save (write, record, prune) and resume -----------------------------------

def save(ctx, step: int, weights: dict, *, optimizer, scheduler, config: dict, extra: dict, metrics: dict,
         reason: str) -> Written:
    """The one place a job checkpoints: wait for the job's previous upload, write the folder, then store it
    (``storage.publish_tree``: temporary key, verified, final key), record it (path = store key, sha256, size,
    ``metrics``) with ``ctx.record_checkpoint`` and prune all but the newest ``checkpoint_keep``. With the
    default store (the data folder) there is nothing to upload: recorded at once. With any other store the
    upload, record and prune run in a background thread while training goes on (see the module docstring)."""
    wait_for_upload(ctx.job_id)
    rel = folder_for(ctx.kind, ctx.job_id, step)
    written = write(resolve_in_data_root(rel), weights, step=step, optimizer=optimizer, scheduler=scheduler,
                    config=config, extra=extra)
    if storage.holds_data_folder():
        _record(ctx, rel, written, metrics, reason)
        return written
    thread = threading.Thread(target=_store_and_record, args=(ctx, rel, written, metrics, reason), daemon=True,
                              name=f"checkpoint-upload-{ctx.job_id[:12]}")
    with _uploads_lock:
        _uploads[ctx.job_id] = thread
    thread.start()
    return written


_uploads: dict[str, threading.Thread] = {}  # job id -> its checkpoint upload in flight
_uploads_lock = threading.Lock()


def wait_for_upload(job_id: str) -> None:
    """Block until this job's checkpoint upload in flight, if any, is stored and recorded, or has failed (then
    it is not recorded: a health event says so and the job would resume from its previous checkpoint). The
    next ``save`` calls it, and so does ``domain.jobs`` when the handler returns or raises, before the job
    is settled or committed."""
    with _uploads_lock:
        thread = _uploads.pop(job_id, None)
    if thread is not None:
        thread.join()


def _record(ctx, rel: str, written: Written, metrics: dict, reason: str) -> None:
    ctx.record_checkpoint(written.step, rel, written.sha256, size_bytes=written.size_bytes, metrics=metrics,
                          reason=reason)
    prune_job(ctx.job_id, keep=ctx.settings.checkpoint_keep)


def _store_and_record(ctx, rel: str, written: Written, metrics: dict, reason: str) -> None:
    """The upload thread: store the folder (verified), and only then record it. A failure leaves no row."""
    try:
        stored = storage.publish_tree(written.folder, rel)
        if stored.sha256 != written.sha256:
            raise storage.ObjectCorrupt(f"checkpoint {rel}: stored tree sha256 {stored.sha256[:12]}... is not the "
                                        f"written {written.sha256[:12]}...")
    except Exception as exc:  # noqa: BLE001 - a checkpoint that is not stored is not recorded; training goes on
        log.warning("job %s: checkpoint of step %d not stored: %s", ctx.job_id, written.step, exc)
        ctx.health("checkpoint", "upload_failed", "degraded",
                   f"checkpoint {rel} not stored ({type(exc).__name__}: {exc}); not recorded"[:500], step=written.step)
        shutil.rmtree(written.folder, ignore_errors=True)
        return
    try:
        _record(ctx, rel, written, metrics, reason)
    except Exception as exc:  # noqa: BLE001 - the thread has no caller to raise to; the ledger is the record
        log.warning("job %s: stored checkpoint of step %d not recorded: %s", ctx.job_id, written.step, exc)


def _local_copy(row) -> Path | None:
    """A folder on this host holding a recorded checkpoint: the one this host wrote, else (a store other than
    the data folder) a copy fetched from the store into the node cache, verified; None if neither matches."""
    folder = resolve_in_data_root(row.path)
    if folder.is_dir() and sha256_tree(folder) == row.sha256:
        return folder
    if storage.holds_data_folder():
        return None
    fetched = storage.fetch_tree(row.path, row.sha256)
    return fetched if sha256_tree(fetched) == row.sha256 else None


def latest(ctx) -> Loaded | None:
    """This job's latest recorded checkpoint, read, if its files still match the recorded sha256 (hashed once
    per delivery): the folder this host wrote, or one fetched from the artifact store (another host wrote
    it). None if there is none, or it is missing, changed or unreadable (a health event says so: training
    starts over). A store that cannot be reached raises ``storage.StoreUnavailable`` (retried later)."""
    row = ctx.latest_checkpoint()
    if row is None:
        return None
    try:
        folder = _local_copy(row)
        if folder is not None:
            return read(folder)
    except (OSError, ValueError, KeyError, storage.ObjectMissing, storage.ObjectCorrupt):
        pass
    ctx.health("checkpoint", "corrupt", "degraded",
               f"checkpoint {row.path} is missing, changed or unreadable; training starts over", step=row.step)
    return None
