"""A producer that imports the client and sends jobs changes nothing in its process or on disk beyond the
message it sends: the kombu guards and the embedded broker's folders come with a worker's start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRODUCER = r"""
import json, sys
from pathlib import Path

def patched():
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import base
    return sorted(name for name, fn in (("restore_unacked_once", base.QoS.restore_unacked_once),
                                        ("ack", kombu_redis.QoS.ack), ("reject", kombu_redis.QoS.reject),
                                        ("conn_or_acquire", kombu_redis.Channel.conn_or_acquire))
                  if getattr(fn, "_foundry_patched", False))

def folders():
    broker = Path(sys.argv[1]) / "broker"
    return sorted(str(p.relative_to(broker)) for p in broker.rglob("*") if p.is_dir()) if broker.exists() else None

seen = {}
import worker.client
import worker.celery_app  # what the client imports on its first enqueue
seen["imported"] = {"patched": patched(), "folders": folders()}
job_id = worker.client.enqueue("noop", {"tenant": "acme"})
seen["sent"] = {"patched": patched(), "folders": folders(),
                "messages": len(list((Path(sys.argv[1]) / "broker" / "queue").glob("*.msg")))}
worker.celery_app.prepare_worker()  # a worker's start-up (Celery's celeryd_init signal)
seen["worker"] = {"patched": patched(), "folders": folders()}
print(json.dumps(seen))
"""


def run_producer(data_dir: Path, **env: str) -> dict:
    """The producer above in a fresh interpreter (this one may have imported a worker's modules already)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "FOUNDRY_BROKER_URL": "", **env}
    out = subprocess.run([sys.executable, "-c", PRODUCER, str(data_dir)], cwd=ROOT, env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_client_and_sending_patches_nothing_until_a_worker_starts(sqlite_ledger, tmp_path):
    seen = run_producer(tmp_path)
    assert seen["imported"] == {"patched": [], "folders": None}  # importing: nothing on disk, kombu untouched
    # sending on the embedded broker makes the broker's folders (its messages are files) and patches nothing
    assert seen["sent"] == {"patched": [], "folders": ["control", "processed", "queue", "results"], "messages": 1}
    assert seen["worker"] == {"patched": ["ack", "conn_or_acquire", "reject", "restore_unacked_once"],
                              "folders": ["control", "processed", "queue", "results"]}
