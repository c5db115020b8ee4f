"""Real retrieval evaluation sets: docstring → function pairs from the Python standard library, and the
same from installed third-party packages (a second set, written by other people in other styles).

Every module-level function and method with a docstring of at least ``min_words`` words becomes one pair:
the query is the docstring (cleaned), the target document is the function's source with the docstring cut
out (otherwise the answer would contain the question). The selection is deterministic (sorted files, then
an order by a hash of the id), so tests and the benchmark see the same pairs on every machine with the same
Python version.

    pairs = stdlib_pairs(limit=300)
    pairs = package_pairs(("pydantic", "sqlalchemy", "celery", "kombu"))   # from site-packages; the set depends
                                                                         # on the installed versions (package_versions)
    ranked = {p.id: [doc ids, best first] for p in pairs}
    metrics(ranked, pairs)   # {"mrr@10": ..., "recall@10": ..., "queries": ...}
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "tkinter",
             "__pycache__", "venv", "pydoc_data", "encodings", "distutils"}


@dataclass(frozen=True)
class Pair:
    id: str  # "module.path:Qualified.name" = the target document's id
    query: str  # the docstring
    text: str  # the function without its docstring
    path: str  # file path relative to the standard library root


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, under: tuple[str, ...] = ()) -> list[Path]:
    """The .py files below ``root`` (or only below its folders ``under``), test/tooling folders skipped."""
    tops = [root / u for u in under] if under else [root]
    return sorted(p for top in tops for p in top.rglob("*.py")
                  if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{sub.name}", sub


def _without_docstring(lines: list[str], node) -> str:
    doc = node.body[0]
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    kept = lines[start:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    indent = len(kept[0]) - len(kept[0].lstrip()) if kept else 0
    return "".join(line[indent:] if line[:indent].strip() == "" else line for line in kept)


def pairs_in_file(path: Path, root: Path, min_words: int = 6) -> list[Pair]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    lines = source.splitlines(keepends=True)
    out = []
    for qualname, node in _functions(tree):
        doc = ast.get_docstring(node)
        if not doc or len(doc.split()) < min_words or len(node.body) < 2:
            continue
        text = _without_docstring(lines, node)
        body_lines = [ln for ln in text.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
        if len(body_lines) < 2:  # `pass` / `raise NotImplementedError`: nothing to find
            continue
        out.append(Pair(id=f"{module}:{qualname}", query=inspect.cleandoc(doc), text=text,
                        path=str(path.relative_to(root))))
    return out


def stdlib_pairs(limit: int | None = None, min_words: int = 6, root: Path | None = None) -> list[Pair]:
    """Up to ``limit`` docstring→function pairs, deterministic; duplicates (same function text) dropped."""
    pairs = _all_pairs(min_words, root or stdlib_root())
    return list(pairs[:limit] if limit else pairs)


PACKAGES = ("pydantic", "sqlalchemy", "celery", "kombu")


def package_root(name: str) -> Path:
    """The folder holding the installed package ``name`` (its site-packages), found without importing it."""
    from importlib import metadata

    try:  # from the installed distribution's record: no import, and no module that a test replaced
        root = Path(metadata.distribution(name).locate_file(""))
    except metadata.PackageNotFoundError:
        root = None
    if root is None or not (root / name).is_dir():
        raise LookupError(f"package {name!r} is not installed here")
    return root


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    from importlib.metadata import version

    return {n: version(n) for n in names}


def package_pairs(names: tuple[str, ...] = PACKAGES, limit: int | None = None, min_words: int = 6) -> list[Pair]:
    """Docstring→function pairs from installed third-party packages (all must live in one site-packages),
    with the same rules and order as ``stdlib_pairs``; ids and paths are relative to site-packages."""
    roots = {package_root(n) for n in names}
    if len(roots) != 1:
        raise LookupError(f"packages {names} are installed in several places: {sorted(map(str, roots))}")
    pairs = _all_pairs(min_words, roots.pop(), tuple(sorted(names)))
    return list(pairs[:limit] if limit else pairs)


@functools.lru_cache(maxsize=4)
def _all_pairs(min_words: int, root: Path, under: tuple[str, ...] = ()) -> tuple[Pair, ...]:
    seen: set[str] = set()
    pairs = []
    for path in _files(root, under):
        for p in pairs_in_file(path, root, min_words):
            key = hashlib.sha256(p.text.encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                pairs.append(p)
    pairs.sort(key=lambda p: hashlib.sha256(p.id.encode()).hexdigest())
    return tuple(pairs)


def metrics(ranked: dict[str, list[str]], pairs: list[Pair], k: int = 10) -> dict:
    """MRR@k and recall@k: ``ranked`` maps a pair id (its query) to the retrieved document ids, best first."""
    rr = hits = 0.0
    for p in pairs:
        docs = list(dict.fromkeys(ranked.get(p.id, [])))[:k]  # a document counts once (its best chunk)
        if p.id in docs:
            hits += 1
            rr += 1.0 / (docs.index(p.id) + 1)
    n = max(1, len(pairs))
    return {"mrr@10" if k == 10 else f"mrr@{k}": round(rr / n, 4), "recall@10" if k == 10 else f"recall@{k}": round(hits / n, 4),
            "queries": len(pairs)}
