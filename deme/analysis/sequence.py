"""The x̂0 sequence view asked for by reviewer 2 (docs/paper.md §4, "Fig. 5, Figs. 9-14"): the clean-image
prediction of several models at the end of each timestep interval, all from the same initial noise.

Sampling is the deterministic DDIM of ``deme.sample.ddim_sample`` (eta = 0, same scheduler and steps), so
the last state of the loop is exactly that function's output. Sampling runs from t = T down; "the end of
interval I_i = [lo, hi)" is the DDIM step whose timestep is the last one >= lo. At that step the
prediction

    x̂0 = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t),   clipped to [-1, 1]

is recorded, one column per interval in sampling order (high noise first).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from deme.analysis.landscape import eval_mode, model_device, to_device
from deme.config import ScheduleConfig
from deme.sample import to_uint8
from deme.schedule import interval_bounds, make_scheduler


def interval_end_steps(timesteps: Sequence[int], n_intervals: int, num_timesteps: int = 1000) -> list[int]:
    """Indices into the (descending) DDIM ``timesteps`` of the last step >= lo of each interval, intervals
    taken in sampling order (I_N first). Raises if an interval holds no DDIM step."""
    ts = list(timesteps)
    steps = []
    for i in range(n_intervals, 0, -1):
        lo, hi = interval_bounds(i, n_intervals, num_timesteps)
        inside = [k for k, t in enumerate(ts) if lo <= t < hi]
        if not inside:
            raise ValueError(f"no DDIM timestep falls in interval [{lo}, {hi}); use more steps")
        steps.append(max(inside))  # descending timesteps: the last index is the smallest t >= lo
    return steps


def predicted_x0(xt: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), clipped to [-1, 1]."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ((xt.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).clamp(-1, 1).to(xt.dtype)


@torch.inference_mode()
def ddim_x0_trajectory(model: nn.Module, noise: torch.Tensor, schedule: ScheduleConfig, steps: int,
                       record: Sequence[int], cond: dict | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Deterministic DDIM (eta = 0) from ``noise``, as ``deme.sample.ddim_sample``; returns the x̂0 at the
    step indices ``record`` and the final sample (clamped to [-1, 1])."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(make_scheduler(schedule).config)
    sched.set_timesteps(steps)
    wanted, x0s = set(record), {}
    device = model_device(model)
    x, cond = noise.to(device), to_device(cond, device)
    for k, t in enumerate(sched.timesteps):
        eps = model(x, t, **cond).sample
        if k in wanted:
            x0s[k] = predicted_x0(x, eps, sched.alphas_cumprod[int(t)])
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return [x0s[k] for k in record], x.clamp(-1, 1)


def compute_sequence(models: Mapping[str, nn.Module], noise: torch.Tensor, schedule: ScheduleConfig, *,
                     steps: int = 50, n_intervals: int = 4, cond: dict | None = None,
                     decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """x̂0 at the end of each interval for every named model (e.g. pretrained, I_1..I_N, ensemble,
    merged; an ``deme.sample.Ensemble`` works as is), all from ``noise``. ``decode`` maps latent x̂0 to
    images in [-1, 1] (a VAE decoder for latent diffusion); None for pixel models. A conditional model
    gets ``cond`` as is (the conditional prediction); for classifier-free guidance pass a wrapper module
    that returns the guided eps as ``.sample``.

    npz keys: images uint8 [M, K, B, H, W, 3], names [M] str, timesteps [K] (the recorded DDIM
    timesteps), intervals [K, 2] ([lo, hi) of each column), steps. Read by
    ``deme.analysis.figures.fig_sequence``.
    """
    from deme.sample import ddim_timesteps

    T = schedule.num_train_timesteps
    ts = ddim_timesteps(schedule, steps)
    record = interval_end_steps(ts, n_intervals, T)
    rows = []
    for model in models.values():
        with eval_mode(model):
            x0s, _ = ddim_x0_trajectory(model, noise, schedule, steps, record, cond)
        if decode is not None:
            x0s = [decode(x).clamp(-1, 1) for x in x0s]
        rows.append(torch.stack([to_uint8(x).permute(0, 2, 3, 1).cpu() for x in x0s]))
    images = torch.stack(rows).numpy()
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    intervals = [interval_bounds(i, n_intervals, T) for i in range(n_intervals, 0, -1)]
    return {"images": images, "names": np.asarray(list(models)),
            "timesteps": np.asarray([ts[k] for k in record], dtype=np.int64),
            "intervals": np.asarray(intervals, dtype=np.int64), "steps": np.asarray(steps)}
