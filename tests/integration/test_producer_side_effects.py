"""A producer on the Redis broker: importing the client and sending a job creates no folder and patches
nothing (the unit test of the same name covers the embedded broker)."""

from __future__ import annotations

import redis

from tests.unit.test_producer_side_effects import run_producer


def test_a_redis_producer_creates_no_folders_and_patches_nothing(sqlite_ledger, redis_url, tmp_path):
    seen = run_producer(tmp_path, FOUNDRY_BROKER_URL=redis_url, FOUNDRY_RESULT_BACKEND=redis_url)
    assert seen["imported"] == {"patched": [], "folders": None}
    assert seen["sent"] == {"patched": [], "folders": None, "messages": 0}
    client = redis.Redis.from_url(redis_url)
    assert sum(client.llen(k) for k in client.keys("control*") if client.type(k) == b"list") == 1  # sent to Redis
    assert seen["worker"]["patched"] == ["ack", "conn_or_acquire", "reject", "restore_unacked_once"] and seen["worker"]["folders"] is None
