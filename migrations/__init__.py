"""Alembic migrations of the ledger (installed as the package ``foundry_migrations``; see domain/ledger/migrate.py)."""
