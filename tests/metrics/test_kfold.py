import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold

from broadface.metrics import kfold_accuracy, kfold_splits
from bench.reference import insightface_kfold

# Two folds of four pairs, distances; worked through by hand in the comments below.
DIST = np.array([0.2, 1.0, 2.0, 3.0, 0.4, 2.2, 1.2, 3.5])
SAME = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
GRID = [0.5, 1.5, 2.5]
VGRID = [0.0, 1.0, 2.0, 3.0, 4.0]


def test_hand_computed_accuracy():
    r = kfold_accuracy(DIST, SAME, folds=2, distance=True, thresholds=GRID, val_thresholds=VGRID)
    # fold 0 tested: on fold 1, t=0.5 and t=2.5 both give 3/4, the first wins -> fold 0 at d<0.5 = 3/4
    # fold 1 tested: on fold 0, t=1.5 gives 4/4 -> fold 1 at d<1.5 accepts 0.4 (same) and 1.2 (diff) = 2/4
    np.testing.assert_array_equal(r.accuracies, [0.75, 0.5])
    np.testing.assert_array_equal(r.thresholds, [0.5, 1.5])
    assert r.accuracy_mean == 0.625 and r.accuracy_std == 0.125
    assert r.best_threshold == 0.5  # all three thresholds give 6/8 overall: first one


def test_hand_computed_val_interpolation():
    # FAR on the training fold is piecewise constant on the grid; scipy's slinear interpolation takes
    # the last grid point whose FAR <= target and interpolates towards the next one.
    r = kfold_accuracy(DIST, SAME, folds=2, distance=True, thresholds=GRID, val_thresholds=VGRID, far_target=0.25)
    # fold 1 FAR: [0, 0, .5, .5, 1] -> t = 1 + (0.25 / 0.5) = 1.5 -> fold 0 accepts 0.2, 1.0: VAL 1, FAR 0
    # fold 0 FAR: [0, 0, 0, .5, 1]  -> t = 2.5 -> fold 1 accepts 0.4, 2.2, 1.2: VAL 1, FAR 0.5
    assert (r.val, r.val_std, r.far) == (1.0, 0.0, 0.25)
    r = kfold_accuracy(DIST, SAME, folds=2, distance=True, thresholds=GRID, val_thresholds=VGRID, far_target=0.5)
    # target on a plateau: both folds interpolate to t = 3 (upper end) -> FAR 0.5 on each test fold
    assert (r.val, r.far) == (1.0, 0.5)


def test_similarity_mode_matches_distance_mode_on_mapped_grid():
    sim = 1.0 - DIST / 2.0
    r_d = kfold_accuracy(DIST, SAME, folds=2, distance=True, thresholds=GRID)
    r_s = kfold_accuracy(sim, SAME, folds=2, thresholds=[1.0 - t / 2 for t in GRID])
    np.testing.assert_array_equal(r_d.accuracies, r_s.accuracies)
    np.testing.assert_allclose(r_s.thresholds, 1.0 - r_d.thresholds / 2)


def test_folds_match_sklearn_kfold():
    for n, k in [(6000, 10), (103, 10), (7, 3), (5, 1)]:
        ours = kfold_splits(n, k)
        theirs = [test for _, test in KFold(k).split(np.arange(n))] if k > 1 else [np.arange(n)]
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_insightface_reimplementation(seed):
    rng = np.random.default_rng(seed)
    n = 600
    same = rng.random(n) < 0.5
    e1 = rng.normal(size=(n, 16))
    e2 = e1 * same[:, None] * rng.uniform(0.5, 2.0) + rng.normal(size=(n, 16))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum((e1 - e2) ** 2, 1)
    if seed == 2:
        dist = np.round(dist, 2)  # many distances exactly on the accuracy grid
    ref = insightface_kfold(dist, same)
    r = kfold_accuracy(dist, same, distance=True)
    assert r.accuracy_mean == ref["accuracy"] and r.accuracy_std == ref["accuracy_std"]
    np.testing.assert_array_equal(r.thresholds, ref["thresholds"])
    assert (r.val, r.val_std, r.far) == (ref["val"], ref["val_std"], ref["far"])
    # cosine similarities on the mapped grid: same numbers unless a score sits exactly on the grid
    if seed != 2:
        assert kfold_accuracy(1.0 - dist / 2, same).accuracy_mean == ref["accuracy"]


def test_accepts_torch_and_reports_roc():
    rng = np.random.default_rng(3)
    same = rng.random(200) < 0.5
    sim = rng.normal(size=200) * 0.2 + same * 0.5
    r = kfold_accuracy(torch.from_numpy(sim), torch.from_numpy(same))
    assert r.accuracy_mean == kfold_accuracy(sim, same).accuracy_mean
    assert r.tpr.shape == r.fpr.shape == (400,)
    assert np.all(np.diff(r.tpr) >= 0) and r.tpr[-1] == 1.0  # grid goes from strict to lenient


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="differ in length"):
        kfold_accuracy([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="non-finite"):
        kfold_accuracy([0.1, np.nan], [True, False], folds=2)
    with pytest.raises(ValueError, match="cannot split 3 pairs into 10 folds"):
        kfold_accuracy([0.1, 0.2, 0.3], [True, False, True])
    with pytest.raises(ValueError, match="boolean"):
        kfold_accuracy([0.1, 0.2], [2, 0], folds=2)
