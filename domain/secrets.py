"""Secrets from files: any ``NAME`` may instead be given as ``NAME_FILE``, the path of a file holding the value
(compose and Kubernetes mount secrets as files under /run/secrets), so no password sits in an environment
file or on a command line. A value set directly wins over its ``_FILE``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pydantic_settings import PydanticBaseSettingsSource


def secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``NAME``'s value, or the content of the file ``NAME_FILE`` names (without its trailing newline)."""
    environ = os.environ if environ is None else environ
    if environ.get(name):
        return environ[name]
    path = environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise RuntimeError(f"{name}_FILE={path}: cannot read the secret ({exc.strerror})") from None


class FileSecretsSource(PydanticBaseSettingsSource):
    """pydantic-settings source: field ``x`` of a settings class with prefix ``P_`` from the file ``P_X_FILE``."""

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        prefix = self.settings_cls.model_config.get("env_prefix", "")
        name = f"{prefix}{field_name}".upper()
        value = None if os.environ.get(name) else secret(name)
        return value, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


def with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` set, URL-encoded (a raw '@' or ':' in a password would break the URL)."""
    if not password:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=password).render_as_string(hide_password=False)
