"""Noise schedule, timestep partition and probabilistic timestep sampling (pure functions).

Notation of docs/paper.md: T training timesteps t in {0..T-1} (t=0 nearly clean), alpha_bar_t the cumulative
product of (1 - beta_t), SNR(t) = alpha_bar_t / (1 - alpha_bar_t).
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from deme.config import ScheduleConfig


def make_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    """The training scheduler of the DDPM checkpoints (docs/paper.md §1.6, 'Noise scheduler')."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample)


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    return make_scheduler(cfg).alphas_cumprod.clone().double()


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod / (1.0 - alphas_cumprod)


def interval_bounds(i: int, n: int, num_timesteps: int = 1000) -> tuple[int, int]:
    """[lo, hi) of interval i in 1..n: I_i = [(i-1)T/N, iT/N) (docs/paper.md §1.2)."""
    if not 1 <= i <= n:
        raise ValueError(f"interval {i} is outside 1..{n}")
    if num_timesteps % n:
        raise ValueError(f"N={n} must divide T={num_timesteps}")
    width = num_timesteps // n
    return (i - 1) * width, i * width


def interval_index(t: int, n: int, num_timesteps: int = 1000) -> int:
    """0-based model index serving timestep t: k(t) = min(floor(t N / T), N - 1) (docs/paper.md §1.7, Eq. 7)."""
    return min(int(t) * n // num_timesteps, n - 1)


def sample_timesteps(batch: int, lo: int, hi: int, *, p: float = 0.0, num_timesteps: int = 1000,
                     granularity: str = "batch", antithetic: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Probabilistic timestep sampling (docs/paper.md §1.4, Eq. 6, official-code semantics).

    With probability ``p`` a draw comes from the whole range [0, T), otherwise from the interval [lo, hi).
    ``granularity='batch'`` makes one Bernoulli(p) draw per micro-batch (code default), 'sample' one per
    draw. ``antithetic`` draws floor(B/2)+1 timesteps t and appends their mirrors lo+hi-1-t, truncated to B.
    """
    if not 0 <= lo < hi <= num_timesteps:
        raise ValueError(f"bad interval [{lo}, {hi}) for T={num_timesteps}")
    draws = batch // 2 + 1 if antithetic else batch
    if granularity == "batch":
        global_ = torch.rand((), generator=generator) < p
        glob = global_.expand(draws)
    elif granularity == "sample":
        glob = torch.rand(draws, generator=generator) < p
    else:
        raise ValueError(f"granularity must be 'batch' or 'sample', got {granularity!r}")
    los = torch.where(glob, 0, lo)
    his = torch.where(glob, num_timesteps, hi)
    u = torch.rand(draws, generator=generator, dtype=torch.float64)
    t = los + torch.floor(u * (his - los)).long()
    if antithetic:
        t = torch.cat([t, los + his - 1 - t])
    return t[:batch].long()


def marginal_probability(lo: int, hi: int, p: float, num_timesteps: int = 1000) -> torch.Tensor:
    """pi_i(t) = (1-p) 1[t in I_i] / |I_i| + p / T: the marginal of :func:`sample_timesteps`."""
    prob = torch.full((num_timesteps,), p / num_timesteps, dtype=torch.float64)
    prob[lo:hi] += (1 - p) / (hi - lo)
    return prob
