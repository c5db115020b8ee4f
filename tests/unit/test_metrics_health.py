"""worker.signals health evaluation: which measured conditions stop a worker from taking jobs."""

from worker.signals import HealthSettings, evaluate, memory_snapshot

S = HealthSettings(min_free_memory_mb=500, min_gpu_free_mb=1000)
MEM = {"rss_mb": 1000, "limit_mb": None, "available_mb": 8000, "gpu_free_mb": None}


def run(**over):
    args = dict(db_ok=True, db_msg="reachable", memory=dict(MEM), stale_jobs=[], heartbeat_alive=True, drained=None,
                settings=S)
    args.update(over)
    return evaluate(**args)


def test_healthy_worker_passes():
    assert run().ok


def test_each_failing_check_is_named():
    assert run(db_ok=False, db_msg="unreachable: OperationalError").failures == ["database: unreachable: OperationalError"]
    assert run(stale_jobs=["j1"]).failures[0].startswith("heartbeat:")
    assert run(heartbeat_alive=False).failures[0].startswith("heartbeat:")
    assert run(memory={**MEM, "limit_mb": 1200}).failures == ["memory: 200 MB headroom < 500 MB"]
    assert run(memory={**MEM, "available_mb": 100}).failures[0].startswith("memory: 100 MB")
    assert run(memory={**MEM, "gpu_free_mb": 512}).failures == ["gpu: 512 MB free < 1000 MB"]
    assert run(drained="/data/drain/all").failures[0].startswith("drained:")


def test_memory_snapshot_measures_this_process():
    snap = memory_snapshot()
    assert snap["rss_mb"] > 10 and (snap["available_mb"] is None or snap["available_mb"] > 0)


def test_the_ledger_driver_is_loaded_before_the_pool_forks():
    """The worker's main process imports the ledger's database driver at start-up (celeryd_after_setup), so a
    pool process does not import it during its first job."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from worker import signals\n"
        "assert 'psycopg' not in sys.modules, 'imported too early to tell'\n"
        "signals._warm_ledger_driver()\n"
        "assert 'psycopg' in sys.modules\n"
    )
    env = {"FOUNDRY_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
