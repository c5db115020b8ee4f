"""Soak: a mixed workload (mostly reviews, some index and retrain jobs) for a fixed time while workers are
SIGKILLed at random and restarted. Real Redis + PostgreSQL, real worker processes, a tiny random model
(FOUNDRY_BASE_MODEL) and the lexical embedder so it runs on a CPU.

Reports throughput (succeeded jobs/s), p50/p95 enqueue-to-finish latency per kind, and what the fault
suite checks: lost (a job never finished) and duplicated (a job run to success twice, or costed twice).
Target: 0 and 0. Then ``lost=<n> duplicated=<n>`` and the headline ``ratio=``: jobs that ended exactly once
(a final status, at most one success and one cost row) ÷ jobs enqueued, so 1.000 means none lost and none
duplicated.

    python bench/soak.py [--seconds 150] [--kill-every 25] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from tests.integration.workers import start_worker, worker_env  # noqa: E402

FLAVOURS = {  # name: (queues, pool, concurrency) — as deployed: reviews batched on threads, long jobs solo
    "review": (["review"], "threads", 4),
    "retrain": (["retrain"], "solo", 1),
    "index": (["index", "control"], "solo", 1),
}
# --quick: one worker process for every queue (three start-ups of torch on 2 cores take longer than the load)
QUICK_FLAVOURS = {"all": (["review", "retrain", "index", "control"], "threads", 4)}
CODE = ["def add(a, b):\n    return a - b\n", "for i in range(10):\n    print(i)\n",
        "class Stack:\n    def pop(self):\n        return self.items.pop(0)\n"]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else None


def body(kind: str, i: int) -> dict:
    if kind == "review":
        return {"tenant": "soak", "code": random.choice(CODE) + f"# {i}\n", "max_new_tokens": 8, "use_retrieval": False}
    if kind == "index":
        return {"tenant": "soak", "action": "add", "documents": [
            {"id": f"doc-{i}-{k}", "text": f"def helper_{i}_{k}(x):\n    return x + {k}\n", "language": "python"}
            for k in range(5)]}
    return {"tenant": "soak", "max_steps": 6, "batch_size": 2, "max_seq_len": 96, "lora_r": 4, "checkpoint_every": 2,
            "target_modules": ["q_proj", "v_proj"], "promotion_margin": 0.0}


def launch(env: dict, flavour: str):
    queues, pool, conc = {**FLAVOURS, **QUICK_FLAVOURS}[flavour]
    return start_worker(env, queues, pool, conc, f"{flavour}-{uuid.uuid4().hex[:4]}@%h")


def release_stale_restore_mutex(redis_url: str) -> bool:
    """kombu's ``unacked_mutex`` left by a SIGKILLed worker blocks redelivery for ``unacked_mutex_expire``
    (300 s by default); see docs/operations.md. Dropped here as a short expiry would."""
    import redis

    return bool(redis.Redis.from_url(redis_url).delete("unacked_mutex"))


def tally(ids: list[str]) -> dict:
    from domain.ledger.db import session_scope
    from domain.ledger.models import FINAL_STATUSES, Job, JobAttempt, UsageCost

    with session_scope() as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        succ = dict(s.execute(select(JobAttempt.job_id, func.count()).where(
            JobAttempt.job_id.in_(ids), JobAttempt.outcome == "succeeded").group_by(JobAttempt.job_id)).all())
        usage = dict(s.execute(select(UsageCost.job_id, func.count()).where(UsageCost.job_id.in_(ids))
                               .group_by(UsageCost.job_id)).all())
    lost = [i for i in ids if i not in jobs or jobs[i].status not in FINAL_STATUSES]
    dup = [i for i in ids if succ.get(i, 0) > 1 or usage.get(i, 0) > 1]
    lat: dict = {}
    statuses: dict = {}
    failures: dict = {}  # (kind, error code) -> count: what the non-succeeded jobs died of
    for j in jobs.values():
        statuses[j.status] = statuses.get(j.status, 0) + 1
        if j.status in FINAL_STATUSES and j.status != "succeeded":
            key = f"{j.kind}/{j.status}/{j.error_code}: {(j.error or '')[:120]}"
            failures[key] = failures.get(key, 0) + 1
        if j.status == "succeeded" and j.finished_at and j.enqueued_at:
            lat.setdefault(j.kind, []).append((j.finished_at - j.enqueued_at).total_seconds())
    return {"lost": lost, "duplicated": dup, "latency": lat, "statuses": statuses, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--kill-every", type=float, default=25, help="mean seconds between worker kills")
    ap.add_argument("--max-in-flight", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis", default=os.environ.get("FOUNDRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/12"))
    ap.add_argument("--pg-admin", default=os.environ.get("FOUNDRY_TEST_DATABASE_URL",
                                                         "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--quick", action="store_true", help="12 s of load on one worker for every queue, killed once or twice "
                    "(under a minute)")
    args = ap.parse_args()
    flavours = QUICK_FLAVOURS if args.quick else FLAVOURS
    if args.quick:
        args.seconds, args.kill_every = 12, 6
    random.seed(args.seed)

    import redis

    redis.Redis.from_url(args.redis).flushdb()
    from tests.conftest import add_tenant, throwaway_pg_database

    database = contextlib.ExitStack()  # closed at the end of the run: this process's connections, then the database
    url = database.enter_context(throwaway_pg_database("foundry_soak", args.pg_admin))
    data = Path(tempfile.mkdtemp(prefix="foundry-soak-"))
    from tests.fixtures.tiny_models import save_tiny_model

    base = save_tiny_model(data / "tiny-base")
    env = worker_env(args.redis, url, data, FOUNDRY_BASE_MODEL=str(base), FOUNDRY_DEVICE="cpu",
                     FOUNDRY_EMBEDDING_MODEL="hashing:64", OMP_NUM_THREADS="1", FOUNDRY_LOG_JSON="0")
    os.environ.update(env)
    from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
    from domain.ledger.migrate import upgrade
    from worker.client import enqueue

    upgrade(url)
    add_tenant(url, "soak")
    pairs = stdlib_review_pairs(64, max_code_lines=8)
    seed_feedback("soak", pairs[:4])
    workers: dict = {}
    restarting: dict = {}
    pool = ThreadPoolExecutor(len(FLAVOURS))
    kills: list[dict] = []
    mutexes = 0
    ids: list[str] = []
    try:
        t_start = time.monotonic()
        starting = {f: pool.submit(launch, env, f) for f in flavours}  # in parallel
        workers.update({f: fut.result() for f, fut in starting.items()})
        print(f"workers ready in {time.monotonic() - t_start:.1f}s", flush=True)
        t0 = time.monotonic()
        next_kill = t0 + random.expovariate(1 / args.kill_every)
        i = 0
        while time.monotonic() - t0 < args.seconds:
            from domain.ledger.db import session_scope
            from domain.ledger.models import FINAL_STATUSES, Job

            with session_scope() as s:
                open_jobs = s.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids[-200:]),
                                                                                  Job.status.not_in(FINAL_STATUSES)))
            if open_jobs < args.max_in_flight:
                kind = random.choices(["review", "index", "retrain"], weights=[85, 10, 5])[0]
                if kind == "retrain":
                    seed_feedback("soak", [random.choice(pairs)])  # new feedback: something to train on
                ids.append(enqueue(kind, body(kind, i)))
                i += 1
            else:
                time.sleep(0.05)
            for f, fut in list(restarting.items()):
                if fut.done():
                    workers[f] = fut.result()
                    del restarting[f]
            if time.monotonic() >= next_kill and len(restarting) < len(workers):
                flavour = random.choice([f for f in workers if f not in restarting])
                workers[flavour].kill()
                kills.append({"at_s": round(time.monotonic() - t0, 1), "worker": flavour})
                print(f"SIGKILL {flavour} worker at {kills[-1]['at_s']} s", flush=True)
                time.sleep(0.5)
                mutexes += release_stale_restore_mutex(args.redis)
                restarting[flavour] = pool.submit(launch, env, flavour)  # the load goes on meanwhile
                next_kill = time.monotonic() + random.expovariate(1 / args.kill_every)
        load_s = time.monotonic() - t0
        deadline = time.monotonic() + max(30 if args.quick else 90, args.seconds)
        while time.monotonic() < deadline:  # drain: everything enqueued must finish
            result = tally(ids)
            if not result["lost"]:
                break
            time.sleep(0.5)
        total_s = time.monotonic() - t0
        result = tally(ids)
    finally:
        for fut in restarting.values():
            workers[object()] = fut.result()
        list(pool.map(lambda w: w.kill(), workers.values()))  # the run is over: no need for a warm stop
        pool.shutdown()
        database.close()
    succeeded = result["statuses"].get("succeeded", 0)
    summary = {
        "settings": {"seconds": args.seconds, "kill_every": args.kill_every, "max_in_flight": args.max_in_flight,
                     "workers": {k: list(v) for k, v in flavours.items()}, "model": "tiny random Llama (CPU)"},
        "jobs": len(ids), "statuses": result["statuses"], "kills": kills, "restore_mutex_released": mutexes,
        "load_seconds": round(load_s, 1), "total_seconds": round(total_s, 1),
        "throughput_jobs_per_s": round(succeeded / total_s, 2),
        "latency_s": {k: {"n": len(v), "p50": round(statistics.median(v), 3), "p95": round(pct(v, 0.95), 3)}
                      for k, v in result["latency"].items()},
        "failures": result["failures"],
        "lost": len(result["lost"]), "duplicated": len(result["duplicated"]),
        "lost_ids": result["lost"][:20], "duplicated_ids": result["duplicated"][:20],
        # the headline: jobs that ended exactly once (a final status, one success, one cost row) of those enqueued
        "ratio": (len(ids) - len(set(result["lost"]) | set(result["duplicated"]))) / max(1, len(ids)),
    }
    all_lat = [x for v in result["latency"].values() for x in v]
    summary["latency_s"]["all"] = {"n": len(all_lat), "p50": pct(all_lat, 0.5), "p95": pct(all_lat, 0.95)}
    out = ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"jobs {len(ids)} ({result['statuses']}), {len(kills)} worker kills, {total_s:.0f} s")
    print(f"throughput {summary['throughput_jobs_per_s']} jobs/s; p95 latency "
          + ", ".join(f"{k} {v['p95']}s" for k, v in summary["latency_s"].items()))
    for what, n in sorted(result["failures"].items()):
        print(f"  not succeeded: {n} x {what}")
    print(f"lost={summary['lost']} duplicated={summary['duplicated']}")
    print(f"ratio={summary['ratio']:.3f}")


if __name__ == "__main__":
    main()
