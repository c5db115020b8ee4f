"""Fusing the dense and keyword result lists.

- ``rrf``: weighted reciprocal rank fusion, ``sum_i w_i / (k + rank_i)`` over the lists a chunk appears in.
- ``linear``: a weighted sum of per-query normalized scores (dense cosine as is, BM25 divided by the query's
  best BM25 score), which keeps how much better the best match is, where RRF keeps only the order.

The defaults are what won on the standard-library docstring→function set (docs/retrieval.md, bench/retrieval.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FusionConfig:
    method: str = "linear"  # rrf | linear | dense | keyword
    dense_weight: float = 1.0
    keyword_weight: float = 0.25
    rrf_k: float = 60.0
    depth: int = 100  # candidates taken from each list before fusing


DEFAULT_FUSION = FusionConfig()


def rrf(rankings: list[list[int]], weights: list[float], k: float = 60.0) -> dict[int, float]:
    """Weighted reciprocal rank fusion of ranked lists of keys (best first)."""
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return fused


def linear(dense: dict[int, float], keyword: dict[int, float], dense_weight: float, keyword_weight: float) -> dict[int, float]:
    """Weighted sum of dense cosine and max-normalized BM25 scores (a missing score counts as 0)."""
    top = max(keyword.values(), default=0.0)
    fused: dict[int, float] = {}
    for key in set(dense) | set(keyword):
        kw = keyword.get(key, 0.0) / top if top > 0 else 0.0
        fused[key] = dense_weight * dense.get(key, 0.0) + keyword_weight * kw
    return fused


def fuse(dense: dict[int, float], keyword: dict[int, float], config: FusionConfig) -> list[tuple[int, float]]:
    """Keys with their fused score, best first. ``dense``/``keyword`` map key → score (higher is better)."""
    if config.method == "dense":
        fused = dict(dense)
    elif config.method == "keyword":
        fused = dict(keyword)
    elif config.method == "rrf":
        rank = lambda d: [k for k, _ in sorted(d.items(), key=lambda kv: -kv[1])]  # noqa: E731
        fused = rrf([rank(dense), rank(keyword)], [config.dense_weight, config.keyword_weight], config.rrf_k)
    elif config.method == "linear":
        fused = linear(dense, keyword, config.dense_weight, config.keyword_weight)
    else:
        raise ValueError(f"unknown fusion method {config.method!r} (rrf | linear | dense | keyword)")
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def top_keyword(scores: np.ndarray, depth: int) -> dict[int, float]:
    """Positions and scores of the ``depth`` best BM25 hits with a positive score."""
    if not len(scores):
        return {}
    depth = min(depth, len(scores))
    idx = np.argpartition(-scores, depth - 1)[:depth]
    return {int(i): float(scores[i]) for i in idx if scores[i] > 0}
