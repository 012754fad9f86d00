"""The paper's orderings on this profile: paired FID differences with 95 % intervals and the verdict of
``deme.stats.verdict`` (the one rule every report uses).

Each Table 1 row's evaluation features (features/<profile>/<row>.npz, one array per training seed, all from
the same evaluation seeds) are read back, so a difference is paired over the evaluation samples and carries
the training-seed spread of both rows (deme/stats.py).
"""
from __future__ import annotations

import numpy as np

from deme.methods import CONTROLS, METHODS
from deme.metrics.fid import Stats
from deme.stats import Estimate, difference, verdict

BASELINE_LABELS = {m.name: m.short for m in METHODS if m.name not in CONTROLS}
# ours: a question the paper's supplementary §7.2 raises (docs/paper.md §1.10), not an ordering it reports
PIECEWISE_CLAIM = ("merged", "piecewise", "DeMe merged beats one model trained with its searched weights as a "
                   "piecewise loss weight (ours: does decoupling add more than the reweighting of §1.10?)")


def row_features(paths, key: str, bench: str = "") -> list[np.ndarray] | None:
    """The evaluation features of one row, one array per training seed (``bench``: a text-to-image
    benchmark's); None if not evaluated."""
    prefix = f"{bench}_seed_" if bench else "seed_"
    try:
        with np.load(paths.features(key), allow_pickle=False) as z:
            return [z[f"{prefix}{k}"] for k in range(sum(1 for n in z.files if n.startswith(prefix)))] or None
    except (OSError, ValueError, KeyError):
        return None


def paired(paths, mode: str, a: str, b: str, reps: int, seed: int, bench: str = "") -> Estimate | None:
    """FID(a) - FID(b) with its interval, or None when either row (or the reference) is missing."""
    fa, fb = row_features(paths, a, bench), row_features(paths, b, bench)
    ref = paths.bench_stats(bench, mode) if bench else paths.fid_ref(mode)
    if not fa or not fb or not ref.exists() or len(fa[0]) != len(fb[0]):
        return None
    return difference(fa, fb, Stats.load(ref), reps=reps, seed=seed, fixed_b=b == "pretrained")


def orderings(cfg, paths, bench: str = "") -> list[dict]:
    """The paper's orderings (Table 1; ``bench``: Table 2 on that benchmark's FID): claim, a, b, difference,
    verdict. Paper side: a has the lower FID. On text-to-image the paper's ensemble beats its merged model."""
    table = "Table 2" if bench else "Table 1"
    merged_vs_ensemble = (("ensemble", "merged", f"The DeMe ensemble beats DeMe merged on Stable Diffusion ({table})")
                          if bench else ("merged", "ensemble", "DeMe merged beats the DeMe ensemble on DDPM (Table 1)"))
    pairs = [("merged", "pretrained", f"DeMe merged beats the pretrained model ({table})"), merged_vs_ensemble,
             ("ensemble", "pretrained", f"The DeMe ensemble beats the pretrained model ({table})"),
             ("merged", "plain", "DeMe merged beats plain finetuning at the matched budget (the control)")]
    pairs += [("merged", k, f"DeMe merged beats {label} at the matched budget ({table})")
              for k, label in BASELINE_LABELS.items()]
    pairs.append(PIECEWISE_CLAIM)
    mode = cfg.fid.modes[0]
    rows = []
    for a, b, claim in pairs:
        d = paired(paths, mode, a, b, cfg.fid.bootstrap, cfg.seed, bench)
        rows.append({"claim": claim, "a": a, "b": b, "diff": d, "verdict": verdict(d), "bench": bench})
    return rows


def regime(cfg, paths, bench: str = "") -> Estimate | None:
    """Plain finetuning minus pretrained: near zero when the pretrained model is converged (the paper's Table 3,
    N = 1: 4.42 -> 4.40), so that finetuned rows do not mostly measure more training."""
    return paired(paths, cfg.fid.modes[0], "plain", "pretrained", cfg.fid.bootstrap, cfg.seed, bench)


def _n(paths, key: str, bench: str = "") -> str:
    f = row_features(paths, key, bench)
    return f"n={len(f)}" if f else "–"


def orderings_markdown(cfg, paths, bench: str = "") -> str:
    rows = orderings(cfg, paths, bench)
    lines = ["| the paper's ordering | training seeds (a / b) | FID(a) − FID(b), 95 % interval | noise mostly from | "
             "verdict |", "|---|---|---|---|---|"]
    for r in rows:
        d = r["diff"]
        seeds = f"{_n(paths, r['a'], bench)} / {_n(paths, r['b'], bench)}"
        if d is None:
            lines.append(f"| {r['claim']} | {seeds} | not measured | – | **{r['verdict']}** |")
        else:
            lines.append(f"| {r['claim']} | {seeds} | {d.text(3)} | {d.dominant()} | **{r['verdict']}** |")
    g = regime(cfg, paths, bench)
    lines += ["", "Rule (deme/stats.py): a claim *holds* when the 95 % interval of the paired difference lies on "
              "the paper's side of zero (a lower FID), *does not hold* when it lies on the other side, and is "
              "*not resolved at this budget* otherwise. The interval combines a bootstrap over the evaluation "
              f"samples ({cfg.fid.bootstrap} resamples, the same indices for both rows: every row samples from the "
              "same noise seeds) with the spread over training seeds (Student t)."]
    if g is not None:
        lines += ["", f"Regime check: plain finetuning − pretrained = {g.text(3)} (the paper's converged model: "
                  "4.42 → 4.40 for one model finetuned on all timesteps, Table 3 N = 1). An interval that holds "
                  "zero or is small beside the differences above means the finetuned rows measure the method, "
                  "not more training."]
    return "\n".join(lines)
