"""Loss weightings of the baselines as weights on the per-sample epsilon-MSE (docs/paper.md §2.1).

The paper writes every method as a weight on the x0 error, L = E_t[lambda_x0(t) ||x0 - x0_hat||^2]. For an
epsilon network ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR(t), so the weight on the epsilon-MSE is

    lambda_eps(t) = lambda_x0(t) / SNR(t)

    scheme         lambda_x0(t)            lambda_eps(t)
    uniform        SNR                     1                    (standard DDPM "simple" loss)
    snr_plus_one   SNR + 1                 1 + 1/SNR = 1/alpha_bar   (= the v-prediction MSE)
    trunc_snr      max(SNR, 1)             max(1, 1/SNR)
    min_snr        min(SNR, gamma)         min(1, gamma/SNR)   (gamma = 5)
    p2             SNR / (k + SNR)^gamma   1 / (k + SNR)^gamma  (k = 1, gamma = 1)

No normalisation by default (docs/paper.md Appendix A); ``normalize=True`` rescales to mean 1 over t.
"""
from __future__ import annotations

import torch

SCHEMES = ("uniform", "min_snr", "p2", "snr_plus_one", "trunc_snr")
DEFAULTS = {"min_snr": {"gamma": 5.0}, "p2": {"k": 1.0, "gamma": 1.0}}


def epsilon_weights(scheme: str, alphas_cumprod: torch.Tensor, *, normalize: bool = False,
                    **hparams: float) -> torch.Tensor:
    """lambda_eps(t) for every timestep t, float64 [T]."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weighting {scheme!r}; allowed: {', '.join(SCHEMES)}")
    allowed = DEFAULTS.get(scheme, {})
    unknown = set(hparams) - set(allowed)
    if unknown:
        raise ValueError(f"weighting {scheme!r} takes {sorted(allowed) or 'no'} hyperparameters, got {sorted(unknown)}")
    h = {**allowed, **hparams}
    ab = alphas_cumprod.double()
    snr = ab / (1 - ab)
    if scheme == "uniform":
        w = torch.ones_like(snr)
    elif scheme == "snr_plus_one":
        w = 1.0 / ab
    elif scheme == "trunc_snr":
        w = torch.clamp(1.0 / snr, min=1.0)
    elif scheme == "min_snr":
        w = torch.clamp(h["gamma"] / snr, max=1.0)
    else:  # p2
        w = 1.0 / (h["k"] + snr) ** h["gamma"]
    return w / w.mean() if normalize else w


def piecewise_weights(interval_weights, num_timesteps: int = 1000, *, normalize: bool = False) -> torch.Tensor:
    """w(t) = w_i for t in I_i = [(i-1)T/N, iT/N): the loss weight that merging N interval task vectors with
    weights w_i amounts to, to first order (docs/paper.md §1.10), float64 [T]."""
    w = torch.as_tensor([float(x) for x in interval_weights], dtype=torch.float64)
    n = len(w)
    if n < 1 or num_timesteps % n:
        raise ValueError(f"{n} interval weights do not split T={num_timesteps} timesteps evenly")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"interval weights must be finite and >= 0, got {w.tolist()}")
    w = w.repeat_interleave(num_timesteps // n)
    return w / w.mean() if normalize and w.sum() > 0 else w
