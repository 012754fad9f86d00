"""Fig. 1(a): cosine similarity of the epsilon-MSE gradients at different timesteps (docs/paper.md §4).

    g_t = d/d theta  (1/B) sum_b ||eps_b - eps_theta(x_t^b, t)||^2 / (C H W),     S[t, t'] = cos(g_t, g_t')

Every g_t uses the same B images and the same noise (common random numbers, the [OURS] default), so
S[t, t'] differs from 1 only because of t; the timestep is fixed within a gradient. Gradients are
accumulated over micro-batches (the paper: 128 x 4 = 512 images).

Memory (docs/paper.md §4, "Memory"): with ``sketch_dim = d > 0`` each gradient is replaced by the Gaussian
Johnson-Lindenstrauss sketch R^T g with R in R^{D x d}, R_ij ~ N(0, 1/d), whose inner products estimate
those of the gradients (cosine error about 1/sqrt(d)). R is never formed: its rows for each parameter
tensor are generated in chunks from a seed derived from (seed, parameter name), so it is the same for
every timestep, and a group of timesteps is sketched together to generate each block once.
``sketch_dim = 0`` keeps the exact flattened gradients.

Cost, measured on one H200 with the google/ddpm-cifar10-32 architecture (35.7M parameters, fp32): one
g_t over 512 images takes 0.38 s; sketching a group to d = 65536 takes 11.6 s for 16 timesteps and 15.6 s
for 64 (generating R dominates), so 1000 timesteps take about 10 minutes with group = 64. A group holds
about 2 x group x D x 4 bytes of gradients on the device (18 GB for group = 64 at 35.7M parameters).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deme.analysis.landscape import eps_mse, eval_mode, slice_cond
from deme.io import derive_seed

# Elements of one generated block of R (64 MiB in fp32): rows per chunk = CHUNK_ELEMENTS // d.
CHUNK_ELEMENTS = 1 << 24


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def timestep_gradient(model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: int,
                      alphas_cumprod: torch.Tensor, *, micro_batch: int = 128,
                      cond: dict | None = None) -> list[torch.Tensor]:
    """g_t: the gradient of the eps-MSE over all of ``x0`` at the fixed timestep ``t``, one flattened fp32
    tensor per trainable parameter (micro-batch losses weighted so that the sum is the full-batch mean).
    Uses ``torch.autograd.grad``: the parameters' ``.grad`` is left untouched."""
    params = [p for _, p in trainable_parameters(model)]
    grads = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params]
    n = len(x0)
    with eval_mode(model):
        for lo in range(0, n, micro_batch):
            hi = min(n, lo + micro_batch)
            tt = torch.full((hi - lo,), int(t), dtype=torch.long)
            loss = eps_mse(model, x0[lo:hi], noise[lo:hi], tt, alphas_cumprod, slice_cond(cond, lo, hi, n))
            parts = torch.autograd.grad(loss * ((hi - lo) / n), params, allow_unused=True)
            for acc, g in zip(grads, parts):
                if g is not None:
                    acc += g.detach().flatten().float()
    return grads


def sketch(grads: Sequence[torch.Tensor], names: Sequence[str], dim: int, seed: int = 0) -> torch.Tensor:
    """R^T g for a group of k gradients: ``grads[p]`` is [k, numel_p] (parameter p of every gradient),
    returns [k, dim] fp32. The block of R for parameter p is drawn from N(0, 1/dim) in row chunks from a
    generator seeded by (seed, names[p]) on the gradients' device: deterministic for a (seed, dim, device
    type), the same for every group of timesteps."""
    device = grads[0].device
    out = torch.zeros(grads[0].shape[0], dim, dtype=torch.float32, device=device)
    rows = max(1, CHUNK_ELEMENTS // dim)
    for name, g in zip(names, grads):
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "gradsim-sketch", name))
        for lo in range(0, g.shape[1], rows):
            hi = min(g.shape[1], lo + rows)
            block = torch.randn(hi - lo, dim, generator=gen, dtype=torch.float32, device=device)
            out += g[:, lo:hi].float() @ block
    return out / math.sqrt(dim)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[n, D] -> [n, n] pairwise cosine similarities (float64). A zero vector gives NaN in its row."""
    v = vectors.double()
    gram = v @ v.T
    norms = gram.diagonal().sqrt()
    return gram / (norms[:, None] * norms[None, :])


def range_mask(timesteps: Sequence[int], lo: int, hi: int) -> np.ndarray:
    """[n, n] bool: pairs (i, j), i < j (off-diagonal, each pair once), with both timesteps in [lo, hi)."""
    t = np.asarray(timesteps)
    inside = (t >= lo) & (t < hi)
    return np.triu(inside[:, None] & inside[None, :], k=1)


def off_diagonal(S: np.ndarray, timesteps: Sequence[int], lo: int, hi: int) -> np.ndarray:
    """The off-diagonal entries S[i, j] (i < j) of the pairs whose timesteps both lie in [lo, hi): the
    values of the Fig. 1(a) histograms ([0, T) and [0, T/4))."""
    return np.asarray(S)[range_mask(timesteps, lo, hi)]


def compute_gradsim(model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, timesteps: Sequence[int],
                    alphas_cumprod: torch.Tensor, *, micro_batch: int = 128, sketch_dim: int = 0, seed: int = 0,
                    group: int = 64, cond: dict | None = None, progress: bool = False,
                    shards=None) -> dict[str, np.ndarray]:
    """Fig. 1(a) (docs/paper.md §4): S = cos(g_t, g_t') for t, t' in ``timesteps``, with the same ``x0`` and
    ``noise`` for every t. Gradients are sketched ``group`` timesteps at a time when ``sketch_dim > 0``;
    ``shards`` (deme/resume.py) keeps each finished group's rows, so a killed run resumes.

    npz keys: timesteps [n] int64, S [n, n] float32, sketch_dim, num_params, samples, seed,
    num_train_timesteps. Read by ``deme.analysis.figures.fig1a``.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the images' shape {tuple(x0.shape)}")
    names = [n for n, _ in trainable_parameters(model)]
    timesteps = [int(t) for t in timesteps]
    chunks = [timesteps[lo:lo + group] for lo in range(0, len(timesteps), group)]
    rows: list[torch.Tensor] = []
    bar = tqdm(total=len(timesteps), desc="gradients", disable=not progress, dynamic_ncols=True)
    for g, chunk in enumerate(chunks):
        saved = shards.get(f"group-{g:05d}") if shards is not None else None
        if saved is None:
            pending = []
            for t in chunk:
                pending.append(timestep_gradient(model, x0, noise, t, alphas_cumprod, micro_batch=micro_batch,
                                                 cond=cond))
                bar.update(1)
            if sketch_dim > 0:
                per_param = [torch.stack([gr[p] for gr in pending]) for p in range(len(names))]
                block = sketch(per_param, names, sketch_dim, seed).cpu()
            else:
                block = torch.stack([torch.cat(gr).cpu() for gr in pending])
            if shards is not None:
                shards.put(f"group-{g:05d}", {"rows": block})
        else:
            block = torch.from_numpy(saved["rows"])
            bar.update(len(chunk))
        rows.extend(block)
    bar.close()
    if shards is not None:
        shards.note(len(chunks), "gradient groups")
    S = cosine_matrix(torch.stack(rows))
    num_params = sum(p.numel() for _, p in trainable_parameters(model))
    return {"timesteps": np.asarray(timesteps, dtype=np.int64), "S": S.numpy().astype(np.float32),
            "sketch_dim": np.asarray(sketch_dim), "num_params": np.asarray(num_params),
            "samples": np.asarray(len(x0)), "seed": np.asarray(seed),
            "num_train_timesteps": np.asarray(len(alphas_cumprod))}
