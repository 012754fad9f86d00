"""Loss-reweighting baselines (docs/paper.md §2.1): lambda_eps(t) of every scheme, its identities, and the
weighted epsilon objective."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import Recorder, make_tiny_unet, randomize_
from deme.config import BaselinesConfig, ScheduleConfig
from deme.objectives import EpsObjective
from deme.schedule import alphas_cumprod, sample_timesteps
from deme.train import to_model_range
from deme import weighting
from deme.weighting import SCHEMES, epsilon_weights

DDPM = ScheduleConfig()
SD = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULES = {"ddpm": DDPM, "sd": SD}
TS = [0, 99, 249, 499, 749, 999]
# diffusers builds alpha_bar in float32; 1 - alpha_bar near t = 0 (~1e-4) then carries ~2e-4 relative error
# against the float64 recomputation below.
RTOL = 5e-4


def numpy_alpha_bar(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar recomputed independently of diffusers, in float64."""
    b0, b1, n = cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(b0, b1, n)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n) ** 2
    else:
        raise AssertionError(cfg.beta_schedule)
    return np.cumprod(1.0 - betas)


def expected_weights(scheme: str, ab: np.ndarray, **h) -> np.ndarray:
    """The lambda_eps column of the docs/paper.md §2.1 table, written out by hand."""
    snr = ab / (1.0 - ab)
    if scheme == "uniform":
        return np.ones_like(ab)
    if scheme == "snr_plus_one":
        return 1.0 + 1.0 / snr
    if scheme == "trunc_snr":
        return np.maximum(1.0, 1.0 / snr)
    if scheme == "min_snr":
        return np.minimum(1.0, h.get("gamma", 5.0) / snr)
    if scheme == "p2":
        return 1.0 / (h.get("k", 1.0) + snr) ** h.get("gamma", 1.0)
    raise AssertionError(scheme)


def lambda_x0(scheme: str, snr: torch.Tensor, **h) -> torch.Tensor:
    """The lambda_x0 column of the docs/paper.md §2.1 table (weight on ||x0 - x0_hat||^2)."""
    if scheme == "uniform":
        return snr
    if scheme == "snr_plus_one":
        return snr + 1
    if scheme == "trunc_snr":
        return torch.clamp(snr, min=1.0)
    if scheme == "min_snr":
        return torch.clamp(snr, max=h.get("gamma", 5.0))
    if scheme == "p2":
        return snr / (h.get("k", 1.0) + snr) ** h.get("gamma", 1.0)
    raise AssertionError(scheme)


@pytest.fixture(scope="module")
def ab_ddpm():
    return alphas_cumprod(DDPM)


@pytest.fixture(scope="module")
def ab_sd():
    return alphas_cumprod(SD)


def _ab(name):
    return alphas_cumprod(SCHEDULES[name])


# ----------------------------------------------------------------------------------------- values

def test_schedule_matches_numpy_recomputation():
    """Sanity of the reference itself: the library's alpha_bar is the numpy one (float32 rounding)."""
    for cfg in (DDPM, SD):
        ab = alphas_cumprod(cfg).numpy()
        ref = numpy_alpha_bar(cfg)
        assert ab.shape == (1000,)
        np.testing.assert_allclose(ab, ref, rtol=1e-6)
        np.testing.assert_allclose(1 - ab, 1 - ref, rtol=RTOL)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_matches_hand_computed_values(scheme, schedule):
    ab = _ab(schedule)
    w = epsilon_weights(scheme, ab)
    assert w.dtype == torch.float64 and w.shape == (1000,)
    ref = expected_weights(scheme, numpy_alpha_bar(SCHEDULES[schedule]))
    got = w.numpy()
    np.testing.assert_allclose(got[TS], ref[TS], rtol=RTOL, err_msg=f"{scheme} on {schedule} at t={TS}")
    np.testing.assert_allclose(got, ref, rtol=RTOL)  # every t, not only the spot checks
    assert np.all(np.isfinite(got)) and np.all(got > 0)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("scheme, h", [("min_snr", {"gamma": 1.0}), ("min_snr", {"gamma": 20.0}),
                                       ("p2", {"k": 0.5, "gamma": 2.0}), ("p2", {"gamma": 0.5}),
                                       ("p2", {"k": 3.0})])
def test_hyperparameters_are_used(scheme, h, schedule):
    ab = _ab(schedule)
    got = epsilon_weights(scheme, ab, **h).numpy()
    ref = expected_weights(scheme, numpy_alpha_bar(SCHEDULES[schedule]), **h)
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    default = epsilon_weights(scheme, ab).numpy()
    assert not np.allclose(got, default), "the hyperparameter had no effect"


def test_dynamic_range_table_ddpm(ab_ddpm):
    """The 'dynamic range' table of docs/paper.md §2.1 (DDPM linear schedule)."""
    w = {s: epsilon_weights(s, ab_ddpm).numpy() for s in SCHEMES}
    table = {
        "snr_plus_one": {0: 1.0001, 99: 1.11, 249: 1.91, 499: 12.7, 749: 298, 999: 24_778},
        "trunc_snr": {0: 1, 99: 1, 249: 1, 499: 11.7, 749: 297, 999: 24_777},
        "min_snr": {0: 5.0e-4, 99: 0.57, 249: 1, 499: 1, 749: 1, 999: 1},
        "p2": {0: 1e-4, 99: 0.10, 249: 0.48, 499: 0.92, 749: 1.00, 999: 1.00},
    }
    for scheme, row in table.items():
        for t, value in row.items():
            # within 2 %, or within the rounding of the printed two-decimal entries (0.10 for P2 at t=99)
            tol = 0.005 if scheme == "p2" and t >= 99 else 0.0
            assert w[scheme][t] == pytest.approx(value, rel=0.02, abs=tol), f"{scheme} at t={t}"
    assert np.all(w["uniform"] == 1.0)


def test_dynamic_range_sd(ab_sd):
    assert float(epsilon_weights("snr_plus_one", ab_sd)[999]) == pytest.approx(215, rel=0.02)
    assert float(epsilon_weights("snr_plus_one", ab_sd)[0]) == pytest.approx(1.00085, rel=1e-4)
    # SD's schedule is milder than DDPM's at the noisy end
    assert float(epsilon_weights("trunc_snr", ab_sd)[999]) < 0.01 * float(
        epsilon_weights("trunc_snr", alphas_cumprod(DDPM))[999])


# ----------------------------------------------------------------------------------------- identities

@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_snr_plus_one_is_the_v_prediction_mse(schedule):
    """||v - v_hat||^2 = ||eps - eps_hat||^2 / alpha_bar for an epsilon network (docs/paper.md §2.1)."""
    ab_all = _ab(schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 99, 249, 354, 499, 749, 998, 999])
    n = len(t)
    x0 = torch.rand((n, 3, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn((n, 3, 4, 4), generator=g, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn((n, 3, 4, 4), generator=g, dtype=torch.float64)
    a = ab_all[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    x0_hat = (xt - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    lhs = (v - v_hat).pow(2).flatten(1).sum(1)
    rhs = epsilon_weights("snr_plus_one", ab_all)[t] * (eps - eps_hat).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=0)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_epsilon_weight_equals_x0_weight_over_snr(scheme, schedule):
    """lambda_x0(t) ||x0 - x0_hat||^2 == lambda_eps(t) ||eps - eps_hat||^2 with x0_hat from eps_hat."""
    ab_all = _ab(schedule)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 50, 130, 259, 354, 600, 999])
    n = len(t)
    x0 = torch.randn((n, 3, 2, 2), generator=g, dtype=torch.float64)
    eps = torch.randn((n, 3, 2, 2), generator=g, dtype=torch.float64)
    eps_hat = eps + torch.randn((n, 3, 2, 2), generator=g, dtype=torch.float64)
    a = ab_all[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (xt - (1 - a).sqrt() * eps_hat) / a.sqrt()
    snr = ab_all[t] / (1 - ab_all[t])
    lhs = lambda_x0(scheme, snr) * (x0 - x0_hat).pow(2).flatten(1).sum(1)
    rhs = epsilon_weights(scheme, ab_all)[t] * (eps - eps_hat).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-8, atol=0)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_relations_between_schemes(schedule):
    ab = _ab(schedule)
    snr = ab / (1 - ab)
    w = {s: epsilon_weights(s, ab) for s in SCHEMES}
    assert torch.equal(w["uniform"], torch.ones(1000, dtype=torch.float64))
    # min-SNR with a huge gamma never clips below 1: it is the uniform weighting
    assert torch.equal(epsilon_weights("min_snr", ab, gamma=1e12), w["uniform"])
    # truncated SNR: max(1, 1/SNR) >= 1; 1 where SNR >= 1 and SNR+1 minus 1 (= 1/SNR) where SNR < 1
    assert torch.all(w["trunc_snr"] >= 1)
    low = snr < 1
    assert 0 < int(low.sum()) < 1000
    torch.testing.assert_close(w["trunc_snr"][low], w["snr_plus_one"][low] - 1, rtol=1e-9, atol=0)
    assert torch.all(w["trunc_snr"][~low] == 1)
    torch.testing.assert_close(w["trunc_snr"], torch.maximum(w["uniform"], w["snr_plus_one"] - 1),
                               rtol=1e-9, atol=0)
    # SNR+1 = 1 / alpha_bar
    torch.testing.assert_close(w["snr_plus_one"], 1 / ab, rtol=1e-12, atol=0)
    # min-SNR-gamma = min(1, gamma (SNR+1 - 1))
    torch.testing.assert_close(w["min_snr"], torch.clamp(5 * (w["snr_plus_one"] - 1), max=1.0),
                               rtol=1e-9, atol=0)
    assert torch.all(w["min_snr"] <= 1)
    # P2 with k = gamma = 1 is 1/(1 + SNR) = 1 - alpha_bar; k -> 0 gives 1/SNR; gamma = 0 is uniform
    torch.testing.assert_close(w["p2"], 1 - ab, rtol=1e-9, atol=0)
    torch.testing.assert_close(epsilon_weights("p2", ab, k=0.0, gamma=1.0), 1 / snr, rtol=1e-12, atol=0)
    torch.testing.assert_close(epsilon_weights("p2", ab, k=1e-12), 1 / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(epsilon_weights("p2", ab, gamma=0.0), w["uniform"])
    # every scheme but uniform grows with the noise level (non-decreasing in t)
    for s in ("snr_plus_one", "trunc_snr", "min_snr", "p2"):
        assert torch.all(w[s][1:] >= w[s][:-1]), f"{s} is not non-decreasing in t"
        assert w[s][999] > w[s][0]


@pytest.mark.parametrize("scheme, h", [(s, {}) for s in SCHEMES] + [("min_snr", {"gamma": 1.0}),
                                                                    ("p2", {"k": 0.5, "gamma": 2.0})])
def test_normalize_gives_mean_one_and_same_shape(scheme, h, ab_ddpm):
    raw = epsilon_weights(scheme, ab_ddpm, **h)
    norm = epsilon_weights(scheme, ab_ddpm, normalize=True, **h)
    assert norm.dtype == torch.float64
    assert float(norm.mean()) == pytest.approx(1.0, abs=1e-12)
    ratio = norm / raw
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-12, atol=0)
    torch.testing.assert_close(ratio[0], 1 / raw.mean(), rtol=1e-12, atol=0)
    if scheme != "uniform":
        assert not torch.allclose(norm, raw)


def test_input_dtype_and_no_mutation(ab_ddpm):
    ab32 = ab_ddpm.float()
    before = ab32.clone()
    w = epsilon_weights("snr_plus_one", ab32)
    assert w.dtype == torch.float64
    assert torch.equal(ab32, before)
    torch.testing.assert_close(w, 1 / ab32.double(), rtol=1e-12, atol=0)


def test_unknown_scheme_is_a_value_error(ab_ddpm):
    with pytest.raises(ValueError, match="snr_squared"):
        epsilon_weights("snr_squared", ab_ddpm)
    with pytest.raises(ValueError, match="min_snr"):  # lists the allowed ones
        epsilon_weights("minsnr", ab_ddpm)


@pytest.mark.parametrize("scheme, h, name", [("min_snr", {"k": 1.0}, "k"), ("p2", {"gama": 1.0}, "gama"),
                                             ("snr_plus_one", {"gamma": 5.0}, "gamma"),
                                             ("trunc_snr", {"k": 1.0}, "k"),
                                             ("uniform", {"gamma": 1.0}, "gamma")])
def test_unknown_hyperparameter_is_a_value_error(scheme, h, name, ab_ddpm):
    with pytest.raises(ValueError, match=rf"'{name}'"):
        epsilon_weights(scheme, ab_ddpm, **h)


def test_config_sections_plug_into_epsilon_weights(ab_ddpm):
    """Every reweighting section of BaselinesConfig passes its hyperparameters through unchanged."""
    cfg = BaselinesConfig()
    for scheme in ("min_snr", "p2", "snr_plus_one", "trunc_snr"):
        section = getattr(cfg, scheme)
        w = epsilon_weights(scheme, ab_ddpm, normalize=section.normalize, **section.hparams())
        torch.testing.assert_close(w, epsilon_weights(scheme, ab_ddpm))
    assert cfg.min_snr.hparams() == {"gamma": 5.0}
    assert cfg.p2.hparams() == {"k": 1.0, "gamma": 1.0}


# ----------------------------------------------------------------------------------------- objective

@pytest.fixture(scope="module")
def ab32():
    return alphas_cumprod(DDPM).float()


@pytest.fixture(scope="module")
def x0():
    g = torch.Generator().manual_seed(7)
    return to_model_range(torch.randint(0, 256, (16, 8, 8, 3), generator=g, dtype=torch.uint8))


def _model(seed=2):
    return randomize_(make_tiny_unet(), seed=seed, scale=0.05)


def _replay(obj: EpsObjective, x0: torch.Tensor, seed: int):
    """The (t, noise) the objective draws from a generator seeded ``seed`` (same draws, same order)."""
    g = torch.Generator().manual_seed(seed)
    t = sample_timesteps(x0.shape[0], obj.lo, obj.hi, p=obj.p, num_timesteps=obj.num_timesteps,
                         granularity=obj.granularity, antithetic=obj.antithetic, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return t, noise


def _manual_weighted_loss(obj, model, x0, seed, weights):
    """Run the objective once; return (its loss, terms, the hand-computed weighted loss, t)."""
    rec = Recorder(model)
    loss, terms = obj(rec, x0, torch.Generator().manual_seed(seed))
    (xt, t, pred), = rec.calls
    t_ref, noise = _replay(obj, x0, seed)
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(xt, obj.noisy(x0, noise, t), rtol=0, atol=0)  # the replay is exact
    per_sample = (pred.float() - noise).pow(2).flatten(1).mean(1)
    expected = (weights.double()[t] * per_sample.double()).mean()
    return loss, terms, expected, t, per_sample


def test_all_ones_weights_equal_unweighted_loss(ab32, x0):
    model = _model()
    plain, plain_terms = EpsObjective(ab32)(model, x0, torch.Generator().manual_seed(3))
    ones, ones_terms = EpsObjective(ab32, weights=torch.ones(1000, dtype=torch.float64))(
        model, x0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)
    assert float(ones_terms["loss_eps"]) == float(plain_terms["loss_eps"])
    three, _ = EpsObjective(ab32, weights=torch.full((1000,), 3.0, dtype=torch.float64))(
        model, x0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(three, 3 * plain, rtol=1e-6, atol=0)


def test_band_weights_equal_manual_mean(ab32, x0):
    """Weights zero outside [300, 700): the loss is mean_b w(t_b) MSE_b over the whole batch."""
    w = torch.zeros(1000, dtype=torch.float64)
    w[300:700] = torch.linspace(0.5, 2.0, 400, dtype=torch.float64)
    obj = EpsObjective(ab32, 0, 1000, p=0.0, antithetic=False, weights=w)
    for seed in (0, 1, 2):
        loss, terms, expected, t, per_sample = _manual_weighted_loss(obj, _model(), x0, seed, w)
        inside = (t >= 300) & (t < 700)
        assert 0 < int(inside.sum()) < len(t), "the draw must straddle the band for this test"
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
        # the mean is over the whole batch, not over the samples inside the band
        inside_sum = float((w[t][inside] * per_sample[inside].double()).sum())
        assert float(loss.detach()) == pytest.approx(inside_sum / len(t), rel=1e-6)
        assert float(loss.detach()) != pytest.approx(float(terms["loss_eps"]), rel=1e-3)
        # loss_eps stays the unweighted MSE
        assert float(terms["loss_eps"]) == pytest.approx(float(per_sample.mean()), rel=1e-6)
        assert float(terms["loss"]) == float(loss.detach())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_weights_in_objective_equal_manual_mean(scheme, ab32, x0):
    w = epsilon_weights(scheme, alphas_cumprod(DDPM))
    obj = EpsObjective(ab32, 0, 1000, p=0.0, weights=w)
    loss, _, expected, t, _ = _manual_weighted_loss(obj, _model(), x0, 11, w)
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_zero_weights_give_zero_loss_and_gradient(ab32, x0):
    model = _model()
    loss, terms = EpsObjective(ab32, weights=torch.zeros(1000, dtype=torch.float64))(
        model, x0, torch.Generator().manual_seed(0))
    assert float(loss.detach()) == 0.0 and float(terms["loss_eps"]) > 0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_weighted_loss_is_fp32_under_bf16_autocast(ab32, x0):
    w = epsilon_weights("snr_plus_one", alphas_cumprod(DDPM))  # weights up to ~25,000
    obj = EpsObjective(ab32, 500, 1000, p=0.0, weights=w)
    rec = Recorder(_model())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = obj(rec, x0, torch.Generator().manual_seed(4))
    (_, t, pred), = rec.calls
    assert pred.dtype == torch.bfloat16, "autocast was not active in the model"
    assert loss.dtype == torch.float32
    assert terms["loss_eps"].dtype == torch.float32
    _, noise = _replay(obj, x0, 4)
    expected = (w[t] * (pred.double() - noise.double()).pow(2).flatten(1).mean(1)).mean()
    # a bf16 reduction would lose about three digits here
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert torch.isfinite(loss)


def test_weights_combine_with_consistency_term(ab32, x0):
    import copy

    student = _model(2)
    teacher = copy.deepcopy(_model(3)).requires_grad_(False)
    w = epsilon_weights("min_snr", alphas_cumprod(DDPM))
    weighted, _ = EpsObjective(ab32, weights=w)(student, x0, torch.Generator().manual_seed(5))
    both, terms = EpsObjective(ab32, weights=w, teacher=teacher, consistency_weight=2.0)(
        student, x0, torch.Generator().manual_seed(5))
    assert float(terms["loss_consistency"]) > 0
    expected = float(weighted.detach()) + 2.0 * float(terms["loss_consistency"])
    assert float(both.detach()) == pytest.approx(expected, rel=1e-6)


def test_piecewise_weights_are_constant_on_each_interval():
    w = weighting.piecewise_weights([0.0, 1.5, 0.5, 1.0], 1000)
    assert w.shape == (1000,) and w.dtype == torch.float64
    assert w[:250].eq(0.0).all() and w[250:500].eq(1.5).all() and w[500:750].eq(0.5).all() and w[750:].eq(1.0).all()
    assert torch.allclose(weighting.piecewise_weights([1.0, 3.0], 1000, normalize=True).mean(),
                          torch.tensor(1.0, dtype=torch.float64))
    assert weighting.piecewise_weights([0.0, 0.0], 1000, normalize=True).eq(0).all()  # nothing to rescale
    for bad in ([1.0, 2.0, 3.0], [], [1.0, float("nan")], [-0.5, 1.0]):  # 3 does not divide 1000
        with pytest.raises(ValueError):
            weighting.piecewise_weights(bad, 1000)
