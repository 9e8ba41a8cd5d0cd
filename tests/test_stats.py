"""train_utils/evaluation/stats.py: paired bootstrap intervals over crops, paired by seed."""
from __future__ import annotations

import numpy as np
import pytest

from train_utils.evaluation.stats import bootstrap_draws, paired_bootstrap, paired_difference, seed_spread


def mean(items):
    return float(np.mean(items)) if len(items) else float("nan")


def test_a_constant_shift_gives_a_point_interval_at_the_shift():
    base = [list(np.random.default_rng(s).normal(0, 1, 40)) for s in range(3)]
    shifted = [[v + 0.5 for v in items] for items in base]
    got = paired_bootstrap(shifted, base, mean, draws=200)
    assert got.mean == pytest.approx(0.5) and got.low == pytest.approx(0.5) and got.high == pytest.approx(0.5)
    assert got.resolved


def test_identical_models_are_not_resolved():
    base = [list(np.random.default_rng(s).normal(0, 1, 40)) for s in range(3)]
    got = paired_bootstrap(base, base, mean, draws=200)
    assert (got.mean, got.low, got.high) == (0.0, 0.0, 0.0) and not got.resolved
    assert "not resolved" in str(got)


def test_the_interval_matches_the_normal_approximation_on_known_numbers():
    rng = np.random.default_rng(1)
    a = list(rng.normal(1.0, 2.0, 400))
    b = [0.0] * 400
    got = paired_bootstrap([a], [b], mean, draws=2000)
    half = 1.96 * np.std(a) / np.sqrt(len(a))
    assert got.mean == pytest.approx(np.mean(a))
    assert got.low == pytest.approx(np.mean(a) - half, abs=0.05) and got.high == pytest.approx(np.mean(a) + half,
                                                                                                abs=0.05)


def test_a_noisy_small_difference_is_not_resolved_and_a_large_one_is():
    rng = np.random.default_rng(2)
    b = [list(rng.integers(0, 2, 36).astype(float)) for _ in range(3)]
    small = [[v if k else 1.0 for k, v in enumerate(items)] for items in b]  # one crop better per seed
    assert not paired_bootstrap(small, b, mean, draws=500).resolved
    large = [[1.0] * 36 for _ in range(3)]
    assert paired_bootstrap(large, b, mean, draws=500).low > 0


def test_draws_are_shared_by_seed_and_differences_pair_them():
    rows = bootstrap_draws(5, draws=3, seed=7)
    assert rows.shape == (3, 5) and (rows == bootstrap_draws(5, draws=3, seed=7)).all()
    got = paired_difference([1.0], [0.0], np.array([[1.0, 2.0]]), np.array([[0.0, 0.5]]))
    assert got.per_seed == (1.0,) and got.mean == 1.0
    assert got.low == pytest.approx(1.0125) and got.high == pytest.approx(1.4875)  # one seed: draws 1.0 and 1.5


def test_draws_resample_the_seeds_too():
    # seed 0: A - B is 1 on either crop draw, seed 1: 3; two draws of the crops
    got = paired_difference([1.0, 3.0], [0.0, 0.0], np.array([[1.0, 1.0], [3.0, 3.0]]), np.zeros((2, 2)))
    assert got.per_seed == (1.0, 3.0) and got.mean == 2.0
    many = paired_difference([1.0, 3.0], [0.0, 0.0], np.repeat([[1.0], [3.0]], 400, axis=1), np.zeros((2, 400)))
    assert many.low == pytest.approx(1.0) and many.high == pytest.approx(3.0)  # (1, 1) and (3, 3) are drawn too


def test_seeds_that_disagree_are_not_resolved_however_tight_the_crops():
    # the crops agree exactly within each run, but seed 0 favours A by 0.3 and seed 1 favours B by 0.1
    a = [[0.8] * 30, [0.4] * 30]
    b = [[0.5] * 30, [0.5] * 30]
    got = paired_bootstrap(a, b, mean, draws=400)
    assert got.mean == pytest.approx(0.1) and got.low < 0 < got.high and not got.resolved


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([[1.0, 2.0]], [[1.0]], mean)
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0], np.zeros((1, 3)), np.zeros((2, 3)))


def test_seed_spread_is_mean_and_half_range():
    assert seed_spread([0.2, 0.4, 0.3]) == pytest.approx((0.3, 0.1))
