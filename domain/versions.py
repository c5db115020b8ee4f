"""Versions of the libraries whose internals Foundry relies on, checked at start-up.

pip honours the same bounds (pyproject.toml; tests/unit/test_versions.py keeps the two in step), but an
environment can still drift (``pip install -U transformers``, a base image's own copy). A worker or a CLI
command then stops with one line naming the library, its version and the supported range, instead of
failing later inside a job.
"""

from __future__ import annotations

import re
from importlib import metadata

# distribution → (lowest supported, first unsupported, what depends on it)
SUPPORTED: dict[str, tuple[str, str, str]] = {
    "kombu": ("5.5", "5.8", "the Redis transport's restore and priority internals (worker/celery_app.py)"),
    "psycopg": ("3.1", "3.4", "libpq prepared statements through psycopg.pq/adapt (domain/ledger/db.py)"),
    "transformers": ("5.0", "5.40", "the KV-cache API of the review batcher (changes in 5.40)"),
    "peft": ("0.21", "0.22", "adapter hot-swap and mixed-adapter batches"),
    "bitsandbytes": ("0.46", "0.51", "NF4/FP4/INT8 quantization on CPU and CUDA"),
}
CLIENT = ("kombu", "psycopg")  # what the client and the operator commands use


def _release(version: str) -> tuple[int, ...]:
    """'5.24.0' → (5, 24, 0); local and pre-release tails are ignored ('2.13.0+cpu', '5.40.0.dev0')."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def problems(names: tuple[str, ...] | None = None) -> list[str]:
    """One sentence per installed library outside its supported range (absent libraries are not checked)."""
    found = []
    for name in names or tuple(SUPPORTED):
        low, high, why = SUPPORTED[name]
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if not _release(low) <= _release(version) < _release(high):
            found.append(f"{name} {version} is not supported: Foundry needs {name}>={low},<{high} for {why}; "
                         f"install a supported version (pip install 'foundry[worker]' picks one)")
    return found


def require(names: tuple[str, ...] | None = None) -> None:
    """Raise RuntimeError naming every unsupported library version (all of SUPPORTED by default)."""
    found = problems(names)
    if found:
        raise RuntimeError("; ".join(found))
