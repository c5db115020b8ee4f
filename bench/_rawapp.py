"""Raw Celery baseline for bench/queue_overhead.py: the same broker settings as Foundry, no ledger."""

import os
import time

from celery import Celery

from domain.config import get_settings
from worker.celery_app import make_celery

_foundry = make_celery(get_settings())
app = Celery("rawbench", broker=os.environ["RAW_BROKER"], backend=os.environ["RAW_BROKER"])
app.conf.update({k: v for k, v in _foundry.conf.items() if k.startswith(("task_", "worker_", "broker_", "result_", "accept"))
                 and k not in ("task_routes", "task_queues", "task_default_queue", "task_default_exchange")})
app.conf.task_default_queue = "rawbench"
# raw Celery learns that a task finished from its result backend (Foundry from its ledger); Celery's
# defaults otherwise (no STARTED state stored)
app.conf.task_ignore_result = False
app.conf.task_track_started = False


@app.task(name="raw.noop", acks_late=True, reject_on_worker_lost=True)
def noop(enqueued_at: float) -> float:
    return time.time()


if os.environ.get("RAW_FOUNDRY_KOMBU") == "1":  # --raw-with-foundry-kombu: the baseline gets Foundry's kombu patches
    from celery import signals

    from worker.celery_app import install_kombu_guards

    signals.celeryd_init.connect(lambda **_: install_kombu_guards(), weak=False)
