"""Shared fixtures.

Integration tests use the real Redis and PostgreSQL of the machine. Point them elsewhere with
FOUNDRY_TEST_REDIS_URL (default redis://127.0.0.1:6379/15) and FOUNDRY_TEST_DATABASE_URL (an admin URL,
default postgresql+psycopg://postgres@127.0.0.1:5432/postgres; a fresh database is created per run).
If they are unreachable the integration tests fail loudly; FOUNDRY_SKIP_INTEGRATION=1 skips them instead.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text

from domain.config import reset_settings
from domain.ledger import db as ledger_db
from domain.ledger.models import Base, Tenant

REDIS_URL = os.environ.get("FOUNDRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get("FOUNDRY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SKIP_INTEGRATION = os.environ.get("FOUNDRY_SKIP_INTEGRATION") == "1"


def _service_or_fail(what: str, err: Exception):
    if SKIP_INTEGRATION:
        pytest.skip(f"{what} unavailable and FOUNDRY_SKIP_INTEGRATION=1: {err}")
    pytest.fail(f"{what} is not reachable ({err}); start it or set FOUNDRY_SKIP_INTEGRATION=1", pytrace=False)


def use_ledger(monkeypatch, url: str, data_dir) -> str:
    """Point Foundry (settings + engines) at this ledger and data folder for one test."""
    monkeypatch.setenv("FOUNDRY_DATABASE_URL", url)
    monkeypatch.setenv("FOUNDRY_DATA_DIR", str(data_dir))
    reset_settings()
    ledger_db.dispose_all()
    forget_tenants()
    return url


def forget_tenants() -> None:
    """Workers cache known tenants per ledger for 30 s; a test that empties or swaps its ledger starts clean."""
    from domain import jobs

    jobs._known_tenants.clear()


def add_tenant(url: str, tenant: str = "acme", **budgets) -> str:
    with ledger_db.session_scope(url) as s:
        if s.get(Tenant, tenant) is None:
            s.add(Tenant(id=tenant, display_name=tenant, **budgets))
    return tenant


@pytest.fixture
def sqlite_ledger(tmp_path, monkeypatch) -> str:
    """A migrated SQLite ledger in a temporary data folder (no services needed)."""
    from domain.ledger.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    use_ledger(monkeypatch, url, tmp_path)
    upgrade(url)
    yield url
    ledger_db.dispose_all()
    reset_settings()


@pytest.fixture
def ledger(sqlite_ledger, monkeypatch) -> str:
    """The SQLite ledger with tenant ``acme`` and fault injection allowed (noop jobs that fail or sleep on
    request). A test module adds what it needs by overriding it: ``def ledger(ledger, ...)``."""
    monkeypatch.setenv("FOUNDRY_ALLOW_FAULT_INJECTION", "1")
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    return sqlite_ledger


@contextlib.contextmanager
def throwaway_pg_database(prefix: str, admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A new, empty (unmigrated) PostgreSQL database; dropped at the end, this process's connections first."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except BaseException:
        admin.dispose()
        raise
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        ledger_db.dispose_all()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated to head; dropped at the end."""
    from domain.ledger.migrate import upgrade

    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_pg_database("foundry_test"))
        except Exception as exc:  # noqa: BLE001
            _service_or_fail("PostgreSQL", exc)
        upgrade(url)
        yield url


@pytest.fixture
def pg_ledger(pg_database, tmp_path, monkeypatch) -> str:
    """The run's PostgreSQL ledger, emptied, with Foundry pointed at it."""
    eng = create_engine(pg_database)
    with eng.begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    eng.dispose()
    use_ledger(monkeypatch, pg_database, tmp_path)
    yield pg_database
    ledger_db.dispose_all()
    reset_settings()


@pytest.fixture
def redis_url() -> str:
    """The test Redis database, flushed."""
    import redis

    try:
        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        r.flushdb()
    except Exception as exc:  # noqa: BLE001
        _service_or_fail("Redis", exc)
    yield REDIS_URL
    r.flushdb()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.fixtures.tiny_models import tiny_tokenizer as make

    return make()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama model saved to disk, loadable by path like any real model."""
    from tests.fixtures.tiny_models import tiny_model

    d = tmp_path_factory.mktemp("tiny-model")
    model = tiny_model(tiny_tokenizer)
    model.save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    return d


# ---- an S3-compatible store on loopback (the artifact store's tests) --------------------------------
# moto's server mode by default; a real MinIO (or any S3) when FOUNDRY_TEST_S3_URL names its endpoint
# (http://host:9000), with credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.

class S3Server:
    """A loopback S3 endpoint the tests can stop and start again on the same port (moto keeps its data)."""

    def __init__(self) -> None:
        self.external = os.environ.get("FOUNDRY_TEST_S3_URL", "")
        self.port = 0
        self._server = None
        self.start()

    @property
    def endpoint(self) -> str:
        return self.external or f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.external or self._server is not None:
            return
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_store(s3_server, monkeypatch) -> dict:
    """A fresh bucket on the loopback S3 endpoint; returns the FOUNDRY_* settings that point at it."""
    import boto3

    if not s3_server.external:  # moto takes any credentials; a real MinIO needs the user's own
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "foundry-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "foundry-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"foundry-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    env = {"FOUNDRY_ARTIFACT_URL": f"s3://{bucket}/store", "FOUNDRY_ARTIFACT_ENDPOINT_URL": s3_server.endpoint,
           "FOUNDRY_ARTIFACT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
           "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"], "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    from domain import storage

    storage._stores.clear()
    storage._caches.clear()
    yield {**env, "bucket": bucket, "server": s3_server}
    storage._stores.clear()
    storage._caches.clear()
