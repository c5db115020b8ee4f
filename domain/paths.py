"""Paths under the data root. Everything the ledger stores is relative to it; resolving refuses escapes."""

from __future__ import annotations

import hashlib
import os
import shutil
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


def sha256_tree(path: str | os.PathLike) -> str:
    """The sha256 recorded for a folder: names and contents of its regular files in sorted order, skipping
    dot-files (caches a library writes next to weights after the fact must not change the digest)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# ---- a folder is either absent or complete: build it under a staging name, then rename it --------------

def fresh_dir(path: Path) -> Path:
    """An empty staging folder at ``path`` (what an interrupted earlier attempt left there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_dir(staging: Path, dest: Path) -> None:
    """Move a finished folder into place (a redelivered job replaces its own earlier copy)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)
