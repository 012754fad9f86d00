"""Fig. 2: are the activation changes of finetuning channel-wise or spatial? (docs/paper.md §4, Fig. 2 recipe)

At the main-path output F in R^{B x C x H x W} of every down, mid and up block (``projected_blocks``):

    channel profile  a = mean_{h,w} F   in R^{B x C}        spatial profile  s = mean_c F   in R^{B x H x W}
    Delta_a = |a_post - a_pre| / mean_c |a_pre|           Delta_s = |s_post - s_pre| / mean_{h,w} |s_pre|

Each difference is normalised per sample and per layer by the mean absolute value of the corresponding
pre-finetuning profile (step 4), so the two kinds are comparable across layers and with each other.

What is captured: the block output *as the next block sees it*. A model with channel-wise projections
(``deme.projection``) applies them with a forward hook registered when the projection was added; the
capture hook is registered later, and PyTorch passes each hook the output returned by the previous one,
so the captured F is the projected output. For down blocks (which return (hidden, residuals)) only the
hidden state is captured; the skip tensors are not.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from deme.analysis.landscape import eval_mode, model_device, slice_cond, to_device
from deme.objectives.deme import add_noise
from deme.projection import projected_blocks

Profiles = dict[str, tuple[torch.Tensor, torch.Tensor]]


def profiles(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> (channel profile a [B, C], spatial profile s [B, H, W]), fp32 (steps 3)."""
    F = F.float()
    return F.mean(dim=(2, 3)), F.mean(dim=1)


@contextlib.contextmanager
def capture_profiles(model: nn.Module) -> Iterator[dict[str, list]]:
    """Forward hooks on every block (registered after any projection hook, see the module docstring)
    that append each call's (a, s) to ``store[name]``; removed on exit."""
    store: dict[str, list] = {}
    handles = []
    for name, block in projected_blocks(model):
        store[name] = []

        def hook(module, args, output, name=name):
            F = output[0] if isinstance(output, tuple) else output
            a, s = profiles(F.detach())
            store[name].append((a.cpu(), s.cpu()))

        handles.append(block.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_profiles(model: nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
                   micro_batch: int = 64) -> Profiles:
    """{block name: (a [B, C], s [B, H, W])} of ``model`` on the noisy inputs ``xt`` at timesteps ``t``."""
    n, device = len(xt), model_device(model)
    with eval_mode(model), capture_profiles(model) as store:
        for lo in range(0, n, micro_batch):
            hi = min(n, lo + micro_batch)
            model(xt[lo:hi].to(device), t[lo:hi].to(device), **to_device(slice_cond(cond, lo, hi, n), device))
    return {k: (torch.cat([a for a, _ in v]), torch.cat([s for _, s in v])) for k, v in store.items()}


def relative_change(pre: torch.Tensor, post: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """|post - pre| / mean|pre|, the mean taken per sample over all non-batch dims (step 4)."""
    scale = pre.abs().flatten(1).mean(1).clamp_min(eps).view(-1, *([1] * (pre.ndim - 1)))
    return (post - pre).abs() / scale


def _subsample(values: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    if cap <= 0 or len(values) <= cap:
        return values
    return values[torch.randperm(len(values), generator=generator)[:cap]]


def compute_activations(pre: nn.Module, post: nn.Module, x0: torch.Tensor, noise: torch.Tensor,
                        t: int | torch.Tensor, alphas_cumprod: torch.Tensor, cond: dict | None = None,
                        layer: str | None = None, *, micro_batch: int = 64, max_pooled: int = 1_000_000,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Fig. 2 (docs/paper.md §4): the channel and spatial activation changes between ``pre`` (pretrained) and
    ``post`` (finetuned) on the same noisy inputs x_t = add_noise(x0, noise, t) (``t``: one int, or one
    timestep per image drawn from the interval).

    ``layer`` is the representative layer of panel (a) (default: the mid block). The pooled values of
    panel (b) are uniformly subsampled (seeded) to at most ``max_pooled`` each (0: keep all); the
    per-layer means are exact.

    npz keys: layers [L] str, layer str, t [B], a_pre / a_post / da_rep [C] and s_pre / s_post / ds_rep
    [H, W] (batch means of the representative layer's profiles and of its normalised differences),
    da / ds (all normalised Delta_a and Delta_s pooled over layers and samples, float32), da_layer /
    ds_layer [L] (per-layer means). Read by ``deme.analysis.figures.fig2``.
    """
    t = torch.as_tensor(t, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(len(x0)).clone()
    xt = add_noise(alphas_cumprod, x0, noise, t.to(x0.device))
    p_pre = block_profiles(pre, xt, t, cond, micro_batch)
    p_post = block_profiles(post, xt, t, cond, micro_batch)
    names = list(p_pre)
    if layer is None:
        layer = "mid_block" if "mid_block" in names else names[len(names) // 2]
    if layer not in names:
        raise KeyError(f"unknown layer {layer!r}; the blocks are {names}")
    da, ds, da_layer, ds_layer = [], [], [], []
    for name in names:
        (a0, s0), (a1, s1) = p_pre[name], p_post[name]
        da_n, ds_n = relative_change(a0, a1), relative_change(s0, s1)
        da.append(da_n.flatten())
        ds.append(ds_n.flatten())
        da_layer.append(float(da_n.mean()))
        ds_layer.append(float(ds_n.mean()))
        if name == layer:
            rep = {"a_pre": a0.mean(0), "a_post": a1.mean(0), "da_rep": da_n.mean(0),
                   "s_pre": s0.mean(0), "s_post": s1.mean(0), "ds_rep": ds_n.mean(0)}
    g = torch.Generator().manual_seed(seed)
    out = {k: v.numpy().astype(np.float32) for k, v in rep.items()}
    out.update({"layers": np.asarray(names), "layer": np.asarray(layer), "t": t.cpu().numpy(),
                "da": _subsample(torch.cat(da), max_pooled, g).numpy().astype(np.float32),
                "ds": _subsample(torch.cat(ds), max_pooled, g).numpy().astype(np.float32),
                "da_layer": np.asarray(da_layer), "ds_layer": np.asarray(ds_layer)})
    return out
