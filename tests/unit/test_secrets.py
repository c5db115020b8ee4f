"""Secrets from files (FOUNDRY_X_FILE, FLOWER_BASIC_AUTH_FILE ...), and the database password URL-encoded."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from domain.config import Settings
from domain.secrets import secret

PASSWORD = "p@ss:w/rd%?#"  # every character that breaks a URL when pasted raw


def test_database_password_file_is_url_encoded_into_the_url(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    monkeypatch.setenv("FOUNDRY_DATABASE_URL", "postgresql+psycopg://foundry@postgres:5432/foundry")
    monkeypatch.setenv("FOUNDRY_DATABASE_PASSWORD_FILE", str(tmp_path / "pw"))
    url = make_url(Settings().ledger_url)
    assert (url.username, url.password, url.host, url.port, url.database) == ("foundry", PASSWORD, "postgres", 5432, "foundry")
    assert PASSWORD not in repr(Settings())


def test_any_setting_may_come_from_a_file_and_the_variable_wins(tmp_path, monkeypatch):
    (tmp_path / "attempts").write_text("7\n")
    monkeypatch.setenv("FOUNDRY_MAX_ATTEMPTS_FILE", str(tmp_path / "attempts"))
    assert Settings().max_attempts == 7
    monkeypatch.setenv("FOUNDRY_MAX_ATTEMPTS", "5")
    assert Settings().max_attempts == 5


def test_an_unreadable_secret_file_names_the_variable(tmp_path):
    with pytest.raises(RuntimeError, match="FLOWER_BASIC_AUTH_FILE="):
        secret("FLOWER_BASIC_AUTH", {"FLOWER_BASIC_AUTH_FILE": str(tmp_path / "missing")})
    assert secret("FLOWER_BASIC_AUTH", {}) is None
    assert secret("X", {"X": "direct", "X_FILE": str(tmp_path / "missing")}) == "direct"


def test_metrics_credentials_from_files(tmp_path, monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.delenv("FOUNDRY_METRICS_PASSWORD", raising=False)
    monkeypatch.setenv("FOUNDRY_METRICS_USER", "prom")
    monkeypatch.setenv("FOUNDRY_METRICS_PASSWORD_FILE", str(tmp_path / "missing"))
    assert main(["metrics", "serve", "--port", "0"]) != 0
    assert "FOUNDRY_METRICS_PASSWORD_FILE=" in capsys.readouterr().err
