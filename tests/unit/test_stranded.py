"""The ledger side of the stranded-job sweep: which queued jobs are quiet long enough to be judged."""

from __future__ import annotations

from datetime import timedelta

from domain import stranded
from domain.ledger.db import session_scope
from domain.ledger.models import Job, JobAttempt, utcnow
from worker import maintenance


def add_job(job_id: str, status: str, enqueued_min_ago: float, attempt_end_min_ago: float | None = None) -> None:
    now = utcnow()
    with session_scope() as s:
        s.add(Job(id=job_id, kind="noop", tenant_id="acme", payload={"tenant": "acme"}, status=status, queue="control",
                  priority=7, enqueued_at=now - timedelta(minutes=enqueued_min_ago)))
        s.flush()
        if attempt_end_min_ago is not None:
            at = now - timedelta(minutes=attempt_end_min_ago)
            s.add(JobAttempt(job_id=job_id, attempt=1, worker="w", started_at=at, finished_at=at, outcome="retry"))


def test_only_quiet_queued_jobs_missing_from_the_broker_are_stranded(sqlite_ledger):
    add_job("old", "queued", 30)
    add_job("fresh", "queued", 0.1)
    add_job("retried-just-now", "queued", 30, attempt_end_min_ago=0.1)  # its retry message is on its way
    add_job("retried-long-ago", "queued", 30, attempt_end_min_ago=20)
    add_job("running", "running", 30)
    add_job("done", "succeeded", 30)

    found = stranded.find({"retried-long-ago"}, older_than_s=120)
    assert [j.id for j in found] == ["old"]
    assert found[0].kind == "noop" and found[0].queue == "control" and found[0].priority == 7
    assert found[0].payload == {"tenant": "acme"}
    assert sorted(j.id for j in stranded.find(set(), older_than_s=120)) == ["old", "retried-long-ago"]
    assert stranded.still_queued(["old", "running", "nope"]) == {"old"}


def test_the_embedded_filesystem_broker_is_not_swept(sqlite_ledger):
    add_job("old", "queued", 30)
    assert maintenance.broker_task_ids() is None
    assert maintenance.resend_stranded(older_than_s=0) == {"supported": False, "resent": []}


def test_a_torn_down_connection_while_handing_messages_back_does_not_kill_the_worker():
    """kombu raises AttributeError from restore_unacked_once when the Redis connection is already gone;
    Celery would call that unrecoverable and exit. A worker's start-up makes it a logged warning."""
    from kombu.transport.virtual import base

    from worker.celery_app import install_kombu_guards

    install_kombu_guards()  # what a worker does at start-up

    class Channel:
        do_restore = True

    qos = base.QoS(Channel(), prefetch_count=1)
    qos._delivered["tag-1"] = object()

    def torn_down():
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    qos.restore_unacked = torn_down
    assert qos.restore_unacked_once() is None
    assert qos._delivered.restored


def test_acknowledging_on_a_channel_closed_by_a_lost_connection_does_not_kill_the_worker():
    """A threads-pool job that outlived a Redis restart is acknowledged on its old channel, whose connection
    kombu has set to None: kombu's redis QoS.ack would raise AttributeError ('NoneType' object has no
    attribute 'client'), which Celery treats as unrecoverable. A worker's start-up turns it into a warning,
    and a live channel still acknowledges through Redis."""
    from kombu.transport import redis as kombu_redis

    from worker.celery_app import install_kombu_guards

    install_kombu_guards()  # what a worker does at start-up

    class ClosedChannel:
        do_restore = True
        connection = None

        def conn_or_acquire(self, client=None):  # what kombu reaches for: fails like a torn-down channel
            return self.connection.client

    qos = kombu_redis.QoS(ClosedChannel(), prefetch_count=1)
    for tag in ("tag-1", "tag-2"):
        qos._delivered[tag] = object()
    assert qos.ack("tag-1") is None
    assert qos.reject("tag-2", requeue=True) is None
    assert qos._dirty == {"tag-1", "tag-2"}  # forgotten locally; the unacked hash in Redis brings them back later

    calls = []

    class Pipe:
        def zrem(self, *a):
            calls.append(("zrem", a))
            return self

        def hdel(self, *a):
            calls.append(("hdel", a))
            return self

        def execute(self):
            calls.append(("execute",))

    class Client:
        def pipeline(self):
            return Pipe()

    class LiveChannel(ClosedChannel):
        connection = object()
        unacked_key, unacked_index_key = "unacked", "unacked_index"

        def conn_or_acquire(self, client=None):
            from contextlib import nullcontext

            return nullcontext(Client())

    live = kombu_redis.QoS(LiveChannel(), prefetch_count=1)
    live._delivered["tag-3"] = object()
    live.ack("tag-3")
    assert ("execute",) in calls and live._dirty == {"tag-3"}


# ---- running jobs whose worker is gone (domain/stranded.py: stale_running, hand_back) ----

def add_running(job_id: str, beat_s_ago: float | None, attempts: int = 1, worker: str = "a@host-a:41") -> None:
    now = utcnow()
    with session_scope() as s:
        s.add(Job(id=job_id, kind="noop", tenant_id="acme", payload={"tenant": "acme", "sleep_s": 1}, status="running",
                  queue="control", priority=5, attempts=attempts, worker=worker,
                  enqueued_at=now - timedelta(minutes=30), started_at=now - timedelta(minutes=20),
                  heartbeat_at=None if beat_s_ago is None else now - timedelta(seconds=beat_s_ago)))
        s.flush()
        for n in range(1, attempts + 1):
            s.add(JobAttempt(job_id=job_id, attempt=n, worker=worker, started_at=now - timedelta(minutes=20),
                             outcome=None if n == attempts else "lost"))


def test_a_running_job_with_a_stale_heartbeat_is_handed_back_once(sqlite_ledger):
    add_running("dead", beat_s_ago=300)
    add_running("alive", beat_s_ago=2)
    add_running("never-beat", beat_s_ago=None)  # started 20 min ago, no heartbeat ever written
    add_job("queued", "queued", 30)

    found = {j.id: j for j in stranded.stale_running(60)}
    assert sorted(found) == ["dead", "never-beat"]
    dead = found["dead"]
    assert (dead.kind, dead.queue, dead.worker, dead.attempt) == ("noop", "control", "a@host-a:41", 1)

    assert stranded.hand_back(dead, 60) is True
    assert stranded.hand_back(dead, 60) is False  # already handed back: nothing happens twice
    with session_scope() as s:
        job = s.get(Job, "dead")
        assert (job.status, job.error_code, job.attempts) == ("queued", "worker_lost", 1)
        assert "a@host-a:41" in job.error
        rows = s.query(JobAttempt).filter_by(job_id="dead").all()
        assert [(a.attempt, a.outcome) for a in rows] == [(1, "lost")] and rows[0].finished_at is not None
    assert [j.id for j in stranded.stale_running(60)] == ["never-beat"]


def test_a_job_whose_heartbeat_came_back_or_that_moved_on_is_not_handed_back(sqlite_ledger):
    add_running("revived", beat_s_ago=300)
    add_running("retaken", beat_s_ago=300)
    judged = {j.id: j for j in stranded.stale_running(60)}
    with session_scope() as s:
        s.get(Job, "revived").heartbeat_at = utcnow()  # its worker was only slow to write
        s.get(Job, "retaken").attempts = 2  # another delivery claimed it meanwhile
    assert stranded.hand_back(judged["revived"], 60) is False
    assert stranded.hand_back(judged["retaken"], 60) is False
    with session_scope() as s:
        assert {s.get(Job, j).status for j in ("revived", "retaken")} == {"running"}


def test_the_restored_message_goes_back_to_its_own_priority_list():
    entry = [{"headers": {"id": "j1"}, "properties": {"priority": 3, "delivery_info": {}}}, "foundry", "retrain"]
    key, message = maintenance._restore_key(entry, "control", {"sep": ":", "priority_steps": list(range(10))})
    assert key == "retrain:3" and message["headers"]["redelivered"] is True
    entry = [{"headers": {"id": "j2"}, "properties": {}}, "foundry", "unknown-queue"]
    assert maintenance._restore_key(entry, "control", {"sep": ":", "priority_steps": list(range(10))})[0] == "control"
