"""Task vectors, task arithmetic and the merge-weight search (docs/paper.md §1.8).

    tau_i = theta_i - theta        (all floating-point tensors; integer/bool buffers skipped)
    theta_merged = theta + sum_i w_i tau_i        (w_i not constrained to sum to 1)

theta is the pretrained model *with* identity projections when the interval models carry them, so
tau_i(W) = W_i - I and the projections stay in the merged model (docs/paper.md §1.5).

The search scores candidate weights with a callable (FID on a proxy sample set with seeds disjoint from
the final evaluation) and caches every score, so no candidate is scored twice and a resumed search skips
finished candidates.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Sequence

import torch
from torch import nn

State = dict[str, torch.Tensor]


def task_vector(finetuned: State, base: State, dtype: torch.dtype = torch.float64) -> State:
    """tau = theta_i - theta, formed in float64 by default so that theta + 1 * tau is exactly theta_i."""
    if finetuned.keys() != base.keys():
        missing = sorted(set(base) ^ set(finetuned))[:5]
        raise ValueError(f"task vector: the models have different parameters (e.g. {missing}); "
                         "were they trained with the same channel_projection setting?")
    return {k: finetuned[k].to(dtype) - base[k].to(dtype) for k in base if base[k].is_floating_point()}


def merge_states(base: State, vectors: Sequence[State], weights: Sequence[float]) -> State:
    """theta + sum_i w_i tau_i, computed in float64 and cast back to each tensor's dtype."""
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} task vectors but {len(weights)} weights")
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.double().clone()
        for tau, w in zip(vectors, weights):
            if w != 0:
                acc += float(w) * tau[k].double()
        out[k] = acc.to(v.dtype)
    return out


def merged_model(base: nn.Module, vectors: Sequence[State], weights: Sequence[float]) -> nn.Module:
    model = copy.deepcopy(base)
    model.load_state_dict(merge_states(base.state_dict(), vectors, weights), strict=True)
    return model.eval()


def flatten(state: State) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


# ----------------------------------------------------------------------------------------------------
# Weight search.

Score = Callable[[tuple[float, ...]], float]


class Scorer:
    """Memoised score function; ``rows`` is the search table (weights, score, phase) in scoring order."""

    def __init__(self, fn: Score, cache: dict[tuple[float, ...], float] | None = None,
                 on_new: Callable[[tuple[float, ...], float, str], None] | None = None):
        self.fn, self.cache, self.on_new = fn, dict(cache or {}), on_new
        self.rows: list[tuple[tuple[float, ...], float, str]] = []
        self._seen: set[tuple[float, ...]] = set()

    def __call__(self, w: Sequence[float], phase: str) -> float:
        key = tuple(round(float(x), 6) for x in w)
        if key not in self.cache:
            self.cache[key] = float(self.fn(key))
            if self.on_new:
                self.on_new(key, self.cache[key], phase)
        if key not in self._seen:
            self._seen.add(key)
            self.rows.append((key, self.cache[key], phase))
        return self.cache[key]

    def best(self) -> tuple[tuple[float, ...], float]:
        key, score, _ = min(self.rows, key=lambda r: r[1])
        return key, score


def _clip(x: float, bounds: Sequence[float]) -> float:
    return min(max(x, bounds[0]), bounds[1])


def coordinate_search(score: Scorer, n: int, coarse: Sequence[float], refine_step: float,
                      refine_rounds: int, start: float, bounds: Sequence[float]) -> tuple[float, ...]:
    """Cheap coarse-to-fine: cycle over the weights, trying the coarse values for one weight at a time
    with the others held at the best point so far; then refine each weight by +-step, halving the step
    every round. Costs about n (|coarse| - 1) + 2 n rounds scores instead of |coarse|^n."""
    best = tuple(_clip(start, bounds) for _ in range(n))
    score(best, "start")
    for i in range(n):
        for v in coarse:
            score(best[:i] + (_clip(v, bounds),) + best[i + 1:], "coarse")
        best = score.best()[0]
    step = refine_step
    for r in range(refine_rounds):
        for i in range(n):
            for v in (best[i] - step, best[i] + step):
                score(best[:i] + (_clip(v, bounds),) + best[i + 1:], f"refine{r + 1}")
            best = score.best()[0]
        step /= 2
    return score.best()[0]


def grid_search(score: Scorer, n: int, coarse: Sequence[float], refine_step: float, refine_rounds: int,
                bounds: Sequence[float]) -> tuple[float, ...]:
    """The paper-scale default (docs/paper.md §1.8): all |coarse|^n combinations, then every combination of
    best_i + {-2, -1, 0, 1, 2} x step (clipped), halving the step every further round."""
    for w in itertools.product(coarse, repeat=n):
        score(tuple(_clip(v, bounds) for v in w), "coarse")
    best, step = score.best()[0], refine_step
    for r in range(refine_rounds):
        axes = [sorted({_clip(b + k * step, bounds) for k in (-2, -1, 0, 1, 2)}) for b in best]
        for w in itertools.product(*axes):
            score(w, f"refine{r + 1}")
        best, step = score.best()[0], step / 2
    return best


def search(scorer: Scorer, n: int, merge) -> tuple[float, ...]:
    """The coarse-to-fine weight search of ``merge`` (a MergeConfig), docs/paper.md §1.8."""
    if merge.search == "coordinate":
        return coordinate_search(scorer, n, merge.coarse, merge.refine_step, merge.refine_rounds, merge.start,
                                 merge.bounds)
    return grid_search(scorer, n, merge.coarse, merge.refine_step, merge.refine_rounds, merge.bounds)
