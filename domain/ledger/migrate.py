"""Run the Alembic migrations from code (``foundry db upgrade``, the embedded default and tests), same as
``alembic upgrade head``.

In a checkout the migrations are the top-level ``migrations/`` folder (next to ``alembic.ini``); an installed
wheel carries that folder as the package ``foundry_migrations``. The checkout wins, so tests run from a work
tree migrate with that tree's revisions even when another copy of Foundry is installed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``."""
    if (CHECKOUT / "alembic.ini").is_file() and (CHECKOUT / "migrations" / "env.py").is_file():
        return CHECKOUT / "migrations"
    try:
        return Path(str(resources.files("foundry_migrations")))
    except ModuleNotFoundError:
        raise RuntimeError("Foundry's migrations are missing: neither a checkout's migrations/ folder nor the "
                           "installed foundry_migrations package was found (reinstall foundry)") from None


def alembic_config(url: str | None = None):
    from alembic.config import Config

    from domain.config import get_settings

    cfg = Config()  # alembic.ini only configures logging, which Foundry does itself
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().ledger_url).replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def check(url: str | None = None) -> None:
    """Raise if the models and the migrations disagree (``alembic check``)."""
    from alembic import command

    command.check(alembic_config(url))
