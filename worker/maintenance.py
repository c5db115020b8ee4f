"""Broker-side half of the stranded-job sweep (``domain/stranded.py`` has the ledger side).

``broker_task_ids`` lists the task ids the Redis broker holds: every queue's lists (one per priority
step) and kombu's unacknowledged hash (minus messages a vanished worker has held for too long).
``resend_stranded`` compares them with the ledger's queued jobs, reading the broker twice a moment apart
so that a message in the middle of its hand-over to a worker is not taken for lost, and sends the lost
ones again under their own job id. Runs from beat
(``foundry.resend_stranded``) and by hand (``foundry ledger resend-stranded``). The embedded filesystem
broker moves whole files and has no such gap; it is skipped.

``hand_back_lost_running`` is the same sweep for *running* jobs whose worker died (a host lost, a SIGKILL of
the whole worker): their heartbeat is older than ``FOUNDRY_STALE_AFTER_S`` and no worker that answers
``inspect active`` lists them. The ledger puts each back to ``queued`` (``domain.stranded.hand_back``);
its original message is then moved from kombu's unacknowledged hash back to the front of its queue in one
Redis script (so it never comes back a second time after the visibility timeout), or, when the broker no
longer holds it, sent again under the same job id. Beat runs both sweeps every ``FOUNDRY_STRANDED_SWEEP_S``,
so a dead worker's job runs again within ``FOUNDRY_STALE_AFTER_S`` + one sweep (2 minutes with the
defaults) while the visibility timeout stays above the longest job.
"""

from __future__ import annotations

import json
import logging
import time

from domain import stranded
from domain.config import Settings, get_settings
from domain.metrics import REDIS_UNACKED_INDEX_KEY, REDIS_UNACKED_KEY, redis_queue_keys
from domain.kinds import QUEUES, queue_for
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


# ---- running jobs whose worker is gone ---------------------------------------------------------------

# Move one message from kombu's unacknowledged hash back to the front of its queue (what kombu's own
# restore does after the visibility timeout), atomically: a message is restored once or not at all.
_RESTORE_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
"""


def live_job_ids(app, timeout: float = 1.0) -> set[str] | None:
    """Ids of the jobs that the workers answering ``inspect active`` are running now; None if the question
    could not be asked (broker down). A solo-pool worker busy with a job does not answer: its job is
    protected by its fresh heartbeat instead."""
    try:
        replies = app.control.inspect(timeout=timeout).active() or {}
    except Exception as exc:
        log.warning("inspect active failed: %s", exc)
        return None
    return {str(t.get("id")) for tasks in replies.values() for t in (tasks or []) if isinstance(t, dict)}


def _unacked_by_job(client, job_ids: set[str]) -> dict[str, tuple[bytes, list]]:
    """job id -> (delivery tag, [message, exchange, routing key]) for the given jobs' unacknowledged messages."""
    found = {}
    for tag, raw in client.hgetall(REDIS_UNACKED_KEY).items():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        jid = _task_id(entry[0]) if isinstance(entry, list) and entry else ""
        if jid in job_ids:
            found[jid] = (tag, entry)
    return found


def _restore_key(entry: list, fallback_queue: str, options: dict) -> tuple[str, dict]:
    message, _exchange, routing_key = (entry + [None, None, None])[:3]
    queue = routing_key if routing_key in QUEUES else fallback_queue
    for part in ("headers", "properties"):
        if isinstance(message.get(part), dict):
            message[part]["redelivered"] = True
    steps = options.get("priority_steps", [0])
    try:
        pri = int((message.get("properties") or {}).get("priority") or 0)
    except (TypeError, ValueError):
        pri = 0
    step = max([p for p in steps if p <= pri] or [0])
    return (f"{queue}{options.get('sep', ':')}{step}" if step else queue), message


def hand_back_lost_running(*, stale_after_s: float | None = None, dry_run: bool = False, source: str = "sweep",
                           settings: Settings | None = None, app=None, inspect_timeout: float = 1.0) -> dict:
    """Hand back every running job whose heartbeat is stale and which no live worker is running."""
    settings = settings or get_settings()
    stale_after_s = settings.stale_after_s if stale_after_s is None else stale_after_s
    stale = stranded.stale_running(stale_after_s)
    if not stale:
        return {"handed_back": [], "dry_run": dry_run}
    from worker.client import celery_app, send_job

    app = app or celery_app()
    live = live_job_ids(app, inspect_timeout)
    if live is None:
        return {"handed_back": [], "dry_run": dry_run, "error": "workers could not be asked (broker unreachable?)"}
    lost = [j for j in stale if j.id not in live]
    if dry_run or not lost:
        return {"handed_back": [j.id for j in lost], "dry_run": dry_run}
    url, options, _ = broker_settings(settings)
    client = None
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url)
    how: dict[str, str] = {}
    try:
        held = _unacked_by_job(client, {j.id for j in lost}) if client is not None else {}
        for job in lost:
            if not stranded.hand_back(job, stale_after_s):
                continue  # a heartbeat came, or it finished, since we looked
            queue = job.queue or queue_for(job.kind)
            if job.id in held:
                tag, entry = held[job.id]
                key, message = _restore_key(entry, queue, options)
                if client.eval(_RESTORE_SCRIPT, 3, REDIS_UNACKED_KEY, REDIS_UNACKED_INDEX_KEY, key, tag,
                               json.dumps(message)):
                    how[job.id] = "restored"
                    continue
            send_job(app, job.kind, job.payload, job.id, queue=queue, priority=job.priority)
            how[job.id] = "sent_again"
    finally:
        if client is not None:
            client.close()
    handed = [j for j in lost if j.id in how]
    stranded.record_handed_back(handed, how, source)
    if handed:
        log.warning("handed back %d job(s) of vanished workers: %s", len(handed),
                    ", ".join(f"{j.id} ({how[j.id]})" for j in handed[:20]))
    return {"handed_back": [j.id for j in handed], "how": how, "dry_run": False}
