"""The BM25 keyword index (bm25s) with code-aware tokenization.

``parse_json_string`` → ``parse``, ``json``, ``string`` and the whole ``parse_json_string``; ``HTTPServerError``
→ ``http``, ``server``, ``error`` and ``httpservererror``: a query in words finds code written in identifiers,
and an exact identifier still matches best.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG

STOPWORDS = frozenset("""a an and are as at be been but by for from has have if in into is it its of on or that the
their then there these this to was were will with which when where who whom whose not no can may should would
self cls none true false return def""".split())


def tokenize(text: str) -> list[str]:
    """Lowercased tokens: each identifier, plus its snake_case/camelCase parts; stopwords dropped."""
    out: list[str] = []
    for word in _WORD.findall(text):
        parts = [p for piece in word.split("_") if piece for p in _CAMEL.findall(piece)]
        whole = word.strip("_").lower()
        if whole and whole not in STOPWORDS and (len(parts) != 1 or len(whole) > 1):
            out.append(whole)
        if len(parts) > 1:
            out.extend(p.lower() for p in parts if len(p) > 1 and p.lower() not in STOPWORDS)
    return out


class KeywordIndex:
    """BM25 over chunk texts; row i is the i-th chunk of the snapshot."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        import bm25s

        self.k1, self.b = k1, b
        self.bm25 = bm25s.BM25(k1=k1, b=b)
        self.size = 0

    def build(self, token_lists: list[list[str]]) -> "KeywordIndex":
        self.size = len(token_lists)
        if self.size:
            # a placeholder token keeps bm25s happy with chunks that have no tokens at all
            self.bm25.index([toks or ["\x01empty"] for toks in token_lists], show_progress=False)
        return self

    def scores(self, query: str | list[str]) -> np.ndarray:
        """BM25 score of every chunk for the query (zeros when nothing matches)."""
        if not self.size:
            return np.zeros(0, dtype=np.float32)
        tokens = tokenize(query) if isinstance(query, str) else query
        ids = self.bm25.get_tokens_ids(tokens)
        if not ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.bm25.get_scores(ids), dtype=np.float32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "keyword.json").write_text(json.dumps({"size": self.size, "k1": self.k1, "b": self.b}))
        if self.size:
            self.bm25.save(str(folder / "bm25"))  # .npy arrays (allow_pickle=False) and JSON

    @classmethod
    def load(cls, folder: Path) -> "KeywordIndex":
        import bm25s

        meta = json.loads((folder / "keyword.json").read_text())
        index = cls(k1=meta["k1"], b=meta["b"])
        index.size = meta["size"]
        if index.size:
            index.bm25 = bm25s.BM25.load(str(folder / "bm25"), load_corpus=False, mmap=False)
        return index
