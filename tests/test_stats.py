"""deme/stats.py: KID as clean-fid computes it, bootstrap coverage, and the verdict rule on metrics where the
answer is known (a clear effect, a clear reverse effect, pure noise)."""
from __future__ import annotations

import numpy as np
import pytest

from deme.metrics.fid import Stats
from deme.stats import (FAILS, HOLDS, UNRESOLVED, Estimate, bootstrap_indices, difference, estimate, kid,
                        percentile_interval, seed_interval, verdict)

D = 8


def gaussian(n: int, shift: float, seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, (n, D))


@pytest.fixture(scope="module")
def ref() -> Stats:
    return Stats.of(gaussian(20_000, 0.0, 123))


def test_kid_equals_clean_fid_on_the_same_subsets():
    from cleanfid import fid as cfid

    gen, ref_feats = gaussian(300, 0.3, 1), gaussian(400, 0.0, 2)
    mean, std = kid(gen, ref_feats, subsets=20, subset_size=100, seed=7)
    np.random.seed(7)  # clean-fid draws its subsets from numpy's global RandomState
    assert mean == pytest.approx(cfid.kernel_distance(gen, ref_feats, num_subsets=20, max_subset_size=100), rel=1e-10)
    assert std > 0
    same, _ = kid(gaussian(300, 0.0, 3), ref_feats, subsets=20, subset_size=100, seed=7)
    assert abs(same) < mean  # unbiased: about 0 for the same distribution, far below a shifted one


def test_bootstrap_percentile_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials, hits = 300, 0
    for k in range(trials):
        x = rng.normal(1.5, 2.0, 60)
        idx = bootstrap_indices(len(x), 400, seed=k)
        lo, hi = percentile_interval(x[idx].mean(axis=1))
        hits += lo <= 1.5 <= hi
    # 95 % nominal; the percentile bootstrap of a mean at n = 60 runs a little under (about 0.93-0.94)
    assert 0.89 <= hits / trials <= 0.98


def test_difference_interval_covers_the_true_fid_difference(ref):
    """Two models whose samples are Gaussians at known shifts: the FID of a population is |mu|^2 (same
    covariance, summed over the D dimensions); across independent evaluation sets the interval of the difference covers the truth."""
    truth = D * (0.5 ** 2 - 0.3 ** 2)
    hits, trials = 0, 40
    for k in range(trials):
        noise = np.random.default_rng(1000 + k).normal(0, 1, (2000, D))  # shared noise seeds: paired samples
        a, b = noise + 0.5, noise + 0.3
        d = difference([a], [b], ref, reps=100, seed=k)
        hits += d.lo <= truth <= d.hi
    assert hits / trials >= 0.85


def test_verdicts_on_a_clear_effect_a_clear_reverse_effect_and_pure_noise(ref):
    noise = [np.random.default_rng(s).normal(0, 1, (1000, D)) for s in range(3)]  # 3 training seeds
    good = [n + 0.05 + 0.01 * s for s, n in enumerate(noise)]
    bad = [n + 0.6 + 0.01 * s for s, n in enumerate(noise)]
    assert verdict(difference(good, bad, ref, reps=100)) == HOLDS  # paper: a has the lower FID
    assert verdict(difference(bad, good, ref, reps=100)) == FAILS
    # pure noise: two rows of the same recipe (independent training seeds, same evaluation seeds)
    called = 0
    for k in range(20):
        rng = np.random.default_rng(50 + k)
        shifts = rng.normal(0.3, 0.02, (2, 3))
        a = [n + s for n, s in zip(noise, shifts[0])]
        b = [n + s for n, s in zip(noise, shifts[1])]
        called += verdict(difference(a, b, ref, reps=60, seed=k)) != UNRESOLVED
    assert called <= 3  # a 95 % interval calls about 1 in 20 by chance


def test_verdict_sign_and_unresolved_cases():
    e = lambda lo, hi: Estimate((lo + hi) / 2, lo, hi, 3, 100, 0.1, 0.1)  # noqa: E731
    assert verdict(e(-2, -1)) == HOLDS and verdict(e(1, 2)) == FAILS and verdict(e(-1, 1)) == UNRESOLVED
    assert verdict(e(1, 2), paper_sign=1) == HOLDS
    assert verdict(e(0, 1)) == UNRESOLVED  # touching zero is not a call
    assert verdict(None) == UNRESOLVED and verdict(e(float("nan"), 1)) == UNRESOLVED


def test_estimate_reports_both_noise_sources(ref):
    noise = np.random.default_rng(0).normal(0, 1, (800, D))
    one = estimate([noise + 0.4], ref, reps=50)
    assert one.seeds == 1 and one.se_seed is None and one.lo < one.value < one.hi
    assert "one training seed" in one.dominant()
    three = estimate([noise + 0.4, noise + 0.6, noise + 0.2], ref, reps=50)
    assert three.seeds == 3 and three.se_seed > three.se_eval and three.dominant() == "training seeds"
    assert three.hi - three.lo > one.hi - one.lo


def test_difference_refuses_unpaired_evaluation_sets(ref):
    with pytest.raises(ValueError, match="same evaluation samples"):
        difference([gaussian(100, 0, 1)], [gaussian(90, 0, 2)], ref)


def test_seed_interval():
    assert seed_interval([1.0]) is None
    m, lo, hi = seed_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 1.0 and hi > 3.0  # t(2) quantile 4.30 x s.e. 0.577


def test_one_seed_rows_borrow_the_other_rows_spread_and_a_fixed_model_adds_none(ref):
    noise = np.random.default_rng(0).normal(0, 1, (500, D))
    three = [noise + s for s in (0.30, 0.35, 0.40)]
    fixed = difference(three, [noise + 0.8], ref, reps=50, fixed_b=True)  # the published pretrained model
    recipe = difference(three, [noise + 0.8], ref, reps=50)  # a one-seed baseline: its spread is not zero
    assert recipe.se_seed > fixed.se_seed > 0 and recipe.hi - recipe.lo > fixed.hi - fixed.lo
    only_one = difference([noise + 0.3], [noise + 0.8], ref, reps=50)
    assert only_one.se_seed is None and "one training seed" in only_one.dominant()
