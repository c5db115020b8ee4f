"""The ledger: the system of record for jobs, adapters, costs, checkpoints, artifacts and health."""

from domain.ledger.db import dispose_all, get_engine, session_scope  # noqa: F401
