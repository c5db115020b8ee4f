import time, redis
from tests.integration.test_retrain_worker import *  # noqa
from tests.integration.test_retrain_worker import TRAIN

def test_dbg(env, redis_url):
    from worker.client import enqueue
    job_id = enqueue("retrain", {"tenant": "acme", **TRAIN, "max_steps": 150, "checkpoint_every": 10})
    first = start_worker(env, queues=["retrain"], name="first@%h")
    r = redis.Redis.from_url(redis_url)
    while True:
        with session_scope() as s:
            if s.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id == job_id)):
                break
        time.sleep(0.2)
    first.kill()
    for k in r.keys("*"):
        print(k, r.type(k), r.ttl(k))
    print(r.zrange("unacked_index", 0, -1, withscores=True), time.time())
