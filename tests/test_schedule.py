"""Timestep partition, interval lookup, probabilistic timestep sampling and the noise schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deme.config import ScheduleConfig
from deme.schedule import (alphas_cumprod, interval_bounds, interval_index, marginal_probability,
                           sample_timesteps, snr)

T = 1000


# ---------------------------------------------------------------------------------------------- partition

def test_interval_bounds_n4_matches_paper():
    assert [interval_bounds(i, 4) for i in range(1, 5)] == [(0, 250), (250, 500), (500, 750), (750, 1000)]


@pytest.mark.parametrize("n", [1, 2, 4, 5, 8, 10, 20, 125, 1000])
def test_intervals_tile_the_range_without_overlap(n):
    cover = np.zeros(T, int)
    prev_hi = 0
    for i in range(1, n + 1):
        lo, hi = interval_bounds(i, n)
        assert lo == prev_hi, "intervals must be contiguous and in order"
        assert hi - lo == T // n, "intervals must have equal width"
        cover[lo:hi] += 1
        prev_hi = hi
    assert prev_hi == T
    assert (cover == 1).all()


@pytest.mark.parametrize("n", [3, 6, 7, 300])
def test_interval_bounds_rejects_n_not_dividing_t(n):
    with pytest.raises(ValueError, match="divide"):
        interval_bounds(1, n)


@pytest.mark.parametrize("i", [0, 5, -1])
def test_interval_bounds_rejects_index_out_of_range(i):
    with pytest.raises(ValueError, match="outside"):
        interval_bounds(i, 4)


@pytest.mark.parametrize("t, expected", [(0, 0), (249, 0), (250, 1), (499, 1), (500, 2), (749, 2),
                                         (750, 3), (999, 3)])
def test_interval_index_edges(t, expected):
    assert interval_index(t, 4) == expected
    assert interval_index(t, 4) == min(t * 4 // T, 3)


def test_interval_index_clamps_to_last_model():
    assert interval_index(1000, 4) == 3
    assert interval_index(5000, 4) == 3


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_interval_index_agrees_with_interval_bounds(n):
    for t in range(T):
        lo, hi = interval_bounds(interval_index(t, n) + 1, n)
        assert lo <= t < hi


# ---------------------------------------------------------------------------------------------- sampling

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("granularity", ["batch", "sample"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_p0_draws_stay_inside_interval(granularity, antithetic):
    g = _gen(1)
    for _ in range(200):
        t = sample_timesteps(16, 250, 500, p=0.0, granularity=granularity, antithetic=antithetic, generator=g)
        assert t.dtype == torch.long
        assert t.shape == (16,)
        assert ((t >= 250) & (t < 500)).all()


def test_p0_covers_whole_interval_uniformly():
    g = _gen(2)
    t = torch.cat([sample_timesteps(64, 500, 750, p=0.0, antithetic=False, generator=g) for _ in range(400)])
    counts = torch.bincount(t - 500, minlength=250).double()
    assert counts.numel() == 250 and (counts > 0).all()
    expected = len(t) / 250
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = 249
    assert chi2 < dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 8, 15, 16, 64])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_antithetic_mirrors_and_length(batch, granularity):
    lo, hi = 250, 500
    draws = batch // 2 + 1
    g = _gen(3)
    for _ in range(50):
        t = sample_timesteps(batch, lo, hi, p=0.0, granularity=granularity, antithetic=True, generator=g)
        assert t.shape == (batch,)
        for j in range(batch - draws):
            assert int(t[draws + j]) == lo + hi - 1 - int(t[j])


def test_antithetic_mirror_of_global_draw_uses_global_range():
    g = _gen(4)
    t = sample_timesteps(8, 250, 500, p=1.0, antithetic=True, generator=g)
    draws = 8 // 2 + 1
    for j in range(8 - draws):
        assert int(t[draws + j]) == T - 1 - int(t[j])


def test_sampling_is_deterministic_given_generator():
    a = sample_timesteps(32, 0, 250, p=0.4, granularity="sample", generator=_gen(9))
    b = sample_timesteps(32, 0, 250, p=0.4, granularity="sample", generator=_gen(9))
    c = sample_timesteps(32, 0, 250, p=0.4, granularity="sample", generator=_gen(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_batch_granularity_each_batch_is_local_or_global(p):
    """With one Bernoulli(p) per batch, a batch either lies entirely in [lo, hi) with mirrors lo+hi-1-t,
    or is a global batch with mirrors T-1-t; global batches occur with frequency p."""
    lo, hi, batch, k = 250, 500, 8, 3000
    draws = batch // 2 + 1
    g = _gen(5)
    n_global = 0
    for _ in range(k):
        t = sample_timesteps(batch, lo, hi, p=p, granularity="batch", antithetic=True, generator=g).tolist()
        local = all(lo <= x < hi for x in t) and all(t[draws + j] == lo + hi - 1 - t[j]
                                                       for j in range(batch - draws))
        glob = all(t[draws + j] == T - 1 - t[j] for j in range(batch - draws))
        assert local or glob
        assert not (local and glob)  # mirrors in [250, 500) never coincide with global mirrors
        n_global += glob
    sigma = math.sqrt(k * p * (1 - p))
    assert abs(n_global - k * p) <= 4 * sigma + 1e-9


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_batch_granularity_in_interval_frequency(p):
    lo, hi, batch, k = 250, 500, 8, 3000
    g = _gen(6)
    frac = np.array([((t >= lo) & (t < hi)).double().mean().item()
                     for t in (sample_timesteps(batch, lo, hi, p=p, generator=g) for _ in range(k))])
    expected = (1 - p) + p * (hi - lo) / T
    if p == 0.0:
        assert (frac == 1.0).all()
        return
    # per-batch fractions are i.i.d. values in [0, 1] with mean e, so their variance is at most e(1-e):
    # a conservative 4-sigma bound on their mean.
    sigma = math.sqrt(expected * (1 - expected)) / math.sqrt(k)
    assert abs(frac.mean() - expected) <= 4 * sigma


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    exp = counts.sum() * probs
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_sample_granularity_matches_marginal_probability(p):
    """Histogram over the 4 intervals (and over 20 finer bins) vs. marginal_probability(lo, hi, p)."""
    lo, hi = 500, 750
    g = _gen(7)
    t = torch.cat([sample_timesteps(32, lo, hi, p=p, granularity="sample", antithetic=False, generator=g)
                   for _ in range(500)]).numpy()
    marg = marginal_probability(lo, hi, p).numpy()
    for bins in (4, 20):
        edges = np.arange(0, T + 1, T // bins)
        probs = np.array([marg[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
        counts = np.histogram(t, bins=edges)[0].astype(float)
        assert (counts[probs == 0] == 0).all()
        keep = probs > 0
        dof = int(keep.sum()) - 1
        if dof == 0:
            assert counts[keep].sum() == len(t)
            continue
        assert _chi2(counts[keep], probs[keep]) < dof + 6 * math.sqrt(2 * dof) + 10


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_sample_granularity_antithetic_first_draws_match_marginal(p):
    """With antithetic draws, the floor(B/2)+1 leading draws are independent with the marginal pi_i."""
    lo, hi, batch = 0, 250, 16
    draws = batch // 2 + 1
    g = _gen(8)
    t = torch.cat([sample_timesteps(batch, lo, hi, p=p, granularity="sample", generator=g)[:draws]
                   for _ in range(1000)]).numpy()
    marg = marginal_probability(lo, hi, p).numpy()
    edges = np.arange(0, T + 1, 250)
    probs = np.array([marg[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
    counts = np.histogram(t, bins=edges)[0].astype(float)
    assert _chi2(counts, probs) < 3 + 6 * math.sqrt(6)


def test_sample_granularity_mixes_within_a_batch():
    """One Bernoulli per draw: with p=0.5 and 64 draws, nearly every batch has draws of both kinds."""
    g = _gen(11)
    mixed = 0
    for _ in range(50):
        t = sample_timesteps(64, 0, 250, p=0.5, granularity="sample", antithetic=False, generator=g)
        inside = int((t < 250).sum())
        mixed += int(0 < inside < 64)
    assert mixed == 50


@pytest.mark.parametrize("p", [0.0, 0.3, 0.4, 1.0])
def test_marginal_probability_values(p):
    m = marginal_probability(250, 500, p)
    assert m.shape == (T,)
    assert float(m.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(m[300]) == pytest.approx((1 - p) * 4 / T + p / T, rel=1e-12)
    assert float(m[100]) == pytest.approx(p / T, abs=1e-15)
    assert float(m[600]) == pytest.approx(p / T, abs=1e-15)


@pytest.mark.parametrize("kwargs", [dict(lo=250, hi=250), dict(lo=300, hi=200), dict(lo=-1, hi=10),
                                    dict(lo=0, hi=1001)])
def test_sample_timesteps_rejects_bad_interval(kwargs):
    with pytest.raises(ValueError):
        sample_timesteps(4, kwargs["lo"], kwargs["hi"])


def test_sample_timesteps_rejects_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        sample_timesteps(4, 0, 250, granularity="epoch")


# ---------------------------------------------------------------------------------------------- schedule

def test_ddpm_linear_schedule_alpha_bar_and_snr_crossing():
    ab = alphas_cumprod(ScheduleConfig())
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert float(ab[999]) == pytest.approx(4.04e-5, rel=0.02)
    assert (ab[1:] < ab[:-1]).all()
    s = snr(ab)
    first_below_one = int(torch.nonzero(s < 1)[0])
    assert 255 <= first_below_one <= 262
    # SNR is monotone, so it stays below 1 afterwards
    assert (s[first_below_one:] < 1).all() and (s[:first_below_one] >= 1).all()


def test_ddpm_linear_alpha_bar_closed_form():
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0)
    ab = alphas_cumprod(ScheduleConfig())
    assert torch.allclose(ab, expected, rtol=1e-5, atol=0)


def test_scaled_linear_schedule_snr_crossing():
    cfg = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    s = snr(alphas_cumprod(cfg))
    first_below_one = int(torch.nonzero(s < 1)[0])
    assert 350 <= first_below_one <= 358


def test_snr_formula():
    ab = torch.tensor([0.5, 0.8, 0.2], dtype=torch.float64)
    assert torch.allclose(snr(ab), torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64))
