"""Code-aware tokenization, BM25, dense index semantics (exact and HNSW with tombstones), and rank fusion."""

import numpy as np
import pytest

from domain.retrieval.dense import DenseIndex
from domain.retrieval.embedding import HashingEmbedder
from domain.retrieval.fusion import FusionConfig, fuse, linear, rrf, top_keyword
from domain.retrieval.keyword import KeywordIndex, tokenize


def test_tokenize_splits_identifiers_and_keeps_them():
    toks = tokenize("def parse_json_string(self): raise HTTPServerError(getURLPath())")
    for t in ("parse_json_string", "parse", "json", "string", "httpservererror", "http", "server", "error",
              "geturlpath", "get", "url", "path"):
        assert t in toks
    assert "self" not in toks and "def" not in toks


def test_bm25_finds_identifiers_from_words(tmp_path):
    texts = ["def parse_json(s): return loads(s)", "class HttpServer: pass", "def close_file(f): f.close()"]
    kw = KeywordIndex().build([tokenize(t) for t in texts])
    assert int(np.argmax(kw.scores("parse some json"))) == 0
    assert int(np.argmax(kw.scores("an http server"))) == 1
    assert not kw.scores("nothing matches here").any()
    kw.save(tmp_path)
    again = KeywordIndex.load(tmp_path)
    assert np.allclose(again.scores("close the file"), kw.scores("close the file"))


def test_bm25_matches_bm25s_and_updates_in_place():
    import bm25s

    texts = ["def parse_json(s): return loads(s)", "class HttpServer: serve forever", "def close_file(f): f.close()",
             "json http parse server file", "file file file handle"]
    toks = [tokenize(t) for t in texts]
    ours = KeywordIndex(k1=1.2, b=0.75).build(toks)
    ref = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    ref.index(toks, show_progress=False)
    for q in ("parse json", "http server file", "close the file handle"):
        assert np.allclose(ours.scores(q), ref.get_scores(tokenize(q)), atol=1e-5)
    # drop rows 1 and 3, append two new chunks: same scores as indexing the result from scratch
    new = [tokenize("parse parse json here"), tokenize("a brand new server")]
    updated = ours.updated(np.array([True, False, True, False, True]), new)
    ref2 = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    ref2.index([toks[0], toks[2], toks[4]] + new, show_progress=False)
    for q in ("parse json", "new server", "file"):
        assert np.allclose(updated.scores(q), ref2.get_scores(tokenize(q)), atol=1e-5)
    assert ours.size == 5 and updated.size == 5  # the original is untouched


def test_rrf_weights_and_constant():
    fused = rrf([[1, 2, 3], [3, 2, 1]], [1.0, 1.0], k=60)
    assert fused[2] == pytest.approx(2 / 62)
    assert fused[1] == fused[3]
    heavy_dense = rrf([[1, 2, 3], [3, 2, 1]], [1.0, 0.3], k=60)
    assert heavy_dense[1] > heavy_dense[3]


def test_linear_fusion_normalizes_bm25_per_query():
    fused = linear({1: 0.5, 2: 0.4}, {2: 20.0, 3: 10.0}, 1.0, 0.5)
    assert fused[2] == pytest.approx(0.4 + 0.5)
    assert fused[3] == pytest.approx(0.25)
    assert fused[1] == pytest.approx(0.5)


def test_fuse_orders_and_methods():
    dense, kw = {1: 0.9, 2: 0.5}, {2: 9.0, 3: 1.0}
    assert [k for k, _ in fuse(dense, kw, FusionConfig("dense"))] == [1, 2]
    assert [k for k, _ in fuse(dense, kw, FusionConfig("keyword"))] == [2, 3]
    assert [k for k, _ in fuse(dense, kw, FusionConfig("rrf", 1.0, 1.0))][0] == 2  # in both lists
    with pytest.raises(ValueError):
        fuse(dense, kw, FusionConfig("max"))
    assert top_keyword(np.array([0.0, 3.0, 1.0, 0.0]), 10) == {1: 3.0, 2: 1.0}


def _vectors(n, dim=32, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_dense_upsert_and_delete(kind, tmp_path):
    x = _vectors(300)
    index = DenseIndex(32, kind)
    index.add(np.arange(300) + 1000, x)
    _, ids = index.search(x[:5], 1)
    assert list(ids[:, 0]) == [1000, 1001, 1002, 1003, 1004]
    index.remove([1000, 1001])
    _, ids = index.search(x[:2], 10)
    assert 1000 not in ids and 1001 not in ids
    assert index.live == 298
    if kind == "hnsw":
        assert index.tombstones == {1000, 1001}
    index.add(np.array([5000]), x[:1])  # upsert = remove + add under a fresh id (the builder never reuses ids)
    index.save(tmp_path)
    again = DenseIndex.load(tmp_path)
    assert again.kind == kind and again.live == index.live == 299
    _, ids = again.search(x[:3], 1)
    assert list(ids[:, 0])[0] == 5000 and ids[2, 0] == 1002
    _, ids = again.search(x[:2], 10)
    assert 1000 not in ids and 1001 not in ids  # tombstones survive a save/load


def test_hnsw_compaction_and_kind_by_size():
    x = _vectors(400)
    small = DenseIndex.build(32, np.arange(50), x[:50], exact_max=100)
    big = DenseIndex.build(32, np.arange(400), x, exact_max=100)
    assert small.kind == "flat" and big.kind == "hnsw"
    assert not big.needs_rebuild(0.2, 100)
    big.remove(range(100))
    assert big.needs_rebuild(0.2, 100)
    compact = big.rebuilt(100)
    assert compact.kind == "hnsw" and not compact.tombstones and compact.live == 300
    ids, vecs = compact.all_vectors()
    assert sorted(ids) == list(range(100, 400))
    assert np.allclose(vecs[np.argsort(ids)], x[100:], atol=1e-6)
    # exact search agrees with HNSW at this size
    _, exact = DenseIndex.build(32, np.arange(400), x, exact_max=10_000).search(x[:20], 10)
    _, approx = DenseIndex.build(32, np.arange(400), x, exact_max=10).search(x[:20], 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert overlap >= 0.9


def test_hashing_embedder_is_deterministic_and_normalized():
    e = HashingEmbedder(64)
    a = e.encode(["parse json", "parse json", "http server"])
    assert np.allclose(a[0], a[1]) and np.allclose(np.linalg.norm(a, axis=1), 1.0)
    assert float(a[0] @ a[2]) < 0.9
