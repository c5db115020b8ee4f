"""Paths under the data root. Everything the ledger stores is relative to it; resolving refuses escapes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from domain.config import get_settings


class UnsafePath(ValueError):
    """A path that leaves the data root (``..``, absolute elsewhere, or a symlink pointing out)."""


def data_root() -> Path:
    root = get_settings().data_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_in_data_root(rel: str | os.PathLike) -> Path:
    """The absolute path of ``rel`` under the data root, after following symlinks; raises UnsafePath if outside."""
    root = data_root()
    p = Path(rel)
    if ".." in p.parts:
        raise UnsafePath(f"path {str(rel)!r} contains '..'")
    full = (p if p.is_absolute() else root / p).resolve()
    if full != root and root not in full.parents:
        raise UnsafePath(f"path {str(rel)!r} resolves outside the data root {root}")
    return full


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

