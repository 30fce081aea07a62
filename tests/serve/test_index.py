"""Search indexes against a brute-force reference written in the test."""
from __future__ import annotations

import numpy as np
import pytest

from broadface.serve.index import ExactIndex, SearchIndex, faiss_available, top_k

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed (pip install 'broadface[search]')")


@pytest.fixture(autouse=True)
def one_thread():
    """As the server runs faiss (``--threads 1``): its OpenMP team is slow to no purpose on a busy machine."""
    if not faiss_available():
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(rows: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[int]:
    scored = sorted(((float(v @ q), key) for key, v in rows.items()), key=lambda t: (-t[0], t[1]))
    return [key for _, key in scored[:k]]


def check(index, rows: dict[int, np.ndarray], queries: np.ndarray, k: int) -> None:
    for q in queries:
        keys, scores = index.search(q, k)
        assert keys.tolist() == brute(rows, q, k)
        np.testing.assert_allclose(scores, [rows[key] @ q for key in keys.tolist()], atol=1e-5)


def test_top_k_orders_best_first_with_ties_by_position():
    s = np.array([0.1, 0.9, 0.5, 0.9, -1.0])
    assert top_k(s, 3).tolist() == [1, 3, 2]
    assert top_k(s, 10).tolist() == [1, 3, 2, 0, 4]
    assert top_k(s, 0).tolist() == []


def test_exact_index_follows_upserts_and_removals():
    rng = np.random.default_rng(0)
    index, rows = ExactIndex(16), {}
    for step in range(400):  # grows past its initial capacity, removes from the middle, overwrites
        key = int(rng.integers(0, 120))
        if rng.random() < 0.3:
            index.remove(key)
            rows.pop(key, None)
        else:
            rows[key] = unit(rng, 1)[0]
            index.upsert(key, rows[key])
        assert len(index) == len(rows)
    check(index, rows, unit(rng, 5), k=7)


@needs_faiss
def test_faiss_index_exhaustive_probe_equals_exact_and_follows_writes():
    rng = np.random.default_rng(1)
    vectors = unit(rng, 2000)
    index = SearchIndex(16, "faiss", nprobe=10_000)  # every cell probed: must equal the exact answer
    index.bulk(np.arange(2000), vectors)
    assert index.describe()["kind"] == "faiss-ivf"
    rows = dict(enumerate(vectors))
    for key in range(0, 2000, 7):
        index.remove(key)
        rows.pop(key)
    for key in range(1, 300, 5):
        rows[key] = unit(rng, 1)[0]
        index.upsert(key, rows[key])
    check(index, rows, unit(rng, 10), k=5)


@needs_faiss
def test_auto_mode_switches_to_faiss_at_the_threshold_and_retrains_when_doubled():
    rng = np.random.default_rng(2)
    index = SearchIndex(16, "auto", faiss_min=100)
    vectors = unit(rng, 500)
    for key in range(99):
        index.upsert(key, vectors[key])
    assert index.faiss is None and index.describe()["kind"] == "exact"
    index.upsert(99, vectors[99])
    assert index.faiss is not None and index.faiss.trained_on == 100
    for key in range(100, 201):
        index.upsert(key, vectors[key])
    assert index.faiss.trained_on == 201  # doubled: trained again on every row
    for key in range(201):
        if key >= 99:
            index.remove(key)
    assert index.faiss is None and len(index) == 99


def test_exact_mode_never_builds_faiss_and_faiss_mode_needs_it(monkeypatch):
    index = SearchIndex(16, "exact", faiss_min=1)
    index.bulk(np.arange(50), unit(np.random.default_rng(3), 50))
    assert index.faiss is None
    monkeypatch.setattr("broadface.serve.index.faiss_available", lambda: False)  # as if not installed
    with pytest.raises(ValueError, match="pip install 'broadface\\[search\\]'"):
        SearchIndex(16, "faiss")
    with pytest.raises(ValueError, match="auto, exact or faiss"):
        SearchIndex(16, "hnsw")
