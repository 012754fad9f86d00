"""Uncertainty of FID and KID, and the one rule that decides every claim.

Two sources of noise separate a measured FID from the model's true one:
- the evaluation samples (a finite set of noise seeds): a bootstrap over the generated samples, with the
  *same* resampled indices for every model, since sample i of every model starts from the same noise (paired);
- the training seed (another run of the same recipe gives another model): a t-interval over the seeds
  when a row has n >= 2 of them.

A claim "a beats b" is decided on the 95 % interval of the difference FID(a) - FID(b): *holds* when the
interval lies on the paper's side of zero, *does not hold* when it lies on the other side, *not resolved at
this budget* otherwise. ``difference`` is the one implementation every report uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deme.metrics.fid import Stats, fid_of_features as fid

LEVEL = 0.95
HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved at this budget"


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile (normal for df = inf)."""
    from scipy import stats

    q = 0.5 + level / 2
    return float(stats.norm.ppf(q)) if not np.isfinite(df) else float(stats.t.ppf(q, df))


def bootstrap_indices(n: int, reps: int, seed: int = 0) -> np.ndarray:
    """[reps, n] resampling indices, drawn once and shared by every model (the pairing)."""
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def percentile_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    a = 100 * (1 - level) / 2
    lo, hi = np.percentile(np.asarray(values, np.float64), [a, 100 - a])
    return float(lo), float(hi)


def fid_bootstrap(feats: np.ndarray, ref: Stats, idx: np.ndarray) -> np.ndarray:
    """FID of each bootstrap resample ``feats[idx[r]]`` of the generated samples (the reference is fixed)."""
    return np.array([fid(feats[i], ref) for i in idx])


def kid(feats: np.ndarray, ref_feats: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID (unbiased MMD^2, cubic polynomial kernel (x.y/d + 1)^3) as clean-fid's ``kernel_distance`` computes it,
    from seeded subsets; returns the mean over the subsets and their standard deviation."""
    rng = np.random.RandomState(seed)
    d = feats.shape[1]
    m = min(len(feats), len(ref_feats), subset_size)
    values = []
    for _ in range(subsets):
        x = np.asarray(ref_feats[rng.choice(len(ref_feats), m, replace=False)], np.float64)
        y = np.asarray(feats[rng.choice(len(feats), m, replace=False)], np.float64)
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        values.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if subsets > 1 else 0.0


@dataclass(frozen=True)
class Estimate:
    """A value with its 95 % interval, how many training seeds and evaluation samples it rests on, and the
    standard errors of the two sources (``se_eval`` from the bootstrap, ``se_seed`` across training seeds)."""

    value: float
    lo: float
    hi: float
    seeds: int
    samples: int
    se_eval: float
    se_seed: float | None  # None: one training seed, its spread is unknown

    def text(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def dominant(self) -> str:
        """Which noise source is larger: 'evaluation samples' or 'training seeds'."""
        if self.se_seed is None:
            return "evaluation samples (one training seed)"
        return "training seeds" if self.se_seed > self.se_eval else "evaluation samples"

    def to_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "seeds": self.seeds, "samples": self.samples,
                "se_eval": self.se_eval, "se_seed": self.se_seed}


def _combine(value: float, se_eval: float, per_seed: list[float], level: float) -> tuple[float, float, float | None]:
    """Interval half-width from the evaluation s.e. and, with n >= 2 seeds, the seeds' s.e. (Student t, n - 1 df).
    Var(mean) ~ Var_seed / n + Var_eval; the seeds' spread already holds some evaluation noise, so this errs wide."""
    n = len(per_seed)
    se_seed = float(np.std(per_seed, ddof=1) / np.sqrt(n)) if n >= 2 else None
    se = np.hypot(se_eval, se_seed or 0.0)
    return value, t_quantile(n - 1 if n >= 2 else np.inf, level) * se, se_seed


def estimate(per_seed_feats: Sequence[np.ndarray], ref: Stats, reps: int = 200, seed: int = 0,
             level: float = LEVEL) -> Estimate:
    """FID of one row: the mean over its training seeds with a 95 % interval over seeds and evaluation samples."""
    idx = bootstrap_indices(len(per_seed_feats[0]), reps, seed)
    values = [fid(f, ref) for f in per_seed_feats]
    se_eval = float(np.std(np.mean([fid_bootstrap(f, ref, idx) for f in per_seed_feats], axis=0), ddof=1))
    value, half, se_seed = _combine(float(np.mean(values)), se_eval, values, level)
    return Estimate(value, value - half, value + half, len(values), len(per_seed_feats[0]), se_eval, se_seed)


def mean_estimate(per_seed_values: Sequence[np.ndarray], reps: int = 200, seed: int = 0,
                  level: float = LEVEL) -> Estimate:
    """A per-sample mean (e.g. the CLIP score over prompts) with the same two noise sources as ``estimate``."""
    idx = bootstrap_indices(len(per_seed_values[0]), reps, seed)
    values = [float(np.mean(v)) for v in per_seed_values]
    se_eval = float(np.std(np.mean([np.asarray(v)[idx].mean(axis=1) for v in per_seed_values], axis=0), ddof=1))
    value, half, se_seed = _combine(float(np.mean(values)), se_eval, values, level)
    return Estimate(value, value - half, value + half, len(values), len(per_seed_values[0]), se_eval, se_seed)


def difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], ref: Stats, reps: int = 200, seed: int = 0,
               level: float = LEVEL, fixed_b: bool = False) -> Estimate:
    """FID(a) - FID(b), each the mean over its training seeds (a list of feature arrays, one per seed, all from
    the same evaluation seeds). Evaluation noise: a paired bootstrap (the same resampled indices for a and b).
    Seed noise: Welch's standard error over the two rows' seeds, Student t with the smaller n - 1 of the rows
    that have several. ``fixed_b``: b is one fixed model (the published pretrained one), not a draw of a training
    recipe, so it adds no seed noise; a one-seed recipe row borrows the other row's per-seed variance."""
    n = len(a[0])
    if any(len(f) != n for f in (*a, *b)):
        raise ValueError("a paired difference needs the same evaluation samples for both rows")
    idx = bootstrap_indices(n, reps, seed)
    fa, fb = [fid(f, ref) for f in a], [fid(f, ref) for f in b]
    boot = (np.mean([fid_bootstrap(f, ref, idx) for f in a], axis=0)
            - np.mean([fid_bootstrap(f, ref, idx) for f in b], axis=0))
    se_eval = float(np.std(boot, ddof=1))
    spread = [np.var(v, ddof=1) for v in (fa, fb) if len(v) >= 2]  # per-seed variances that were measured
    var = []
    for v, fixed in ((fa, False), (fb, fixed_b)):
        if fixed:
            continue
        if len(v) >= 2:
            var.append(np.var(v, ddof=1) / len(v))
        elif spread:
            var.append(float(np.mean(spread)))  # one seed: assume the other recipe's spread
    se_seed = float(np.sqrt(sum(var))) if spread and var else None
    df = min(len(v) for v in (fa, fb) if len(v) >= 2) - 1 if se_seed is not None else np.inf
    value = float(np.mean(fa) - np.mean(fb))
    half = t_quantile(df, level) * float(np.hypot(se_eval, se_seed or 0.0))
    return Estimate(value, value - half, value + half, min(len(fa), len(fb)), n, se_eval, se_seed)


def verdict(diff: Estimate | None, paper_sign: int = -1) -> str:
    """The rule: the paper's side of zero is ``paper_sign`` (-1: the paper says the difference is negative,
    e.g. FID(merged) - FID(pretrained) < 0)."""
    if diff is None or not (np.isfinite(diff.lo) and np.isfinite(diff.hi)):
        return UNRESOLVED
    side = lambda x: np.sign(x) == paper_sign  # noqa: E731
    if side(diff.lo) and side(diff.hi):
        return HOLDS
    if side(-diff.lo) and side(-diff.hi):
        return FAILS
    return UNRESOLVED


def seed_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float] | None:
    """Mean and 95 % t-interval of a quantity over training seeds (e.g. a task-vector cosine); None for n < 2."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return None
    half = t_quantile(len(v) - 1, level) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def mean_difference(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Estimate | None:
    """mean(x) - mean(y) with Welch's t-interval (e.g. cross-interval task-vector cosines against their seed
    floor); None when either side has fewer than 2 values. Treats the values as independent draws."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        return None
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = np.sqrt(vx + vy)
    df = se ** 4 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1)) if se > 0 else np.inf
    value = float(x.mean() - y.mean())
    half = t_quantile(df, level) * se
    return Estimate(value, value - half, value + half, min(len(x), len(y)), 0, 0.0, float(se))
