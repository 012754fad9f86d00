"""Sampling: DDIM with per-image seeds, and the timestep ensemble of DeMe ("before merge", docs/paper.md §1.7).

Every image i has its own initial-noise seed, so a set of samples does not depend on the batch size or
on how the work is split, and the pretrained, ensemble and merged models are compared on the same noise.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deme.config import SampleConfig, ScheduleConfig
from deme.schedule import interval_index, make_scheduler


class Ensemble(nn.Module):
    """Uses model k(t) = min(floor(t N / T), N - 1) at a step whose current timestep is t (Eq. 7)."""

    def __init__(self, models: Sequence[nn.Module], num_timesteps: int = 1000):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.num_timesteps = num_timesteps

    def index(self, t: int) -> int:
        return interval_index(int(t), len(self.models), self.num_timesteps)

    def forward(self, x: torch.Tensor, t, *args, **kwargs):
        t_all = torch.as_tensor(t).flatten()
        if not bool((t_all == t_all[0]).all()):
            raise ValueError("the ensemble needs one timestep per call (all samples at the same step)")
        return self.models[self.index(int(t_all[0]))](x, t, *args, **kwargs)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One N(0, I) tensor of ``shape`` per seed, stacked."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def ddim_timesteps(schedule: ScheduleConfig, steps: int) -> list[int]:
    """The DDIM timesteps (leading spacing, offset 0: 980, 960, ..., 0 for 50 steps)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(make_scheduler(schedule).config)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


@torch.inference_mode()
def ddim_sample(model: nn.Module, noise: torch.Tensor, schedule: ScheduleConfig, steps: int = 50,
                eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """DDIM from ``noise`` (on the model's device); returns samples in [-1, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(make_scheduler(schedule).config)
    sched.set_timesteps(steps)
    x = noise
    for t in sched.timesteps:
        eps = model(x, t).sample
        x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, quantised as PIL does: round((x + 1) / 2 * 255) (docs/paper.md §8.3)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def autocast(device: torch.device, precision: str):
    """Mixed precision for the UNet while sampling (docs/paper.md §1.9 samples in fp16); a no-op for fp32."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def sample_batch(model: nn.Module, seeds: Sequence[int], schedule: ScheduleConfig, sample: SampleConfig,
                 shape: tuple[int, ...], device: torch.device, steps: int | None = None) -> torch.Tensor:
    """uint8 [b, C, H, W] DDIM samples of ``model`` (on ``device``), one per seed."""
    noise = initial_noise(seeds, shape).to(device)
    # eta > 0: each image draws its step noise from its own generator (diffusers accepts a list)
    gen = ([torch.Generator(device=device).manual_seed(int(s) + 1) for s in seeds] if sample.eta > 0 else None)
    with autocast(device, sample.precision):
        x = ddim_sample(model, noise, schedule, steps or sample.steps, sample.eta, gen)
    return to_uint8(x).cpu()


def generate(model: nn.Module, seeds: Sequence[int], schedule: ScheduleConfig, sample: SampleConfig,
             shape: tuple[int, ...], device: torch.device, desc: str = "sampling",
             steps: int | None = None, batches: Sequence[tuple[int, int]] | None = None) -> Iterator[torch.Tensor]:
    """Yield uint8 [b, C, H, W] DDIM samples for ``seeds`` in batches of ``sample.batch_size``, in order
    (or only the ``batches`` [lo, hi) ranges given: one process's share, deme/distributed.py)."""
    from deme.distributed import batch_ranges

    model.to(device).eval()
    batches = list(batches) if batches is not None else batch_ranges(len(seeds), sample.batch_size)
    bar = tqdm(total=sum(hi - lo for lo, hi in batches), desc=desc, unit="img", dynamic_ncols=True)
    for lo, hi in batches:
        yield sample_batch(model, list(seeds[lo:hi]), schedule, sample, shape, device, steps)
        bar.update(hi - lo)
    bar.close()


def image_grid(images: np.ndarray | torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """uint8 [n, C, H, W] or [n, H, W, C] -> one uint8 [H', W', C] grid, ``nrow`` images per row (default
    ceil(sqrt(n))), 1-pixel white gaps: torchvision's ``make_grid`` (grey images come back as RGB)."""
    from torchvision.utils import make_grid

    x = torch.as_tensor(np.asarray(images))
    if not (x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3)):  # NHWC -> NCHW
        x = x.permute(0, 3, 1, 2)
    grid = make_grid(x, nrow=nrow or int(np.ceil(np.sqrt(len(x)))), padding=1, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def save_grid(images, path, nrow: int | None = None, scale: int = 4) -> None:
    import io

    from PIL import Image

    from deme.io import atomic_write_bytes

    img = Image.fromarray(image_grid(images, nrow).squeeze())
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
