"""Broker-side half of the stranded-job sweep (``domain/stranded.py`` has the ledger side).

``broker_task_ids`` lists the task ids the Redis broker holds: every queue's lists (one per priority
step) and kombu's unacknowledged hash (minus messages a vanished worker has held for too long).
``resend_stranded`` compares them with the ledger's queued jobs, reading the broker twice a moment apart
so that a message in the middle of its hand-over to a worker is not taken for lost, and sends the lost
ones again under their own job id. Runs from beat
(``foundry.resend_stranded``) and by hand (``foundry ledger resend-stranded``). The embedded filesystem
broker moves whole files and has no such gap; it is skipped.
"""

from __future__ import annotations

import json
import logging
import time

from domain import stranded
from domain.config import Settings, get_settings
from domain.metrics import REDIS_UNACKED_INDEX_KEY, REDIS_UNACKED_KEY, redis_queue_keys
from domain.kinds import QUEUES
from worker.celery_app import broker_settings

log = logging.getLogger(__name__)

def broker_task_ids(settings: Settings | None = None, held_for_s: float | None = None) -> set[str] | None:
    """Task ids in the Redis broker's queues and unacknowledged hash; None for another broker.

    With ``held_for_s``, an unacknowledged message delivered more than that many seconds ago, without an
    ETA, does not count: a worker takes a message only when it has a free slot (prefetch 1), so a job still
    ``queued`` whose message a worker has held that long was orphaned (its worker lost the connection and
    could not hand it back). Left alone, kombu would redeliver it only after the visibility timeout, which
    is above the longest job (hours)."""
    settings = settings or get_settings()
    url, options, _ = broker_settings(settings)
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    sep, steps = options.get("sep", ":"), options.get("priority_steps", [0])
    keys = [k for q in QUEUES for k in redis_queue_keys(q, sep, steps)]
    ids: set[str] = set()
    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hgetall(REDIS_UNACKED_KEY)
        pipe.zrange(REDIS_UNACKED_INDEX_KEY, 0, -1, withscores=True)
        *lists, unacked, index = pipe.execute()
        for raw in (m for items in lists for m in items):
            ids.add(_task_id(raw))
        delivered = {bytes(tag): at for tag, at in index}
        cutoff = time.time() - held_for_s if held_for_s is not None else None
        for tag, raw in unacked.items():
            try:
                message = json.loads(raw)[0]
            except (ValueError, IndexError, TypeError):
                continue
            at = delivered.get(bytes(tag))
            eta = ((message.get("headers") or {}) if isinstance(message, dict) else {}).get("eta")
            if cutoff is not None and at is not None and at < cutoff and not eta:
                continue  # held for too long by a worker that is gone: not a live delivery
            ids.add(_task_id(message))
    finally:
        client.close()
    ids.discard("")
    return ids


def _task_id(message) -> str:
    try:
        msg = json.loads(message) if isinstance(message, (bytes, str)) else message
        return str((msg.get("headers") or {}).get("id") or (msg.get("properties") or {}).get("correlation_id") or "")
    except (ValueError, AttributeError):
        return ""


def resend_stranded(*, older_than_s: float = 120.0, recheck_s: float = 1.0, dry_run: bool = False,
                    source: str = "sweep", settings: Settings | None = None) -> dict:
    """Send again every queued job whose message the broker no longer holds. Returns what was found."""
    settings = settings or get_settings()
    first = broker_task_ids(settings, held_for_s=older_than_s)
    if first is None:
        return {"supported": False, "resent": []}
    lost = stranded.find(first, older_than_s)
    if lost:
        time.sleep(recheck_s)  # a message between BRPOP and its unacked record shows up again by now
        second = broker_task_ids(settings, held_for_s=older_than_s) or set()
        queued = stranded.still_queued([j.id for j in lost])
        lost = [j for j in lost if j.id not in second and j.id in queued]
    if lost and not dry_run:
        from worker.client import celery_app, send_job

        app = celery_app()
        for job in lost:
            send_job(app, job.kind, job.payload, job.id, queue=job.queue or "control", priority=job.priority)
        stranded.record_resent(lost, source)
        log.warning("re-sent %d stranded job(s): %s", len(lost), ", ".join(j.id for j in lost[:20]))
    return {"supported": True, "resent": [j.id for j in lost], "dry_run": dry_run}
