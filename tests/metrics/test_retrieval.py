import numpy as np
import pytest
import torch

from broadface.metrics import cmc, faiss_available, knn, map_at_r, recall_at_k, tpir_at_fpir

# Unit vectors at these angles (degrees); nearest neighbours worked out by angular distance.
ANGLES = np.array([0, 15, 50, 28, 110])
LABELS = np.array(["A", "A", "A", "B", "B"])
EMB = np.stack([np.cos(np.radians(ANGLES)), np.sin(np.radians(ANGLES))], 1)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")


def clusters(n=600, d=24, classes=60, noise=1.2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, d))[y] + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), y


def brute_order(q, g, exclude_self=False):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn.astype(np.float64) @ gn.T.astype(np.float64)
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")


def test_hand_computed_recall_and_map():
    # neighbours: A0 -> A15, B28 | A15 -> B28, A0 | A50 -> B28, A15 | B28 -> A15, A50 | B110 -> A50, B28
    assert recall_at_k(EMB, LABELS, ks=(1, 2)) == {1: 0.2, 2: 0.8}
    # AP@R: A0 (R=2) [A, B] -> 1/2; A15 [B, A] -> (1/2)(1/2); A50 [B, A] -> 1/4; B28 (R=1) [A] -> 0; B110 [A] -> 0
    assert map_at_r(EMB, LABELS) == pytest.approx((0.5 + 0.25 + 0.25) / 5)


def test_recall_and_map_match_brute_force():
    x, y = clusters()
    order = brute_order(x, x, exclude_self=True)[:, :-1]
    ref = {k: np.mean((y[order[:, :k]] == y[:, None]).any(1)) for k in (1, 2, 4, 8)}
    got = recall_at_k(x, y, chunk=97)
    assert got == pytest.approx(ref, abs=0)
    aps = []
    for i in range(len(y)):
        r = int((y == y[i]).sum()) - 1
        if r:
            rel = y[order[i, :r]] == y[i]
            aps.append(np.sum(np.cumsum(rel) / np.arange(1, r + 1) * rel) / r)
    assert map_at_r(torch.from_numpy(x), torch.from_numpy(y), chunk=50) == pytest.approx(np.mean(aps), abs=1e-12)


def test_query_vs_gallery_retrieval():
    x, y = clusters(seed=1)
    q, qy, g, gy = x[:200], y[:200], x[200:], y[200:]
    order = brute_order(q, g)
    ref = {k: np.mean((gy[order[:, :k]] == qy[:, None]).any(1)) for k in (1, 5)}
    assert recall_at_k(q, qy, ks=(1, 5), gallery=g, gallery_labels=gy) == pytest.approx(ref, abs=0)
    with pytest.raises(ValueError, match="both gallery and gallery_labels"):
        recall_at_k(q, qy, gallery=g)


def test_cmc_with_distractors_matches_brute_force():
    x, y = clusters(n=500, seed=2)
    rng = np.random.default_rng(5)
    distractors = rng.normal(size=(300, x.shape[1])).astype(np.float32) * 3
    gallery_idx = np.unique(y, return_index=True)[1]
    probe_idx = np.setdiff1d(np.arange(len(y)), gallery_idx)
    g = np.concatenate([x[gallery_idx], distractors])
    gy = np.concatenate([y[gallery_idx], np.full(300, -1)])
    order = brute_order(x[probe_idx], g)
    ref = {r: np.mean((gy[order[:, :r]] == y[probe_idx, None]).any(1)) for r in (1, 5, 10)}
    got = cmc(x[probe_idx], y[probe_idx], x[gallery_idx], y[gallery_idx], distractors=distractors, chunk=64)
    assert got == pytest.approx(ref, abs=0)
    assert got[1] < cmc(x[probe_idx], y[probe_idx], x[gallery_idx], y[gallery_idx])[1]  # distractors cost accuracy
    with pytest.raises(ValueError, match="closed-set"):
        cmc(x, y, x[:5], y[:5])


def test_tpir_at_fpir_matches_brute_force():
    x, y = clusters(n=800, classes=80, seed=3)
    in_gallery = np.arange(40)
    gallery_idx = np.unique(y, return_index=True)[1][in_gallery]
    probe_idx = np.setdiff1d(np.arange(len(y)), gallery_idx)
    g, gy, p, py = x[gallery_idx], y[gallery_idx], x[probe_idx], y[probe_idx]
    r = tpir_at_fpir(p, py, g, gy, fpirs=(0.01, 0.1, 0.5))
    s = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    mated = np.isin(py, gy)
    top = s.max(1)
    top_is_mate = gy[s.argmax(1)] == py
    for f, t, thr in zip(r.fpirs, r.tpirs, r.thresholds):
        fpir = np.mean(top[~mated] > thr)
        assert fpir <= f
        # the threshold is the lowest one keeping FPIR <= target: lowering it to the next score breaks it
        lower = np.sort(top[~mated])[::-1][int(np.floor(f * (~mated).sum()))] if f < 1 else -np.inf
        assert thr == pytest.approx(lower, abs=1e-6)
        assert t == pytest.approx(np.mean(top_is_mate[mated] & (top[mated] > thr)), abs=1e-12)
    assert r.n_mated == int(mated.sum()) and r.n_non_mated == int((~mated).sum())


@needs_faiss
def test_faiss_backend_equals_torch():
    x, y = clusters(n=700, seed=4)
    for excl in (True, False):
        a = knn(x / np.linalg.norm(x, axis=1, keepdims=True), [x / np.linalg.norm(x, axis=1, keepdims=True)], 7,
                exclude_self=excl, backend="torch", chunk=100)
        xn = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))
        b = knn(xn, [xn], 7, exclude_self=excl, backend="faiss", chunk=100)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert recall_at_k(x, y, backend="faiss") == recall_at_k(x, y, backend="torch")
    assert map_at_r(x, y, backend="faiss") == map_at_r(x, y, backend="torch")


def test_small_gallery_pads_with_minus_one():
    nb = knn(np.eye(3, dtype=np.float32), [np.eye(3, dtype=np.float32)], 5, exclude_self=True, backend="torch")
    assert (nb.indices[:, 2:] == -1).all() and np.isneginf(nb.scores[:, 2:]).all()


def test_input_errors():
    with pytest.raises(ValueError, match="all-zero"):
        recall_at_k(np.zeros((3, 2)), [0, 0, 1])
    with pytest.raises(ValueError, match="labels must be 1-D with 5"):
        recall_at_k(EMB, ["A"])
    with pytest.raises(ValueError, match="backend"):
        recall_at_k(EMB, LABELS, backend="annoy")
