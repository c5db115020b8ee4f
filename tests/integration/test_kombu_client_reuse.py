"""A worker's kombu reuses one Redis client per connection pool (worker/celery_app.py,
``_one_redis_client_per_pool``): delivering and acknowledging messages through the real Redis no longer
builds a ``redis.Redis`` per command group, every message is still acknowledged (the unacked hash and index
end empty), and a replaced pool (after a fork or a lost connection) gets a client of its own."""

from __future__ import annotations

import redis
from kombu import Connection, Exchange, Queue

from worker.celery_app import install_kombu_guards


def count_clients(monkeypatch) -> list:
    made = []
    original = redis.Redis.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    return made


def deliver_and_ack(url: str, n: int) -> tuple[list, dict]:
    """n messages published, consumed with acks_late-style manual acks (prefetch 1), as a worker does."""
    queue = Queue("reuse-test", Exchange("reuse-test", type="direct"), routing_key="reuse-test")
    got = []
    with Connection(url, transport_options={"visibility_timeout": 3600}) as conn:
        producer = conn.Producer(serializer="json")
        for i in range(n):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key="reuse-test", declare=[queue])

        def on_message(body, message):
            got.append(body["i"])
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message], prefetch_count=1) as consumer:
            while len(got) < n:
                conn.drain_events(timeout=10)
            channel = consumer.channel
            r = redis.Redis.from_url(url)
            left = {"unacked": r.hlen(channel.unacked_key), "index": r.zcard(channel.unacked_index_key)}
    return got, left


def test_a_worker_builds_one_redis_client_per_pool_not_one_per_command(redis_url, monkeypatch):
    made = count_clients(monkeypatch)
    from kombu.transport import redis as kombu_redis

    monkeypatch.setattr(kombu_redis.Channel, "conn_or_acquire", kombu_redis.Channel.conn_or_acquire)  # undone after
    as_shipped = kombu_redis.Channel.conn_or_acquire
    if getattr(as_shipped, "_foundry_patched", False):  # an earlier test in this process started a "worker"
        as_shipped = as_shipped._foundry_original
        monkeypatch.setattr(kombu_redis.Channel, "conn_or_acquire", as_shipped)

    got, left = deliver_and_ack(redis_url, 60)
    shipped = len(made)
    assert sorted(got) == list(range(60)) and left == {"unacked": 0, "index": 0}
    assert shipped >= 60 * 3  # kombu as it ships: a client per publish, per unacked entry and per ack

    made.clear()
    install_kombu_guards()  # what a worker does at start-up
    assert getattr(kombu_redis.Channel.conn_or_acquire, "_foundry_patched", False)
    got, left = deliver_and_ack(redis_url, 60)
    assert sorted(got) == list(range(60)) and left == {"unacked": 0, "index": 0}
    assert len(made) <= 6, f"{len(made)} Redis clients for 60 messages"  # the channel's own few, not per message


def test_a_replaced_pool_gets_its_own_client(redis_url, monkeypatch):
    from kombu.transport import redis as kombu_redis

    monkeypatch.setattr(kombu_redis.Channel, "conn_or_acquire", kombu_redis.Channel.conn_or_acquire)  # undone after
    install_kombu_guards()
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
            assert first is again and first.connection_pool is channel.pool
            assert first.ping()
        channel._disconnect_pools()  # what kombu does after a fork or when the connection is lost
        with channel.conn_or_acquire() as after:
            assert after is not first and after.connection_pool is channel.pool
            assert after.ping()
        with channel.conn_or_acquire(client=first) as given:  # a caller's own client is used as given
            assert given is first
