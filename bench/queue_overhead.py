"""No-op jobs through Foundry (ledger-tracked, Redis + PostgreSQL) vs raw Celery no-op tasks.

Same Redis, same worker pool/concurrency/acks_late/prefetch settings, in one run. Throughput is
jobs/s from the first enqueue to the last finish; latency is enqueue-to-finish per job.
Headline: ratio = Foundry jobs/s ÷ raw Celery jobs/s (target ≥ 0.8).

    python bench/queue_overhead.py [--jobs 2000] [--rounds 5] [--pool prefork --concurrency 2] [--quick]
                                   [--raw-with-foundry-kombu]

The raw worker runs kombu as it ships; Foundry's worker reuses one Redis client per connection pool
(worker/celery_app.py, ``_one_redis_client_per_pool``). ``--raw-with-foundry-kombu`` gives the raw worker
the same patch, to show how much of the ratio is Foundry's design rather than that kombu fix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select, text  # noqa: E402

from tests.integration.workers import start_worker, worker_env  # noqa: E402


LOGLEVEL = "WARNING"  # the same for both workers: per-task INFO lines cost as much as the work being measured


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_raw(n: int, env: dict, pool: str, conc: int) -> dict:
    os.environ["RAW_BROKER"] = env["FOUNDRY_BROKER_URL"]
    from bench._rawapp import noop

    import subprocess

    env = {**env, "RAW_BROKER": env["FOUNDRY_BROKER_URL"]}

    log = Path(env["FOUNDRY_DATA_DIR"]) / f"raw-{uuid.uuid4().hex[:6]}.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench._rawapp", "worker", "-Q", "rawbench", "-P", pool,
                             "-c", str(conc), "-n", f"raw-{uuid.uuid4().hex[:4]}@%h", "--without-gossip",
                             "--without-mingle", "--without-heartbeat", "-l", LOGLEVEL],
                            cwd=ROOT, env={**os.environ, **env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        noop.delay(time.time()).get(timeout=60)  # warm up: worker ready
        t0 = time.time()
        sent = [(noop.delay(time.time()), time.time()) for _ in range(n)]
        finishes = []
        for res, at in sent:
            finished = res.get(timeout=300)
            finishes.append((at, finished))
        t1 = max(f for _, f in finishes)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = [f - a for a, f in finishes]
    return {"jobs": n, "seconds": t1 - t0, "jobs_per_s": n / (t1 - t0), "p50_ms": pct(lat, 0.5) * 1000,
            "p95_ms": pct(lat, 0.95) * 1000}


def run_foundry(n: int, env: dict, pool: str, conc: int) -> dict:
    from domain.ledger.db import session_scope
    from domain.ledger.models import Job
    from worker.client import enqueue, wait

    w = start_worker(env, queues=["control"], pool=pool, concurrency=conc, loglevel=LOGLEVEL)
    try:
        wait(enqueue("noop", {"tenant": "bench"}), timeout=60)  # warm up
        t0 = time.time()
        ids = [enqueue("noop", {"tenant": "bench"}) for _ in range(n)]
        deadline = time.time() + 600
        while time.time() < deadline:
            with session_scope() as s:
                left = s.scalar(text("SELECT count(*) FROM jobs WHERE status IN ('queued','running')"))
            if left == 0:
                break
            time.sleep(0.2)  # the finish time is read from the ledger afterwards; polling only adds load
        with session_scope() as s:
            rows = s.execute(select(Job.enqueued_at, Job.finished_at, Job.status).where(Job.id.in_(ids))).all()
    finally:
        w.stop()
    assert all(r.status == "succeeded" for r in rows), "some no-op jobs did not succeed"
    t1 = max(r.finished_at for r in rows).timestamp()
    lat = [(r.finished_at - r.enqueued_at).total_seconds() for r in rows]
    return {"jobs": n, "seconds": t1 - t0, "jobs_per_s": n / (t1 - t0), "p50_ms": pct(lat, 0.5) * 1000,
            "p95_ms": pct(lat, 0.95) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5, help="alternating raw/Foundry rounds; the ratio is of the medians (this kind of machine drifts by 20 %% within a minute)")
    ap.add_argument("--pool", default="prefork")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--redis", default=os.environ.get("FOUNDRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"))
    ap.add_argument("--pg-admin", default=os.environ.get("FOUNDRY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--quick", action="store_true", help="300 jobs, 1 round")
    ap.add_argument("--raw-with-foundry-kombu", action="store_true",
                    help="give the raw Celery worker Foundry's kombu patches too (worker/celery_app.py, "
                         "install_kombu_guards); by default it runs kombu as it ships")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.rounds = 300, 1

    import redis

    redis.Redis.from_url(args.redis).flushdb()
    from domain.ledger.migrate import upgrade
    from tests.conftest import add_tenant, throwaway_pg_database

    raw, foundry = [], []
    with throwaway_pg_database("foundry_bench", args.pg_admin) as url:
        data = Path(tempfile.mkdtemp(prefix="foundry-bench-"))
        env = worker_env(args.redis, url, data, FOUNDRY_LONGEST_JOB_S=3600, FOUNDRY_VISIBILITY_TIMEOUT_S=0,
                         RAW_FOUNDRY_KOMBU="1" if args.raw_with_foundry_kombu else "0")
        os.environ.update(env)
        upgrade(url)
        add_tenant(url, "bench")
        for r in range(args.rounds):
            raw.append(run_raw(args.jobs, env, args.pool, args.concurrency))
            foundry.append(run_foundry(args.jobs, env, args.pool, args.concurrency))
            print(f"round {r + 1}: raw {raw[-1]['jobs_per_s']:.0f} jobs/s, foundry {foundry[-1]['jobs_per_s']:.0f} jobs/s")
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    summary = {
        "settings": {"jobs": args.jobs, "rounds": args.rounds, "pool": args.pool, "concurrency": args.concurrency,
                     "raw_kombu": "foundry-patched" if args.raw_with_foundry_kombu else "as shipped"},
        "raw_celery": {k: med(raw, k) for k in ("jobs_per_s", "p50_ms", "p95_ms")},
        "foundry": {k: med(foundry, k) for k in ("jobs_per_s", "p50_ms", "p95_ms")},
        "rounds": {"raw": raw, "foundry": foundry},
    }
    ratio = summary["foundry"]["jobs_per_s"] / summary["raw_celery"]["jobs_per_s"]
    summary["ratio"] = ratio
    out = ROOT / "bench" / "results" / "queue_overhead.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"raw celery (kombu {summary['settings']['raw_kombu']}): {summary['raw_celery']['jobs_per_s']:.0f} jobs/s  p50 {summary['raw_celery']['p50_ms']:.1f} ms  "
          f"p95 {summary['raw_celery']['p95_ms']:.1f} ms")
    print(f"foundry   : {summary['foundry']['jobs_per_s']:.0f} jobs/s  p50 {summary['foundry']['p50_ms']:.1f} ms  "
          f"p95 {summary['foundry']['p95_ms']:.1f} ms")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
