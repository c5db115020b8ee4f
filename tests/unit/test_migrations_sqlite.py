"""`alembic upgrade head` from empty and `alembic check` on SQLite; the audit views answer."""

from sqlalchemy import create_engine, inspect, text

from domain.ledger.migrate import check, upgrade
from domain.ledger.models import Base

VIEWS = ["v_review_audit", "v_job_failures", "v_costs_daily", "v_adapter_lineage", "v_job_attempts"]


def test_upgrade_from_empty_and_check_clean(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    check(url)  # raises if the models and the migrations disagree
    eng = create_engine(url)
    insp = inspect(eng)
    assert set(Base.metadata.tables) <= set(insp.get_table_names())
    assert set(VIEWS) <= set(insp.get_view_names())
    with eng.connect() as conn:
        for v in VIEWS:
            conn.execute(text(f"SELECT * FROM {v}")).all()
    eng.dispose()


def test_upgrade_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    upgrade(url)
    check(url)
