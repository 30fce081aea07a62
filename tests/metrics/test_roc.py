import numpy as np
import pytest
from sklearn.metrics import roc_curve

from broadface.metrics import roc, tar_at_far
from bench.reference import insightface_tar_at_far, strict_tar_at_far

SCORES = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
SAME = np.array([1, 1, 0, 1, 0, 0], dtype=bool)


def test_hand_computed_operating_points():
    # ROC points (FPR, TPR): (0,0) (0,1/3) (1/3,2/3) (1/3,1) (2/3,1) (1,1); 0.8 is a tie of one genuine and one impostor
    strict = tar_at_far(SCORES, SAME, fars=[0.0, 1 / 3, 0.5], rule="strict")
    np.testing.assert_allclose(strict.tars, [1 / 3, 1.0, 1.0])
    np.testing.assert_allclose(strict.thresholds, [0.9, 0.7, 0.7])
    # nearest: FAR 0.2 is nearer 1/3 than 0, and of the points at FPR 1/3 the later (higher TPR) one wins
    nearest = tar_at_far(SCORES, SAME, fars=[0.2, 0.1], rule="nearest")
    np.testing.assert_allclose(nearest.tars, [1.0, 1 / 3])
    np.testing.assert_allclose(nearest.achieved_fars, [1 / 3, 0.0])


@pytest.mark.parametrize("drop", [True, False])
def test_roc_equals_sklearn_with_ties(drop):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(3, 400))
        same = rng.random(n) < rng.uniform(0.1, 0.9)
        same[:2] = [True, False]
        levels = int(rng.choice([3, 10, 50, 10_000]))  # few levels = many ties
        dtype = rng.choice([np.float32, np.float64])
        scores = (np.floor(rng.random(n) * levels) + same * rng.integers(0, 3)).astype(dtype)
        ref_curve = roc_curve(same, scores, drop_intermediate=drop)
        for ours, ref in zip(roc(scores, same, drop_intermediate=drop), ref_curve):
            np.testing.assert_array_equal(ours, ref)


def test_tar_at_far_rules_match_references_with_ties():
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(5, 500))
        same = rng.random(n) < rng.uniform(0.05, 0.95)
        same[:2] = [True, False]
        levels = int(rng.choice([2, 5, 30, 100_000]))
        scores = np.floor(rng.random(n) * levels) + same * rng.integers(0, 3)
        n_neg = int((~same).sum())
        fars = np.r_[1e-6, 1e-3, 1e-2, 0.1, 0.5, 1.0, rng.random(4), np.arange(n_neg + 1) / n_neg]
        np.testing.assert_array_equal(tar_at_far(scores, same, fars, "nearest").tars,
                                      insightface_tar_at_far(scores, same, fars))
        np.testing.assert_array_equal(tar_at_far(scores, same, fars, "strict").tars,
                                      strict_tar_at_far(scores, same, fars))


def test_large_input_matches_sklearn():
    rng = np.random.default_rng(2)
    n = 300_000
    same = rng.random(n) < 0.01
    scores = (rng.normal(size=n) + 2.5 * same).astype(np.float32)
    fars = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    r = tar_at_far(scores, same, fars)
    np.testing.assert_array_equal(r.tars, insightface_tar_at_far(scores, same, fars))
    assert set(r.to_dict()) == {"1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}


def test_errors():
    with pytest.raises(ValueError, match="both classes"):
        tar_at_far([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="rule"):
        tar_at_far(SCORES, SAME, rule="closest")
    with pytest.raises(ValueError, match="fars"):
        tar_at_far(SCORES, SAME, fars=[2.0])
