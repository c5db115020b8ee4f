"""The BM25 keyword index with code-aware tokenization, updatable in place.

``parse_json_string`` → ``parse``, ``json``, ``string`` and the whole ``parse_json_string``; ``HTTPServerError``
→ ``http``, ``server``, ``error`` and ``httpservererror``: a query in words finds code written in identifiers,
and an exact identifier still matches best.

Scoring is BM25 in Lucene's variant, the same numbers as ``bm25s`` (method "lucene"; a unit test checks
it). bm25s stores precomputed per-term scores that depend on corpus-wide statistics, so any change means
re-indexing everything; this index stores raw term frequencies instead (a sparse chunk × term matrix) and
computes the statistics at query time, so an update only tokenizes the changed chunks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from scipy import sparse

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
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
    """BM25 over chunk texts; row i is the i-th chunk of the snapshot. Immutable: ``updated`` returns a new one."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        self.tf = sparse.csr_matrix((0, 0), dtype=np.float32)  # chunks × terms, raw term frequencies
        self._csc: sparse.csc_matrix | None = None

    @property
    def size(self) -> int:
        return self.tf.shape[0]

    def _rows(self, token_lists: list[list[str]]) -> sparse.csr_matrix:
        """Term-frequency rows for new chunks (the vocabulary grows as needed)."""
        indptr, indices, data = [0], [], []
        for tokens in token_lists:
            counts: dict[int, int] = {}
            for t in tokens:
                tid = self.vocab.setdefault(t, len(self.vocab))
                counts[tid] = counts.get(tid, 0) + 1
            indices.extend(counts)
            data.extend(counts.values())
            indptr.append(len(indices))
        return sparse.csr_matrix((np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int32),
                                  np.asarray(indptr, dtype=np.int64)), shape=(len(token_lists), len(self.vocab)))

    def build(self, token_lists: list[list[str]]) -> "KeywordIndex":
        self.vocab = {}
        self.tf = self._rows(token_lists)
        self._csc = None
        return self

    def updated(self, keep: np.ndarray, new_token_lists: list[list[str]]) -> "KeywordIndex":
        """A new index with the rows where ``keep`` is true (in order), then rows for the new chunks."""
        out = KeywordIndex(self.k1, self.b)
        out.vocab = dict(self.vocab)
        new = out._rows(new_token_lists)
        kept = self.tf[np.flatnonzero(keep)] if self.size else sparse.csr_matrix((0, 0), dtype=np.float32)
        kept = sparse.csr_matrix((kept.data, kept.indices, kept.indptr), shape=(kept.shape[0], len(out.vocab)))
        out.tf = sparse.vstack([kept, new], format="csr", dtype=np.float32)
        return out

    def scores(self, query: str | list[str]) -> np.ndarray:
        """BM25 score of every chunk for the query (zeros when nothing matches)."""
        n = self.size
        scores = np.zeros(n, dtype=np.float32)
        tokens = tokenize(query) if isinstance(query, str) else query
        ids = [self.vocab[t] for t in tokens if t in self.vocab]
        if not n or not ids:
            return scores
        if self._csc is None:
            self._csc = self.tf.tocsc()
            self._lengths = np.asarray(self.tf.sum(axis=1)).ravel().astype(np.float32)
            avg = float(self._lengths.mean()) or 1.0
            self._norm = (self.k1 * ((1 - self.b) + self.b * self._lengths / avg)).astype(np.float32)
        csc = self._csc
        for tid, times in zip(*np.unique(np.asarray(ids), return_counts=True)):
            start, end = csc.indptr[tid], csc.indptr[tid + 1]
            if start == end:
                continue
            rows, tf = csc.indices[start:end], csc.data[start:end]
            df = end - start
            idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
            scores[rows] += times * idf * tf / (self._norm[rows] + tf)
        return scores

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "bm25_data.npy", self.tf.data, allow_pickle=False)
        np.save(folder / "bm25_indices.npy", self.tf.indices, allow_pickle=False)
        np.save(folder / "bm25_indptr.npy", self.tf.indptr, allow_pickle=False)
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        (folder / "keyword.json").write_text(json.dumps({"k1": self.k1, "b": self.b, "rows": self.size, "terms": terms}))

    @classmethod
    def load(cls, folder: Path) -> "KeywordIndex":
        meta = json.loads((folder / "keyword.json").read_text())
        index = cls(meta["k1"], meta["b"])
        index.vocab = {t: i for i, t in enumerate(meta["terms"])}
        arrays = [np.load(folder / f"bm25_{name}.npy", allow_pickle=False) for name in ("data", "indices", "indptr")]
        index.tf = sparse.csr_matrix(tuple(arrays), shape=(meta["rows"], len(index.vocab)))
        return index
