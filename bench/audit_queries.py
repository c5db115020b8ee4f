"""Audit queries at production scale on PostgreSQL (issue 16, "Audit queries at scale").

Fills a throwaway PostgreSQL ledger with generated rows (default: 1,000,000 jobs, usage rows and attempts
over 90 days, 100,000 reviews each with feedback, 5,000 adapter versions in chains of 100, 5,000 health
events, 50 tenants), then times every documented audit view and `foundry audit` query through the code the
CLI runs, p50/p95 over ``--runs`` calls with random arguments, and prints their plans (EXPLAIN ANALYZE).

It measures twice in the same run: the baseline (today's schema without the audit indexes of migration
0005 and before the costs roll-up has run: what the ledger was before those changes, read by today's
code) and head, after one run of the daily costs roll-up (``domain.costs.roll_up_costs``, what
beat does hourly: the generated days before today go into ``usage_daily``). Headline: ``ratio = 50 ms / worst p95`` over the four targets of the issue (one review's audit, one
tenant's costs per day over a month, one adapter's lineage, last night's failures), at head.

    python bench/audit_queries.py            # production scale (a few minutes, mostly filling)
    python bench/audit_queries.py --quick    # 100,000 jobs, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

TARGET_MS = 50.0
TENANTS = 50
DAYS = 90
CHAIN = 100  # adapter versions per tenant, each the parent of the next

FILL = [
    ("tenants", """INSERT INTO tenants (id, display_name, created_at, settings)
        SELECT 't' || lpad(i::text, 3, '0'), 'tenant ' || i, now() - interval '{days} days', '{{}}'
        FROM generate_series(0, {tenants} - 1) i"""),
    ("jobs", """INSERT INTO jobs (id, kind, tenant_id, priority, queue, payload, status, attempts, max_attempts,
                                  worker, enqueued_at, started_at, finished_at, heartbeat_at, progress,
                                  progress_info, error, error_code, created_by)
        SELECT md5(i::text), k.kind, 't' || lpad((i % {tenants})::text, 3, '0'), 5, k.kind, '{{}}',
               s.status, 1, 3, 'gpu@node' || (i % 8),
               e.at, e.at + interval '1 second', CASE WHEN s.status = 'running' THEN NULL ELSE e.at + interval '4 seconds' END,
               e.at + interval '3 seconds', 1.0, '{{}}',
               CASE WHEN s.status IN ('failed', 'dead', 'rejected') THEN 'RuntimeError: generated failure ' || i END,
               CASE s.status WHEN 'failed' THEN 'error' WHEN 'dead' THEN 'worker_lost' WHEN 'rejected' THEN 'invalid' END,
               'client:bench'
        FROM generate_series(1, {jobs}) i,
             LATERAL (SELECT now() - interval '{days} days' + (i::float / {jobs}) * interval '{days} days'
                             + random() * interval '10 seconds' AS at) e,
             LATERAL (SELECT CASE WHEN i % 10 = 0 THEN 'review' WHEN i % 10 = 1 THEN 'index'
                                  WHEN i % 97 = 2 THEN 'retrain' ELSE 'noop' END AS kind) k,
             LATERAL (SELECT CASE WHEN i % 200 = 3 THEN 'failed' WHEN i % 1000 = 5 THEN 'dead'
                                  WHEN i % 500 = 7 THEN 'rejected' WHEN i > {jobs} - 20 THEN 'running'
                                  ELSE 'succeeded' END AS status) s"""),
    ("job_attempts", """INSERT INTO job_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error)
        SELECT id, 1, worker, started_at, finished_at, CASE WHEN status = 'running' THEN NULL ELSE status END, error
        FROM jobs"""),
    ("adapter_versions", """INSERT INTO adapter_versions (id, tenant_id, name, version, parent_id, base_model_id,
            base_model_hash, dataset_hash, dataset_size, hyperparams, metrics, artifact_path, artifact_sha256,
            status, created_at)
        SELECT 'av' || lpad(i::text, 6, '0'), 't' || lpad((i % {tenants})::text, 3, '0'), 'reviewer',
               i / {tenants} + 1, CASE WHEN i >= {tenants} THEN 'av' || lpad((i - {tenants})::text, 6, '0') END,
               'smollm2-135m', md5('base'), md5('data' || i), 100 + i % 900, '{{"lora_r": 16}}',
               '{{"eval": {{"loss": 1.5}}}}', 'adapters/' || i, md5('sha' || i),
               CASE WHEN i >= {adapters} - {tenants} THEN 'promoted' ELSE 'archived' END,
               now() - interval '{days} days' + (i::float / {adapters}) * interval '{days} days'
        FROM generate_series(0, {adapters} - 1) i"""),
    ("reviews", """INSERT INTO reviews (id, job_id, tenant_id, adapter_version_id, model_id, code, code_sha256,
            prompt_truncated, truncation, summary, findings, raw_text, context_chunks, index_version, created_at)
        SELECT substr(md5('r' || j.id), 1, 32), j.id, j.tenant_id,
               'av' || lpad((substr(j.tenant_id, 2)::int + {tenants} * (random() * ({chain} - 1))::int)::text, 6, '0'),
               'smollm2-135m', 'def f(a, b):\n    return a - b\n', md5(j.id), false, '{{}}', 'subtracts instead of adding',
               '[{{"line": 2, "severity": "high", "message": "a - b"}}]', 'Summary: ...', '[]', 1, j.finished_at
        FROM jobs j WHERE j.kind = 'review' AND j.status = 'succeeded'"""),
    ("feedback", """INSERT INTO feedback (id, review_id, tenant_id, adapter_version_id, verdict, correction,
            created_by, created_at)
        SELECT substr(md5('f' || r.id), 1, 32), r.id, r.tenant_id, r.adapter_version_id,
               CASE WHEN random() < 0.7 THEN 'accept' ELSE 'reject' END, NULL, 'bench', r.created_at + interval '1 hour'
        FROM reviews r"""),
    ("usage_costs", """INSERT INTO usage_costs (job_id, tenant_id, kind, model_id, adapter_version_id,
            prompt_tokens, completion_tokens, wall_seconds, gpu_seconds, cost, currency, price_version, created_at)
        SELECT j.id, j.tenant_id, j.kind, 'smollm2-135m', r.adapter_version_id, 200 + (random() * 800)::int,
               (random() * 256)::int, 3.0, 2.5, 0.000350, 'USD', 'v1', j.finished_at
        FROM jobs j LEFT JOIN reviews r ON r.job_id = j.id WHERE j.finished_at IS NOT NULL AND j.status <> 'rejected'"""),
    ("health_events", """INSERT INTO health_events (at, source, component, event, status, message, detail)
        SELECT now() - interval '{days} days' + (i::float / {health}) * interval '{days} days', 'gpu@node' || (i % 8),
               (ARRAY['worker', 'memory', 'broker', 'database', 'model'])[1 + i % 5], 'check',
               CASE WHEN i % 50 = 0 THEN 'fail' ELSE 'ok' END, 'generated', '{{"rss_mb": 900}}'
        FROM generate_series(1, {health}) i"""),
]


def fill(url: str, scale: dict) -> dict:
    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    took = {}
    with eng.connect() as conn:
        for table, sql in FILL:
            t0 = time.perf_counter()
            conn.execute(text(sql.format(**scale)))
            took[table] = round(time.perf_counter() - t0, 1)
        conn.execute(text("VACUUM ANALYZE"))
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t, _ in FILL}  # noqa: S608
    eng.dispose()
    return {"seconds": took, "rows": counts}


def _pick(url: str) -> dict:
    """Arguments for the queries, chosen like an operator would: random existing reviews, tenants, adapters, jobs."""
    eng = create_engine(url)
    with eng.connect() as conn:
        reviews = [r[0] for r in conn.execute(text("SELECT id FROM reviews TABLESAMPLE SYSTEM (1) LIMIT 200"))]
        adapters = [r[0] for r in conn.execute(text(
            "SELECT id FROM adapter_versions WHERE version > :v ORDER BY random() LIMIT 200"), {"v": CHAIN // 2})]
        jobs = [r[0] for r in conn.execute(text("SELECT id FROM jobs TABLESAMPLE SYSTEM (1) LIMIT 200"))]
    eng.dispose()
    tenants = [f"t{i:03d}" for i in range(TENANTS)]
    return {"review": reviews, "adapter": adapters, "job": jobs, "tenant": tenants}


def queries(picks: dict) -> dict:
    """name -> (target?, callable(rnd) running the query the CLI runs, (sql, params) for EXPLAIN)."""
    from domain.costs import cost_report
    from worker.cli.audit import failures
    from worker.cli.review import review_audit

    now = datetime.now(timezone.utc)

    def sql(q: str, **params):
        from domain.ledger.db import session_scope

        with session_scope() as s:
            return s.execute(text(q), params).all()

    lineage_sql = """WITH RECURSIVE chain AS (
            SELECT l.*, 0 AS depth FROM v_adapter_lineage l WHERE l.id = :id
            UNION ALL SELECT l.*, c.depth + 1 FROM v_adapter_lineage l JOIN chain c ON l.id = c.parent_id
            WHERE c.depth < 200)
        SELECT * FROM chain ORDER BY depth"""
    failures_sql = """SELECT kind, tenant_id, status, error_code, error, attempts, finished_at
        FROM v_job_failures WHERE finished_at >= now() - interval '12 hours' ORDER BY finished_at"""
    review_sql = """SELECT review_id, adapter_name, adapter_version, adapter_parent_id, adapter_trained_by_job,
               adapter_dataset_hash, prompt_tokens, completion_tokens, cost, currency
        FROM v_review_audit WHERE review_id = :id"""
    month = now - timedelta(days=30)
    costs_sql = """SELECT day, SUM(jobs), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) FROM v_costs_daily
        WHERE tenant_id = :tenant AND day >= :since GROUP BY day ORDER BY day"""
    return {
        # the four targets of the issue
        "review audit (foundry audit review ID)": (
            True, lambda r: review_audit(r.choice(picks["review"])), (review_sql, {"id": picks["review"][0]})),
        "tenant costs per day, 30 days (foundry audit costs --by day --tenant T --since 30d)": (
            True, lambda r: cost_report("day", tenant=r.choice(picks["tenant"]), since=month),
            (costs_sql, {"tenant": "t007", "since": month.date()})),
        "adapter lineage (v_adapter_lineage, recursive)": (
            True, lambda r: sql(lineage_sql, id=r.choice(picks["adapter"])), (lineage_sql, {"id": picks["adapter"][0]})),
        "last night's failures (foundry audit failures --since 12h)": (
            True, lambda r: failures("12h"), (failures_sql, {})),
        # the other documented views and audit commands
        "v_job_failures, 12 h (docs/ledger.md)": (False, lambda r: sql(failures_sql), (failures_sql, {})),
        "v_job_attempts of one job": (
            False, lambda r: sql("SELECT * FROM v_job_attempts WHERE job_id = :id", id=r.choice(picks["job"])),
            ("SELECT * FROM v_job_attempts WHERE job_id = :id", {"id": picks["job"][0]})),
        "foundry audit jobs --since 24h": (
            False, lambda r: sql("SELECT kind, status, count(*), avg(attempts) FROM jobs WHERE enqueued_at >= :s "
                                 "GROUP BY kind, status", s=now - timedelta(hours=24)),
            ("SELECT kind, status, count(*), avg(attempts) FROM jobs WHERE enqueued_at >= :s GROUP BY kind, status",
             {"s": now - timedelta(hours=24)})),
        "foundry audit jobs --since 24h --tenant T": (
            False, lambda r: sql("SELECT kind, status, count(*), avg(attempts) FROM jobs WHERE enqueued_at >= :s "
                                 "AND tenant_id = :t GROUP BY kind, status", s=now - timedelta(hours=24),
                                 t=r.choice(picks["tenant"])),
            ("SELECT kind, status, count(*) FROM jobs WHERE enqueued_at >= :s AND tenant_id = :t GROUP BY kind, status",
             {"s": now - timedelta(hours=24), "t": "t007"})),
        "foundry audit sql VIEW --limit 50 (each view)": (
            False, lambda r: [sql(f"SELECT * FROM {v} LIMIT 50") for v in  # noqa: S608 - fixed names
                              ("v_review_audit", "v_job_failures", "v_costs_daily", "v_adapter_lineage", "v_job_attempts")],
            ("SELECT * FROM v_costs_daily LIMIT 50", {})),
        "foundry audit costs --by tenant (all time, every usage row)": (
            False, lambda r: cost_report("tenant"), ("SELECT tenant_id, SUM(cost) FROM v_costs_daily GROUP BY tenant_id", {})),
    }


def measure(url: str, picks: dict, runs: int, seed: int = 0) -> dict:
    import os

    from domain.config import reset_settings
    from domain.ledger import db

    os.environ["FOUNDRY_DATABASE_URL"] = url
    reset_settings()
    db.dispose_all()
    rnd = random.Random(seed)
    out = {}
    for name, (target, run, _) in queries(picks).items():
        n = runs if target or "all time" not in name else max(3, runs // 10)
        run(rnd)  # warm the connection and the plan cache once
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            run(rnd)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        out[name] = {"target": target, "runs": n, "p50_ms": round(statistics.median(times), 2),
                     "p95_ms": round(times[min(n - 1, int(0.95 * n))], 2)}
    db.dispose_all()
    return out


AUDIT_INDEXES = ("ix_feedback_review", "ix_usage_tenant_day")  # migration 0005_ops


def drop_audit_indexes(url: str) -> list[str]:
    """Drop the audit indexes; returns the statements that create them again."""
    with create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
        kept = [conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"), {"n": n}).scalar_one()
                for n in AUDIT_INDEXES]
        for n in AUDIT_INDEXES:
            conn.execute(text(f"DROP INDEX {n}"))
    return kept


def roll_up(url: str) -> dict:
    from domain.costs import roll_up_costs

    t0 = time.perf_counter()
    done = roll_up_costs(url=url)
    return {**done, "seconds": time.perf_counter() - t0}


def plans(url: str, picks: dict) -> dict:
    eng = create_engine(url)
    out = {}
    with eng.connect() as conn:
        for name, (target, _, (q, params)) in queries(picks).items():
            if target:
                rows = conn.execute(text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + q), params)
                out[name] = "\n".join(r[0] for r in rows)
    eng.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 jobs and 10,000 reviews (under a minute)")
    ap.add_argument("--jobs", type=int, help="jobs (and usage rows, attempts) to generate (default 1,000,000)")
    ap.add_argument("--runs", type=int, default=40, help="calls per query (default 40; 20 with --quick)")
    ap.add_argument("--plans", action="store_true", help="print the EXPLAIN ANALYZE plans of the four targets")
    args = ap.parse_args()
    jobs = args.jobs or (100_000 if args.quick else 1_000_000)
    runs = args.runs if not args.quick or args.runs != 40 else 20
    scale = {"jobs": jobs, "tenants": TENANTS, "days": DAYS, "chain": CHAIN, "adapters": TENANTS * CHAIN,
             "health": 5000 if not args.quick else 1000}

    from domain.ledger.migrate import upgrade
    from tests.conftest import throwaway_pg_database

    report: dict = {"scale": scale}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(throwaway_pg_database("foundry_audit_bench"))
        upgrade(url)
        kept = drop_audit_indexes(url)  # the baseline: today's schema without the audit indexes and the roll-up
        t0 = time.perf_counter()
        report["fill"] = fill(url, scale)
        print(f"filled in {time.perf_counter() - t0:.0f} s: {report['fill']['rows']}", flush=True)
        picks = _pick(url)
        report["baseline"] = measure(url, picks, runs)
        with create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
            for ddl in kept:
                conn.execute(text(ddl))
        report["rollup"] = roll_up(url)  # what beat's hourly sweep does: closed days into usage_daily
        print(f"costs roll-up of {report['rollup']['rows']} day rows in {report['rollup']['seconds']:.1f} s", flush=True)
        with create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text("ANALYZE"))
        report["head"] = measure(url, picks, runs)
        report["plans"] = plans(url, picks)
    print(f"{'query':<92} {'baseline p50/p95 ms':>20} {'head p50/p95 ms':>18}")
    for name, after in report["head"].items():
        before = report["baseline"][name]
        mark = "*" if after["target"] else " "
        print(f"{mark} {name:<90} {before['p50_ms']:>9.2f} {before['p95_ms']:>9.2f} "
              f"{after['p50_ms']:>8.2f} {after['p95_ms']:>8.2f}")
    if args.plans:
        for name, plan in report["plans"].items():
            print(f"\n-- {name}\n{plan}")
    worst = max(v["p95_ms"] for v in report["head"].values() if v["target"])
    worst_before = max(v["p95_ms"] for v in report["baseline"].values() if v["target"])
    report["ratio"] = TARGET_MS / worst
    report["ratio_baseline"] = TARGET_MS / worst_before
    out = ROOT / "bench" / "results" / f"audit_queries{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"* targets: worst p95 {worst:.2f} ms at head (baseline without the audit indexes and the roll-up: {worst_before:.2f} ms); "
          f"target {TARGET_MS:.0f} ms; results in {out.relative_to(ROOT)}")
    print(f"ratio={report['ratio']:.3f}")


if __name__ == "__main__":
    main()
