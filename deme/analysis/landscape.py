"""Loss landscapes: the Li et al. (2018) filter-normalised random plane of Fig. 4, and the loss-on-a-plane
evaluator shared with Fig. 6a (docs/paper.md §4, "Fig. 4" and "Fig. 6(a)").

Every loss here is the plain epsilon-MSE (mean over batch, channels and pixels, fp32) on a *fixed*
evaluation set (images, noise and timesteps chosen once), so two grid points differ only by their weights.

Weights are set from an ``origin`` state plus directions, ``theta + x d1 + y d2``, computed per tensor in
float64 and cast to each tensor's dtype; the model's own weights are restored afterwards, also when the
loss function raises (:func:`swapped_weights`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deme.io import derive_seed
from deme.objectives.deme import add_noise

State = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module], "float | Sequence[float] | np.ndarray"]


# ----------------------------------------------------------------------------------------------------
# The epsilon-MSE on a fixed set (shared by every analysis).

def slice_cond(cond: dict | None, lo: int, hi: int, batch: int) -> dict:
    """The micro-batch [lo, hi) of the UNet's extra inputs: tensors whose first dim is ``batch`` are
    sliced (e.g. ``encoder_hidden_states``), anything else is passed whole."""
    if not cond:
        return {}
    return {k: v[lo:hi] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v for k, v in cond.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(cond: dict | None, device: torch.device) -> dict:
    """The UNet's extra inputs with every tensor on ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in (cond or {}).items()}


def eps_mse(model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
            alphas_cumprod: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """The plain epsilon-MSE ||eps - eps_theta(x_t, t)||^2, mean over batch, channels and pixels (fp32),
    as in ``deme.objectives.deme.EpsObjective`` with no weights and no consistency term (docs/paper.md §1.3).
    The inputs may live on another device than the model (e.g. a large fixed set kept on the CPU): each
    (micro-)batch is moved to the model's device."""
    device = model_device(model)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    xt = add_noise(alphas_cumprod, x0, noise, t)
    pred = model(xt, t, **to_device(cond, device)).sample.float()
    return F.mse_loss(pred, noise.float())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off while measuring (so a fixed input gives a fixed loss); the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def mean_eps_loss(model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  alphas_cumprod: torch.Tensor, cond: dict | None = None, micro_batch: int = 256) -> float:
    """eps-MSE over the whole fixed set (x0[i], noise[i], t[i]), computed in micro-batches and weighted so
    that it equals the full-batch mean."""
    n, total = len(x0), 0.0
    with eval_mode(model):
        for lo in range(0, n, micro_batch):
            hi = min(n, lo + micro_batch)
            loss = eps_mse(model, x0[lo:hi], noise[lo:hi], t[lo:hi], alphas_cumprod, slice_cond(cond, lo, hi, n))
            total += float(loss) * (hi - lo) / n
    return total


# ----------------------------------------------------------------------------------------------------
# Directions and weights.

def floating_state(model: nn.Module) -> State:
    """A detached copy of the model's floating-point state (the tensors a direction moves)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def filter_normalized_direction(state: State, generator: torch.Generator) -> State:
    """A Gaussian direction with the shapes of ``state``, filter-normalised (Li et al. 2018, §4).

    For every tensor with >= 2 dims, each filter d[i] (a slice along dim 0: an output channel of a conv
    or a row of a linear layer) is rescaled to the norm of the weight's filter, ||d[i]|| = ||w[i]||.
    1-D tensors (biases, GroupNorm/LayerNorm scales and shifts) get a zero direction, as Li et al. do with
    their "ignore biases and BN" option: they are not moved on the plane. Fig. 4 recipe, step 1.
    """
    out = {}
    for k, w in state.items():
        if w.ndim <= 1:
            out[k] = torch.zeros_like(w, dtype=torch.float32)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device)
        w_norm = w.float().flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        scale = (w_norm / d_norm.clamp_min(1e-12)).view(-1, *([1] * (w.ndim - 1)))
        out[k] = d * scale
    return out


@torch.no_grad()
def set_weights(model: nn.Module, origin: State, directions: Sequence[State] = (),
                coeffs: Sequence[float] = ()) -> None:
    """In place: every tensor k of ``origin`` becomes origin[k] + sum_j coeffs[j] directions[j][k]
    (float64 arithmetic, cast to the model's dtype). Tensors missing from a direction do not move."""
    current = model.state_dict()
    missing = sorted(set(origin) - set(current))
    if missing:
        raise KeyError(f"origin state has tensors the model lacks: {missing[:5]}")
    for k, o in origin.items():
        acc = o.to(current[k].device, torch.float64)
        for d, c in zip(directions, coeffs):
            if c != 0 and k in d:
                acc = acc + float(c) * d[k].to(acc.device, torch.float64)
        current[k].copy_(acc.to(current[k].dtype))


@contextlib.contextmanager
def swapped_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Snapshot the model's floating weights and restore them on exit, whatever happened inside."""
    saved = floating_state(model)
    try:
        yield model
    finally:
        set_weights(model, saved)


def _as_array(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).reshape(-1)


def loss_at_points(model: nn.Module, origin: State, d1: State, d2: State, points: Sequence[tuple[float, float]],
                   loss_fn: LossFn, progress: bool = False, shards=None, key: str = "point") -> np.ndarray:
    """loss_fn(model at origin + x d1 + y d2) for each (x, y) in ``points``: [P, K] where K is the number
    of values ``loss_fn`` returns (1 for a scalar). The model's weights are restored afterwards.
    ``shards`` (deme/resume.py): keep each point's values under ``<key>-<index>``, so a killed run resumes."""
    device = model_device(model)  # move the origin and directions once, not per point
    origin, d1, d2 = ({k: v.to(device) for k, v in s.items()} for s in (origin, d1, d2))
    rows = []
    with swapped_weights(model):
        for k, (x, y) in enumerate(tqdm(points, desc="loss plane", disable=not progress, dynamic_ncols=True)):
            saved = shards.get(f"{key}-{k:05d}") if shards is not None else None
            if saved is None:
                set_weights(model, origin, (d1, d2), (x, y))
                saved = {"loss": _as_array(loss_fn(model))}
                if shards is not None:
                    shards.put(f"{key}-{k:05d}", saved)
            rows.append(saved["loss"])
    return np.stack(rows)


def loss_on_plane(model: nn.Module, origin: State, d1: State, d2: State, xs: Sequence[float],
                  ys: Sequence[float], loss_fn: LossFn, progress: bool = False, shards=None,
                  key: str = "grid") -> np.ndarray:
    """The loss surface on the grid xs x ys: [K, len(ys), len(xs)] with loss[k, j, i] at
    origin + xs[i] d1 + ys[j] d2 (the layout of ``plt.contourf(xs, ys, loss[k])``); K as in
    :func:`loss_at_points`. Each grid point sets the weights once and evaluates every loss in ``loss_fn``."""
    points = [(float(x), float(y)) for y in ys for x in xs]
    values = loss_at_points(model, origin, d1, d2, points, loss_fn, progress, shards, key)
    return values.reshape(len(ys), len(xs), -1).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------------
# Fig. 4.

def fixed_timesteps(n: int, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps drawn uniformly from [lo, hi) once (the fixed t of an evaluation set)."""
    return torch.randint(lo, hi, (n,), generator=generator)


def range_losses(x0: torch.Tensor, noise: torch.Tensor, ranges: Sequence[tuple[int, int]],
                 alphas_cumprod: torch.Tensor, *, t_draws: int = 4, seed: int = 0, cond: dict | None = None,
                 micro_batch: int = 256) -> tuple[Callable[[nn.Module], np.ndarray], torch.Tensor]:
    """The Fig. 4 evaluation set and its loss function: every image with its fixed noise is repeated
    ``t_draws`` times, and for each range [lo, hi) one fixed t ~ U[lo, hi) is drawn per copy (seeded; the
    same images and noise for every range). Returns (loss_fn(model) -> [k] losses, t [k, n * t_draws])."""
    x = x0.repeat_interleave(t_draws, 0)
    eps = noise.repeat_interleave(t_draws, 0)
    c = {k: v.repeat_interleave(t_draws, 0) if torch.is_tensor(v) and v.ndim and v.shape[0] == len(x0) else v
         for k, v in (cond or {}).items()}
    g = torch.Generator().manual_seed(derive_seed(seed, "landscape-t"))
    ts = torch.stack([fixed_timesteps(len(x), lo, hi, g) for lo, hi in ranges]).to(x0.device)

    def loss_fn(model: nn.Module) -> np.ndarray:
        return np.array([mean_eps_loss(model, x, eps, t, alphas_cumprod, c, micro_batch) for t in ts])

    return loss_fn, ts


def compute_landscape(model: nn.Module, x0: torch.Tensor, noise: torch.Tensor,
                      ranges: Sequence[tuple[int, int]], alphas_cumprod: torch.Tensor, *, grid: int = 25,
                      span: float = 1.0, t_draws: int = 4, seed: int = 0, cond: dict | None = None,
                      micro_batch: int = 256, progress: bool = False, shards=None) -> dict[str, np.ndarray]:
    """Fig. 4 (docs/paper.md §4): the eps-MSE of ``model`` on the filter-normalised random plane, one surface
    per timestep range, all from the same two directions (seeded) and the same images and noise
    (``shards``: keep finished grid points, deme/resume.py).

    npz keys: xs [g], ys [g] (alpha, beta in [-span, span]), ranges [k, 2], loss [k, g, g]
    (loss[k, j, i] at (xs[i], ys[j])), origin_loss [k] (the model itself), t [k, n * t_draws], seed,
    t_draws, samples. Read by ``deme.analysis.figures.fig4``.
    """
    origin = floating_state(model)
    g = torch.Generator().manual_seed(derive_seed(seed, "landscape-directions"))
    d1 = filter_normalized_direction(origin, g)
    d2 = filter_normalized_direction(origin, g)
    loss_fn, ts = range_losses(x0, noise, ranges, alphas_cumprod, t_draws=t_draws, seed=seed, cond=cond,
                               micro_batch=micro_batch)
    xs = np.linspace(-span, span, grid)
    origin_loss = loss_fn(model)
    loss = loss_on_plane(model, origin, d1, d2, xs, xs, loss_fn, progress, shards, "landscape")
    if shards is not None:
        shards.note(len(xs) ** 2, "grid points")
    return {"xs": xs, "ys": xs.copy(), "ranges": np.asarray(ranges, dtype=np.int64), "loss": loss,
            "origin_loss": origin_loss, "t": ts.cpu().numpy(), "seed": np.asarray(seed),
            "t_draws": np.asarray(t_draws), "samples": np.asarray(len(x0))}
