"""Task-vector geometry: the Fig. 6(a) plane, the Fig. 6(b) per-layer statistics and the Fig. 7 cosine
matrices with their seed noise floor (docs/paper.md §4).

A task vector tau_i = theta_i - theta is a state (``deme.merge.task_vector``: float64, floating tensors
only, projections included). Flattening follows the state's key order (``deme.merge.flatten``).
"""
from __future__ import annotations

import itertools
import re
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from deme.analysis.landscape import LossFn, loss_at_points, loss_on_plane
from deme.merge import flatten, task_vector
from deme.projection import ATTR

State = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Fig. 6(a): the plane through theta spanned by tau_a and tau_b.

def unflatten(vector: torch.Tensor, like: State) -> State:
    """The inverse of ``deme.merge.flatten``: split ``vector`` into tensors of ``like``'s keys and shapes."""
    out, pos = {}, 0
    for k, v in like.items():
        out[k] = vector[pos:pos + v.numel()].view(v.shape)
        pos += v.numel()
    if pos != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the state {pos}")
    return out


def plane_basis(tau_a: State, tau_b: State) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal basis of Fig. 6(a), step 1 (Garipov et al.; float64, flattened):
    u = tau_a / ||tau_a||,  v = (tau_b - <tau_b, u> u) / ||.||."""
    a, b = flatten(tau_a), flatten(tau_b)
    u = a / a.norm()
    w = b - (b @ u) * u
    norm = w.norm()
    if norm <= 1e-12 * b.norm():
        raise ValueError("tau_b is parallel to tau_a: they do not span a plane")
    return u, w / norm


def plane_coords(u: torch.Tensor, v: torch.Tensor, tau: State | torch.Tensor) -> tuple[float, float]:
    """(<tau, u>, <tau, v>): the coordinates of theta + tau projected on the plane (theta at (0, 0))."""
    t = flatten(tau) if isinstance(tau, dict) else tau.double()
    return float(t @ u), float(t @ v)


def offplane_distance(u: torch.Tensor, v: torch.Tensor, tau: State | torch.Tensor) -> float:
    """||tau - its projection on the plane||: how far theta + tau lies from the plane."""
    t = flatten(tau) if isinstance(tau, dict) else tau.double()
    return float((t - (t @ u) * u - (t @ v) * v).norm())


def combination(taus: Sequence[State], weights: Sequence[float]) -> State:
    """sum_i w_i tau_i (the merged point is theta + this; ``deme.merge.merge_states``)."""
    return {k: sum(float(w) * tau[k] for tau, w in zip(taus, weights)) for k in taus[0]}


def plane_grid(points: np.ndarray, grid: int = 31, margin: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """xs, ys: ``grid`` points each over the bounding box of ``points`` [P, 2], extended by ``margin`` of
    its width (height) on each side (Fig. 6(a), step 3)."""
    lo, hi = points.min(0), points.max(0)
    pad = margin * np.maximum(hi - lo, 1e-12)
    return np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid), np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)


def pair_plane(model: nn.Module, base: State, tau_a: State, tau_b: State, loss_fn: LossFn,
               merged: State | None = None, *, grid: int = 31, margin: float = 0.2,
               progress: bool = False, shards=None, key: str = "pair") -> dict[str, np.ndarray]:
    """The loss surface of one pair on its plane: xs, ys [g], loss [g, g] (loss[j, i] at (xs[i], ys[j])),
    points [M, 2] (theta, theta_a, theta_b[, merged projection]) and their losses point_loss [M], and the
    merged point's distance to the plane (NaN without one). ``loss_fn`` must return one value."""
    u, v = plane_basis(tau_a, tau_b)
    taus = [tau_a, tau_b] + ([merged] if merged is not None else [])
    points = np.array([(0.0, 0.0)] + [plane_coords(u, v, t) for t in taus])
    xs, ys = plane_grid(points, grid, margin)
    like = {k: base[k] for k in tau_a}
    d1, d2 = unflatten(u, like), unflatten(v, like)
    loss = loss_on_plane(model, base, d1, d2, xs, ys, loss_fn, progress, shards, f"{key}-grid")[0]
    point_loss = loss_at_points(model, base, d1, d2, [tuple(p) for p in points], loss_fn, shards=shards,
                                key=f"{key}-points")[:, 0]
    return {"xs": xs, "ys": ys, "loss": loss, "points": points, "point_loss": point_loss,
            "offplane": offplane_distance(u, v, merged) if merged is not None else float("nan")}


def compute_planes(model: nn.Module, base: State, finetuned: Mapping[str, State], loss_fn: LossFn,
                   pairs: Sequence[tuple[int, int]] | None = None, merge_weights: Sequence[float] | None = None,
                   *, grid: int = 31, margin: float = 0.2, progress: bool = False,
                   shards=None) -> dict[str, np.ndarray]:
    """Fig. 6(a) (docs/paper.md §4) for several pairs of interval models (default: all pairs, in order);
    ``shards`` keeps finished grid points (deme/resume.py).

    ``base`` is the pretrained state theta (with identity projections when the models carry them),
    ``finetuned`` maps names to finetuned states, ``loss_fn(model) -> float`` is the full-range eps-MSE
    on a fixed set (e.g. ``landscape.range_losses(..., [(0, T)])``), ``merge_weights`` (one per model)
    adds the merged point theta + sum_i w_i tau_i, projected on each plane.

    npz keys: names [N] str, pairs [P, 2], xs [P, g], ys [P, g], loss [P, g, g], point_names [M] str,
    points [P, M, 2], point_loss [P, M], offplane [P] (merged point's distance to the plane), norms [N]
    (||tau_i||), merge_weights [N] (when given). Read by ``deme.analysis.figures.fig6a``.
    """
    names = list(finetuned)
    taus = [task_vector(finetuned[n], base) for n in names]
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(range(len(names)), 2))
    merged = combination(taus, merge_weights) if merge_weights is not None else None
    planes = [pair_plane(model, base, taus[a], taus[b], loss_fn, merged, grid=grid, margin=margin,
                         progress=progress, shards=shards, key=f"pair-{a}-{b}") for a, b in pairs]
    if shards is not None:
        shards.note(sum(len(p["points"]) + p["loss"].size for p in planes), "plane points")
    out = {"names": np.asarray(names), "pairs": np.asarray(pairs, dtype=np.int64),
           "point_names": np.asarray(["θ", "θ_a", "θ_b"] + (["merged"] if merged is not None else []))}
    for key in ("xs", "ys", "loss", "points", "point_loss", "offplane"):
        out[key] = np.stack([np.asarray(p[key], dtype=np.float64) for p in planes])
    out["norms"] = np.array([float(flatten(t).norm()) for t in taus])
    if merge_weights is not None:
        out["merge_weights"] = np.asarray(merge_weights, dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------------
# Fig. 6(b): per-layer statistics.

PROJECTIONS = "projections"
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


def layer_group(key: str) -> str:
    """The UNet module a parameter belongs to (Fig. 6(b) recipe): conv_in, time_embedding,
    down_blocks.i, mid_block, up_blocks.i, conv_out (conv_norm_out included), and every channel
    projection ``<block>.channel_proj`` in its own group "projections"; anything else by its first
    name component (e.g. class_embedding, add_embedding)."""
    if f".{ATTR}." in f".{key}":
        return PROJECTIONS
    m = _BLOCK.match(key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    head = key.split(".")[0]
    if head in ("conv_norm_out", "conv_out", "conv_act"):
        return "conv_out"
    if head in ("time_proj", "time_embedding"):
        return "time_embedding"
    return head


def _group_rank(group: str) -> tuple[int, int]:
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)$", group)
    if group == "conv_in":
        return (0, 0)
    if group == "time_embedding":
        return (1, 0)
    if m and m.group(1) == "down_blocks":
        return (3, int(m.group(2)))
    if group == "mid_block":
        return (4, 0)
    if m:
        return (5, int(m.group(2)))
    if group == "conv_out":
        return (6, 0)
    if group == PROJECTIONS:
        return (7, 0)
    return (2, 0)  # other embeddings (class, text) between the time embedding and the first block


def layer_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """{group: keys} in forward order (conv_in ... conv_out, then projections); every key exactly once."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(layer_group(k), []).append(k)
    order = sorted(groups, key=lambda g: (_group_rank(g), list(groups).index(g)))
    return {g: groups[g] for g in order}


QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)  # min, q1, median, q3, max


def _entries(taus: Sequence[State], keys: Sequence[str]) -> np.ndarray:
    return torch.cat([tau[k].flatten().double().cpu() for tau in taus for k in keys]).numpy()


def group_statistics(values: np.ndarray) -> dict[str, np.ndarray | float]:
    """quantiles / abs_quantiles (min, q1, median, q3, max of the entries and of their magnitudes),
    mean_abs, l2 and count of one group's task-vector entries."""
    mag = np.abs(values)
    return {"quantiles": np.quantile(values, QUANTILES), "abs_quantiles": np.quantile(mag, QUANTILES),
            "mean_abs": float(mag.mean()), "l2": float(np.sqrt((values ** 2).sum())), "count": len(values)}


def compute_layer_stats(base: State, finetuned: Mapping[str, State], intervals: Sequence[tuple[int, int]],
                        num_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """Fig. 6(b) (docs/paper.md §4): per-module statistics of tau_i for every interval model.

    With >= 2 models, also the 2-way pooled view: the entries of all models whose interval lies in
    [0, T/2) (low noise) against those in [T/2, T) (high noise).

    npz keys: names [N] str, intervals [N, 2], groups [L] str, quantiles / abs_quantiles [N, L, 5]
    (min, q1, median, q3, max), mean_abs [N, L], l2 [N, L], count [L]; and, when pooled, pooled_names [2]
    str, pooled_abs_quantiles [2, L, 5], pooled_mean_abs [2, L]. Read by ``deme.analysis.figures.fig6b``.
    """
    names = list(finetuned)
    taus = [task_vector(finetuned[n], base) for n in names]
    groups = layer_groups(list(taus[0]))
    stats = [[group_statistics(_entries([tau], keys)) for keys in groups.values()] for tau in taus]

    def stack(key: str, rows) -> np.ndarray:
        return np.array([[s[key] for s in row] for row in rows])

    out = {"names": np.asarray(names), "intervals": np.asarray(intervals, dtype=np.int64),
           "groups": np.asarray(list(groups)), "quantiles": stack("quantiles", stats),
           "abs_quantiles": stack("abs_quantiles", stats), "mean_abs": stack("mean_abs", stats),
           "l2": stack("l2", stats), "count": np.array([s["count"] for s in stats[0]], dtype=np.int64)}
    half = num_timesteps // 2
    low = [tau for tau, (lo, hi) in zip(taus, intervals) if hi <= half]
    high = [tau for tau, (lo, hi) in zip(taus, intervals) if lo >= half]
    if len(taus) >= 2 and low and high:
        pooled = [[group_statistics(_entries(side, keys)) for keys in groups.values()] for side in (low, high)]
        out.update({"pooled_names": np.asarray([f"[0,{half})", f"[{half},{num_timesteps})"]),
                    "pooled_abs_quantiles": stack("abs_quantiles", pooled),
                    "pooled_mean_abs": stack("mean_abs", pooled)})
    return out


# ----------------------------------------------------------------------------------------------------
# Fig. 7: cosine similarities between task vectors.

def gram_by_group(taus: Sequence[State], groups: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """[L, N, N] inner products <tau_i, tau_j> restricted to each group (float64); their sum over groups
    is the Gram matrix over all parameters. One tensor at a time: no flattened copies."""
    out = torch.zeros(len(groups), len(taus), len(taus), dtype=torch.float64)
    for gi, keys in enumerate(groups.values()):
        for k in keys:
            m = torch.stack([tau[k].flatten().double().cpu() for tau in taus])
            out[gi] += m @ m.T
    return out


def gram_to_cosine(gram: torch.Tensor) -> torch.Tensor:
    """[..., N, N] Gram -> cosines (NaN where a vector is zero, e.g. a frozen group)."""
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    return gram / (norms[..., :, None] * norms[..., None, :])


def cosine(tau_a: State, tau_b: State) -> float:
    """cos(vec(tau_a), vec(tau_b)) over all parameters."""
    g = gram_by_group([tau_a, tau_b], {"all": list(tau_a)}).sum(0)
    return float(gram_to_cosine(g)[0, 1])


def noise_floor(finetuned_1: State, finetuned_2: State, base: State) -> float:
    """The cosine between two task vectors of the same interval trained with different seeds (docs/paper.md §4,
    Fig. 7 [OURS]): what "orthogonal" means for task vectors that share their task."""
    return cosine(task_vector(finetuned_1, base), task_vector(finetuned_2, base))


def compute_cosines(base: State, finetuned: Mapping[str, State],
                    seed_pairs: Mapping[str, tuple[State, State]] | None = None) -> dict[str, np.ndarray]:
    """Fig. 7 (docs/paper.md §4): the N x N cosine matrix of the task vectors over all parameters and per
    layer group, and the noise floor of each ``seed_pairs`` entry (two finetuned states of the same
    interval, different seeds), overall and per group.

    npz keys: names [N] str, cos [N, N], groups [L] str, layer_cos [L, N, N], floor_names [F] str,
    floor [F], floor_layer [F, L]. Read by ``deme.analysis.figures.fig7``.
    """
    names = list(finetuned)
    taus = [task_vector(finetuned[n], base) for n in names]
    groups = layer_groups(list(taus[0]))
    gram = gram_by_group(taus, groups)
    floor_names, floor, floor_layer = [], [], []
    for name, (s1, s2) in (seed_pairs or {}).items():
        g = gram_by_group([task_vector(s1, base), task_vector(s2, base)], groups)
        floor_names.append(name)
        floor.append(float(gram_to_cosine(g.sum(0))[0, 1]))
        floor_layer.append(gram_to_cosine(g)[:, 0, 1].numpy())
    return {"names": np.asarray(names), "cos": gram_to_cosine(gram.sum(0)).numpy(),
            "groups": np.asarray(list(groups)), "layer_cos": gram_to_cosine(gram).numpy(),
            "floor_names": np.asarray(floor_names, dtype=str), "floor": np.asarray(floor, dtype=np.float64),
            "floor_layer": np.asarray(floor_layer, dtype=np.float64).reshape(len(floor), len(groups))}


def compute_seed_geometry(base: State, by_seed: Sequence[Mapping[str, State]]) -> dict[str, np.ndarray]:
    """The Fig. 7 cosine matrix and the task-vector norms of every training seed, so that the geometric
    claims rest on seeds rather than on one run (docs/paper.md §4): ``by_seed[s]`` maps the interval names
    to seed s's finetuned states (the same names in every seed).

    npz keys: seed_cos [S, N, N] (cosines over all parameters), seed_norms [S, N] (||tau_i||).
    """
    cos, norms = [], []
    for finetuned in by_seed:
        taus = [task_vector(finetuned[n], base) for n in finetuned]
        gram = gram_by_group(taus, {"all": list(taus[0])}).sum(0)
        cos.append(gram_to_cosine(gram).numpy())
        norms.append(gram.diagonal().sqrt().numpy())
    return {"seed_cos": np.stack(cos), "seed_norms": np.stack(norms)}


def seed_pairs(by_seed: Sequence[Mapping[str, State]]) -> dict[str, tuple[State, State]]:
    """Every pair of training seeds of every interval, named "<interval> s<a>-s<b>": the seed floor of
    ``compute_cosines`` (two runs of the same task)."""
    return {f"{name} s{a}-s{b}": (by_seed[a][name], by_seed[b][name])
            for name in by_seed[0] for a, b in itertools.combinations(range(len(by_seed)), 2)}
