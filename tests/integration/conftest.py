"""Fixtures shared by the integration tests (real Redis, PostgreSQL and worker processes)."""

import pytest

from tests.conftest import add_tenant
from tests.integration.workers import apply_env, worker_env


@pytest.fixture
def env(redis_url, pg_ledger, tmp_path, monkeypatch):
    """Worker environment on the test Redis and PostgreSQL, applied to this process too, with tenant acme."""
    e = worker_env(redis_url, pg_ledger, tmp_path)
    apply_env(monkeypatch, e)

    add_tenant(pg_ledger, "acme")
    return e
