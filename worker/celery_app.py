"""The Celery application, configured for long GPU jobs (see docs/operations.md).

- acks_late + reject_on_worker_lost: a job whose worker dies is redelivered; the ledger's attempt counter
  dead-letters it after ``FOUNDRY_MAX_ATTEMPTS`` deliveries instead of looping.
- Redis visibility_timeout above the longest job, identical for the broker and the result backend.
- prefetch 1, JSON only, explicitly named tasks routed to one queue per kind.
- Embedded default: kombu's filesystem:// transport and a file result backend under FOUNDRY_DATA_DIR.

Importing this module (a producer's first enqueue does) changes nothing outside it: the kombu guards and
the embedded broker's folders are set up when a worker or beat starts (``prepare_worker``).
"""

from __future__ import annotations

import json

from celery import Celery, signals
from celery.app.amqp import AMQP
from kombu import Exchange, Queue

from domain.config import Settings, get_settings
from domain.kinds import CONTROL_QUEUE, KINDS, QUEUES

EMBEDDED_FOLDERS = ("queue", "processed", "control", "results")


def broker_settings(settings: Settings) -> tuple[str, dict, str]:
    """(broker_url, broker_transport_options, result_backend) for these settings. Creates nothing: the
    embedded broker's folders are made by ``prepare_broker``."""
    if settings.embedded:
        base = settings.broker_dir.resolve()
        options = {
            "data_folder_in": str(base / "queue"),
            "data_folder_out": str(base / "queue"),
            "processed_folder": str(base / "processed"),
            "store_processed": False,
            "control_folder": str(base / "control"),
        }
        backend = settings.result_backend or f"file://{base / 'results'}"
        return "filesystem://", options, backend
    options = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
        "sep": ":",
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # the restore lock of a SIGKILLed worker must not block redelivery for kombu's default 5 minutes
        "unacked_mutex_expire": max(5, settings.restore_interval_s * 3),
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
    }
    return settings.broker_url, options, settings.result_backend or settings.broker_url


def prepare_broker(settings: Settings) -> None:
    """Create the embedded broker's folders (a worker, beat, or a producer about to write a message there)."""
    if settings.embedded:
        for sub in EMBEDDED_FOLDERS:
            (settings.broker_dir.resolve() / sub).mkdir(parents=True, exist_ok=True)


REPR_MAX = 1024  # Celery's own limit for the argument text in a message's headers and task events


def _json_repr(value) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= REPR_MAX else text[:REPR_MAX - 3] + "..."


class FoundryAMQP(AMQP):
    """Celery's message builder, with the arguments shown in task events (Flower) as JSON.

    Celery's default text is ``saferepr`` of the arguments, which walks a job body in Python: as much CPU as
    the rest of an enqueue of a small job (bench/queue_overhead.py, profiled). Messages are JSON anyway, so
    ``json.dumps`` (in C) shows the same body, cut at the same 1024 characters.
    """

    def as_task_v2(self, task_id, name, args=None, kwargs=None, *rest, argsrepr=None, kwargsrepr=None, **options):
        if argsrepr is None:
            argsrepr = _json_repr(list(args or ()))
        if kwargsrepr is None:
            kwargsrepr = _json_repr(kwargs or {})
        return super().as_task_v2(task_id, name, args, kwargs, *rest, argsrepr=argsrepr, kwargsrepr=kwargsrepr,
                                  **options)


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    broker, options, backend = broker_settings(settings)
    app = Celery("foundry", broker=broker, backend=backend, include=["worker.tasks"],
                 amqp="worker.celery_app:FoundryAMQP")
    exchange = Exchange("foundry", type="direct")
    control = {"queue": CONTROL_QUEUE, "routing_key": CONTROL_QUEUE}
    app.conf.update(
        task_queues=[Queue(q, exchange, routing_key=q) for q in QUEUES],
        task_default_queue=CONTROL_QUEUE,
        task_default_exchange="foundry",
        task_routes={f"foundry.{k.name}": {"queue": k.queue, "routing_key": k.queue} for k in KINDS.values()}
        | {"foundry.schedule_tick": control, "foundry.resend_stranded": control,
           "foundry.roll_up_costs": control},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=options,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout} if not settings.embedded else {},
        result_expires=7 * 24 * 3600,
        # The ledger is Foundry's result store (status, result, error, progress); storing each job's summary
        # in the result backend too costs a GET + SET + PUBLISH at start and at finish. Opt in for producers
        # that wait on Celery's AsyncResult.
        task_ignore_result=not settings.celery_results,
        task_track_started=settings.celery_results,
        task_send_sent_event=False,  # one more publish per job; the ledger already records "queued"
        worker_send_task_events=True,
        task_default_priority=5,
        task_inherit_parent_priority=True,
        broker_heartbeat=10,
        timezone="UTC",
        enable_utc=True,
        beat_schedule={
            "retrain-schedules": {"task": "foundry.schedule_tick", "schedule": settings.beat_tick_s,
                                  "options": {"expires": max(1.0, settings.beat_tick_s * 0.9)}},
        } | ({"stranded-jobs": {"task": "foundry.resend_stranded", "schedule": settings.stranded_sweep_s,
                                "options": {"expires": max(1.0, settings.stranded_sweep_s * 0.9)}}}
             if settings.stranded_sweep_s > 0 and not settings.embedded else {})
          | ({"costs-rollup": {"task": "foundry.roll_up_costs", "schedule": settings.costs_rollup_s,
                               "options": {"expires": max(1.0, settings.costs_rollup_s * 0.9)}}}
             if settings.costs_rollup_s > 0 and not settings.embedded else {}),
    )
    return app


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _structured_logs(logger=None, **_):
    """Job id and tenant on every log line; FOUNDRY_LOG_JSON=1 for one JSON object per line; no secrets."""
    from domain.logs import configure

    configure(logger, get_settings().log_json)


def _survive_restore_race() -> None:
    """When the Redis connection breaks, Celery releases it and kombu hands the channel's unacknowledged
    messages back (``restore_unacked_once``). If the connection object is already torn down, kombu's
    ``_connparams`` raises ``AttributeError: 'NoneType' object has no attribute 'hostname'``, which Celery
    treats as unrecoverable: the worker exits instead of reconnecting (seen in
    tests/integration/test_faults_outages.py when Redis restarts while a job is reserved; the same family as
    kombu#582 and kombu#970). Treat it like the connection error it is: log it and let the consumer
    reconnect. The messages stay in the unacked hash; kombu restores them after the visibility timeout, and
    the stranded-job sweep (worker/maintenance.py) sends their jobs again much sooner."""
    import logging

    from kombu.transport.virtual import base

    original = base.QoS.restore_unacked_once
    if getattr(original, "_foundry_patched", False):
        return

    def restore_unacked_once(self, stderr=None):
        try:
            return original(self, stderr)
        except AttributeError as exc:
            logging.getLogger(__name__).warning(
                "unacknowledged messages not handed back (broker connection already gone: %s); "
                "they are restored after the visibility timeout or re-sent by the stranded-job sweep", exc)
            return None

    restore_unacked_once._foundry_patched = True
    base.QoS.restore_unacked_once = restore_unacked_once


def _survive_ack_on_closed_channel() -> None:
    """A threads-pool worker (reviews) cannot cancel a running job when the Redis connection breaks; Celery
    logs "cannot be acknowledged after a connection loss" and lets it finish. Its acknowledgement then runs
    after the consumer has reconnected, on the old channel, whose connection kombu has set to None:
    ``QoS.ack`` raises ``AttributeError: 'NoneType' object has no attribute 'client'``, which Celery treats
    as unrecoverable, and the worker exits (seen in tests/integration/test_faults_outages.py). There is
    nothing left to acknowledge on a closed channel: the job's outcome is already in the ledger, the message
    stays in the unacked hash and comes back after the visibility timeout (or through the stranded-job
    sweep), and the ledger's claim then skips a job that already finished. So log it and keep consuming."""
    import logging

    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import base

    def guard(name: str):
        original = getattr(kombu_redis.QoS, name)
        if getattr(original, "_foundry_patched", False):
            return

        def patched(self, delivery_tag, *args, **kwargs):
            if getattr(self.channel, "connection", None) is None:  # the channel was closed by a lost connection
                logging.getLogger(__name__).warning(
                    "message %s not %s: its broker channel closed with the lost connection; it is delivered "
                    "again later and the ledger skips a job that already finished", delivery_tag,
                    "acknowledged" if name == "ack" else "rejected")
                base.QoS.ack(self, delivery_tag)  # forget it locally
                return None
            return original(self, delivery_tag, *args, **kwargs)

        patched._foundry_patched = True
        setattr(kombu_redis.QoS, name, patched)

    guard("ack")
    guard("reject")


def _one_redis_client_per_pool() -> None:
    """kombu's Redis channel builds a new ``redis.Redis`` client for every command group it sends outside the
    consumer's own connection (``Channel.conn_or_acquire``): the unacked-hash entry of each delivered
    message, its acknowledgement, the visibility sweep, each publish of a result or event — three per job
    in a Foundry worker. redis-py's ``Redis.__init__`` builds its response-callback table each time (about
    170 dictionary writes), which was 11 % of a no-op worker's CPU under cProfile. A client holds no
    connection of its own (it borrows one from the pool per command, and is safe to share between threads),
    so one client per connection pool does the same work: it is made again when kombu replaces the pool
    (after a fork or a lost connection, ``_disconnect_pools``)."""
    from contextlib import contextmanager

    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel.conn_or_acquire
    if getattr(original, "_foundry_patched", False):
        return

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_foundry_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_foundry_client"] = cached
        yield cached[1]

    conn_or_acquire._foundry_patched = True
    conn_or_acquire._foundry_original = original
    kombu_redis.Channel.conn_or_acquire = conn_or_acquire


def install_kombu_guards() -> None:
    """The kombu guards and the client reuse above (idempotent). Patches kombu for the whole process: workers
    only."""
    _survive_restore_race()
    _survive_ack_on_closed_channel()
    _one_redis_client_per_pool()


@signals.celeryd_init.connect
@signals.beat_init.connect
def prepare_worker(sender=None, instance=None, **_) -> None:
    """A worker's (or beat's) start-up: the kombu guards and the embedded broker's folders. Only for
    Foundry's own app: another app's worker in a process that imported this module (bench/_rawapp.py, the
    raw Celery baseline) runs kombu as it ships."""
    app = getattr(instance, "app", None) or getattr(sender, "app", None)
    if app is not None and app.main != "foundry":
        return
    install_kombu_guards()
    prepare_broker(get_settings())


app = make_celery()
