"""Migrations on PostgreSQL: upgrade from empty, check clean, downgrade to base, views answer."""

import contextlib

import pytest
from sqlalchemy import create_engine, inspect, text

from domain.ledger.migrate import alembic_config, check, upgrade
from tests.conftest import _service_or_fail, throwaway_pg_database

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_pg():
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_pg_database("foundry_mig"))
        except Exception as exc:  # noqa: BLE001
            _service_or_fail("PostgreSQL", exc)
        yield url


def test_upgrade_check_downgrade(empty_pg):
    from alembic import command

    upgrade(empty_pg)
    check(empty_pg)
    eng = create_engine(empty_pg)
    insp = inspect(eng)
    assert {"jobs", "adapter_versions", "usage_costs", "checkpoints", "health_events", "artifacts"} <= set(insp.get_table_names())
    idx = {i["name"] for i in insp.get_indexes("jobs")}
    assert {"ix_jobs_open", "ix_jobs_failed", "ix_jobs_finished", "ix_jobs_tenant_enqueued"} <= idx
    with eng.connect() as conn:
        for v in ("v_review_audit", "v_job_failures", "v_costs_daily", "v_adapter_lineage", "v_job_attempts"):
            conn.execute(text(f"SELECT * FROM {v}")).all()
    eng.dispose()
    command.downgrade(alembic_config(empty_pg), "base")
    eng = create_engine(empty_pg)
    assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
    eng.dispose()
