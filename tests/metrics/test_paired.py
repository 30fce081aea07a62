"""Paired differences against numpy/scipy recomputed by hand."""
import numpy as np
import pytest
from scipy import stats

from broadface.metrics.paired import paired_difference


def test_mean_std_and_standard_error_of_the_per_seed_differences():
    b = {0: 0.80, 1: 0.77, 2: 0.79, 5: 0.1}
    a = {0: 0.75, 1: 0.76, 2: 0.75, 3: 0.9}
    d = paired_difference(b, a)
    diffs = np.array([0.05, 0.01, 0.04])  # seeds 0, 1, 2 only: 3 and 5 have no partner
    assert d.seeds == (0, 1, 2) and d.n == 3 and d.diffs == pytest.approx(diffs)
    assert d.mean == pytest.approx(diffs.mean())
    assert d.std == pytest.approx(np.std(diffs, ddof=1))
    assert d.se == pytest.approx(stats.sem(diffs))
    assert d.significant() == (abs(diffs.mean()) > 2 * stats.sem(diffs))


def test_sign_one_seed_and_no_overlap():
    d = paired_difference({0: 1.0, 1: 2.0}, {0: 2.0, 1: 4.0})  # b − a = −1, −2: SE 0.5
    assert d.mean == pytest.approx(-1.5) and d.significant()  # a consistent loss is significant too
    mixed = paired_difference({0: 1.0, 1: 4.0}, {0: 2.0, 1: 2.0})  # −1, +2: mean 0.5, SE 1.5
    assert mixed.mean == pytest.approx(0.5) and mixed.se == pytest.approx(1.5) and not mixed.significant()
    one = paired_difference({7: 0.5}, {7: 0.25})
    assert one.mean == 0.25 and one.std is None and one.se is None and not one.significant()
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_significant_when_consistent():
    d = paired_difference({s: 0.8 + 0.001 * s for s in range(4)}, {s: 0.7 for s in range(4)})
    assert d.significant() and d.significant(k=2.0)


def test_one_seed_keeps_its_seed_and_difference():
    one = paired_difference({7: 0.5}, {7: 0.25})
    assert one.seeds == (7,) and one.diffs == (0.25,) and one.n == 1


def test_no_spread_or_exactly_two_standard_errors_is_not_significant():
    same = paired_difference({0: 0.75, 1: 0.5}, {0: 0.5, 1: 0.25})  # +0.25 twice: SE 0, nothing to compare with
    assert same.se == 0.0 and not same.significant()
    edge = paired_difference({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})  # mean 2, SE 1: exactly 2 SE
    assert edge.mean == 2.0 and edge.se == pytest.approx(1.0) and not edge.significant()
    assert edge.significant(k=1.999)
