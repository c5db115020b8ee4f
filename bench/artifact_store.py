"""Artifact store: a rank-16 adapter fetched cold from the store vs loaded from this host's cache.

A LoRA adapter with the shapes of SmolLM2-135M (30 layers, hidden 576, 3 KV heads of 64; rank 16 on
q/k/v/o, float32, random weights: the bytes, not the values, matter here) is put in an S3 store on
loopback (moto's server mode, or the endpoint in FOUNDRY_TEST_S3_URL) through ``domain.storage``
(temporary key, read back, verified, final key, manifest last). Then, each round:
- cold: a fresh node-local cache (a new host): ``NodeCache.get_tree`` reads the manifest, downloads every
  file, checks each sha256, renames it into place; then the weights are loaded (safetensors) into memory;
- local cache: the same call on the warm cache (a hit: no store traffic) and the same weights load;
- CPU tier: the weights from the CPU-memory tier (domain/review/tiers.py) copied into preallocated
  tensors of the same shapes (what a slot hot-swap does), no file read.
Cold and local include the safetensors load, so the ratio is what a review worker gains from its cache.

Recovery (not with ``--quick``): worker A (a real ``celery worker``) runs a noop job, worker B and one beat
run beside it, A is SIGKILLed; the time from the kill until the ledger shows the job running on B. Every
setting is Foundry's default (heartbeat 10 s, stale after 60 s, stranded sweep 60 s, the visibility timeout
derived from FOUNDRY_LONGEST_JOB_S, hours); ``--stale-after`` overrides FOUNDRY_STALE_AFTER_S. Needs the
Redis (``--redis``) and PostgreSQL (``--pg-admin``, a throwaway database) the tests use.

Targets: cold fetch ≤ 1 s on loopback, CPU-tier switch ≤ 10 ms, recovery ≤ 180 s. Headline: ratio = cold
time ÷ local-cache time (larger is better).

    python bench/artifact_store.py [--rounds 7] [--quick] [--stale-after SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 16


def write_adapter(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shapes = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}
    tensors = {}
    for layer in range(LAYERS):
        for mod, out in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(shapes)}))


def endpoint():
    """(endpoint URL, server to stop or None)."""
    if os.environ.get("FOUNDRY_TEST_S3_URL"):
        return os.environ["FOUNDRY_TEST_S3_URL"], None
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    return f"http://{host}:{port}", server


def recovery_s(redis_url: str, pg_admin: str, stale_after_s: float | None) -> dict:
    """Seconds from SIGKILL of the worker running a job to that job running on another worker process."""
    import redis

    from domain.config import get_settings, reset_settings
    from domain.ledger.db import dispose_all, session_scope
    from domain.ledger.migrate import upgrade
    from domain.ledger.models import Job
    from tests.conftest import add_tenant, throwaway_pg_database
    from tests.integration.workers import running_beat, start_worker
    from worker.client import enqueue

    def worker_of(job_id: str) -> str:
        with session_scope() as s:
            return s.get(Job, job_id).worker or ""

    def wait_for(check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not within {timeout} s")
            time.sleep(0.2)

    redis.Redis.from_url(redis_url).flushdb()
    with throwaway_pg_database("foundry_recovery_bench", pg_admin) as url, tempfile.TemporaryDirectory() as data:
        env = {"FOUNDRY_BROKER_URL": redis_url, "FOUNDRY_RESULT_BACKEND": redis_url, "FOUNDRY_DATABASE_URL": url,
               "FOUNDRY_DATA_DIR": data, "FOUNDRY_ALLOW_FAULT_INJECTION": "1",  # noop jobs may sleep
               **({"FOUNDRY_STALE_AFTER_S": str(stale_after_s)} if stale_after_s is not None else {})}
        os.environ.update(env)
        reset_settings()
        dispose_all()
        upgrade(url)
        add_tenant(url, "bench")
        settings = get_settings()  # what the workers run with (the caller's own FOUNDRY_* variables included)
        used = {"stale_after_s": settings.stale_after_s, "heartbeat_s": settings.heartbeat_s,
                "stranded_sweep_s": settings.stranded_sweep_s, "visibility_timeout_s": settings.visibility_timeout}
        workers = [start_worker(env, queues=["control"], name="a@bench-host-a")]
        try:
            job_id = enqueue("noop", {"tenant": "bench", "sleep_s": 600})
            wait_for(lambda: worker_of(job_id).startswith("a@"), 60)
            workers.append(start_worker(env, queues=["control"], name="b@bench-host-b"))  # already up, as in a fleet
            with running_beat(env, Path(data)):
                workers[0].kill()
                killed = time.monotonic()
                wait_for(lambda: worker_of(job_id).startswith("b@"), 900)
                back = time.monotonic() - killed
        finally:
            for w in workers:
                w.kill()
        dispose_all()
    return {"seconds": round(back, 1), **used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, no recovery measurement")
    ap.add_argument("--stale-after", type=float, default=None,
                    help="FOUNDRY_STALE_AFTER_S for the recovery run (default: Foundry's own, 60 s)")
    ap.add_argument("--redis", default=os.environ.get("FOUNDRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"))
    ap.add_argument("--pg-admin", default=os.environ.get("FOUNDRY_TEST_DATABASE_URL",
                                                         "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds

    import boto3
    import torch
    from safetensors.torch import load_file

    from domain import storage
    from domain.review.tiers import CpuTier

    url, server = endpoint()
    bucket = f"bench-{os.getpid()}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    store = storage.ArtifactStore(f"s3://{bucket}/store", endpoint_url=url, region="us-east-1")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "adapter"
        write_adapter(src)
        t0 = time.perf_counter()
        manifest = store.put_tree(src, "adapters/bench/reviewer/v1", primary="adapter_model.safetensors")
        put_s = time.perf_counter() - t0
        sha = manifest.files["adapter_model.safetensors"]["sha256"]
        cold, warm, cpu = [], [], []
        tier = CpuTier(max_count=4)
        for r in range(rounds):
            cache = storage.NodeCache(Path(tmp) / f"cache-{r}", max_bytes=10**10)
            t0 = time.perf_counter()
            folder = cache.get_tree(store, "adapters/bench/reviewer/v1", sha)
            load_file(str(folder / "adapter_model.safetensors"))
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            folder = cache.get_tree(store, "adapters/bench/reviewer/v1", sha)
            load_file(str(folder / "adapter_model.safetensors"))
            warm.append(time.perf_counter() - t0)
            slots = {k: torch.empty_like(t) for k, t in tier.weights(folder / "adapter_model.safetensors").items()}
            t0 = time.perf_counter()
            with torch.no_grad():
                for k, t in tier.weights(folder / "adapter_model.safetensors").items():
                    slots[k].copy_(t)
            cpu.append(time.perf_counter() - t0)
            assert cache.stats == {"hits": 1, "fetches": 1, "evictions": 0}
    if server is not None:
        server.stop()
    cold_s, warm_s, cpu_s = statistics.median(cold), statistics.median(warm), statistics.median(cpu)
    ratio = cold_s / warm_s
    report = {"adapter_bytes": manifest.size_bytes, "rounds": rounds, "put_verified_s": round(put_s, 4),
              "cold_fetch_s": {"median": round(cold_s, 4), "all": [round(x, 4) for x in cold]},
              "local_cache_s": {"median": round(warm_s, 5), "all": [round(x, 5) for x in warm]},
              "cpu_tier_switch_s": {"median": round(cpu_s, 5), "all": [round(x, 5) for x in cpu]},
              "store": "external S3" if os.environ.get("FOUNDRY_TEST_S3_URL") else "moto server on loopback",
              "ratio": round(ratio, 2)}
    if not args.quick:
        report["recovery"] = recovery_s(args.redis, args.pg_admin, args.stale_after)
    out = ROOT / "bench" / "results" / "artifact_store.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"adapter {manifest.size_bytes / 1e6:.1f} MB (rank {RANK}, SmolLM2-135M shapes); verified put {put_s:.3f} s")
    print(f"cold fetch from the store + load: median {cold_s * 1000:.1f} ms over {rounds} rounds (target <= 1000 ms)")
    print(f"from the local cache + load:      median {warm_s * 1000:.2f} ms")
    print(f"CPU tier -> slot copy:            median {cpu_s * 1000:.2f} ms (target <= 10 ms)")
    if "recovery" in report:
        rec = report["recovery"]
        print(f"SIGKILL -> running on another worker: {rec['seconds']:.1f} s (stale after {rec['stale_after_s']:g} s, "
              f"heartbeat {rec['heartbeat_s']:g} s, sweep {rec['stranded_sweep_s']:g} s, visibility timeout "
              f"{rec['visibility_timeout_s']} s; target <= 180 s)")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
