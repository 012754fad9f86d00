"""The paper's claims against the suite's measured evidence: one row per claim with the numbers behind the
verdict, the number of training seeds, and a verdict of *holds*, *does not hold* or *not enough evidence*.

Rules (stated in the table so a reader can re-judge):
- an FID comparison is decided only when the two values differ by more than ``FID_TOLERANCE`` (relative to
  the larger); closer is "not enough evidence" (one training seed, one set of evaluation seeds: no error bar);
- a missing measurement is "not enough evidence" with the command that produces it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from deme.report.tables import _read

FID_TOLERANCE = 0.02  # 2 % relative: below this an FID difference is not called either way
ORTHOGONAL = 0.2  # |cos| below this counts as "near orthogonal" (the paper's example: 0.07)
GRAD_GAP = 0.2  # adjacent minus distant mean gradient cosine above this: nearby gradients agree more
CONFLICT_SHARE = 0.25  # and at least this share of the distant pairs has a negative cosine: they conflict

HOLDS, FAILS, UNKNOWN = "holds", "does not hold", "not enough evidence"


def _npz(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError):
        return None


def compare(a: float | None, b: float | None) -> str:
    """Verdict for "a has a lower FID than b" under the tolerance rule."""
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return UNKNOWN
    if abs(a - b) <= FID_TOLERANCE * max(abs(a), abs(b)):
        return UNKNOWN
    return HOLDS if a < b else FAILS


def _all(verdicts: list[str]) -> str:
    if not verdicts or UNKNOWN in verdicts:
        return UNKNOWN if FAILS not in verdicts else FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else FAILS


def _pairs(S: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of neighbouring timesteps on the grid (|i - j| = 1) and of distant ones (|t - t'| >= half
    the span), from the Fig. 1a matrix."""
    i, j = np.triu_indices(len(timesteps), 1)
    far = np.abs(timesteps[j] - timesteps[i]) >= (timesteps.max() - timesteps.min()) / 2
    return S[i[j - i == 1], j[j - i == 1]], S[i[far], j[far]]


def gradient_agreement(S: np.ndarray, timesteps: np.ndarray) -> tuple[float, float]:
    """Mean gradient cosine of neighbouring and of distant timesteps (see ``_pairs``)."""
    adjacent, far = _pairs(S, timesteps)
    return float(adjacent.mean()), float(far.mean()) if far.size else float("nan")


def conflict_fraction(S: np.ndarray, timesteps: np.ndarray) -> float:
    """Share of the distant pairs whose gradients conflict (cosine < 0)."""
    _, far = _pairs(S, timesteps)
    return float((far < 0).mean()) if far.size else float("nan")


def evaluate_claims(cfg, paths, runs: dict[str, dict] | None = None,
                    pretrained_sweep: dict | None = None) -> list[dict]:
    """Rows of the claims table for the image profile ``cfg.profile`` (``runs``: the sweep's, if run)."""
    prof = cfg.profile
    ev = {k: _read(Path("metrics") / prof / "evaluate" / f"{k}.json") or {} for k in ("pretrained", "ensemble", "merged", "plain")}
    fid = {k: v.get("fid") for k, v in ev.items()}
    seeds = max([v.get("training_seeds", 1) for v in ev.values() if v] or [1])
    runs = runs or {}
    s3 = cfg.sweep.table3_steps
    sweep_cmd = "`dvc repro sweeps/dvc.yaml`"
    rows = []

    # 1. decoupling helps (Table 3: N = 8 without any technique against N = 1 plain finetuning)
    n1 = next((r for r in runs.values() if r.get("table3") and r["n"] == 1 and not r["consistency_loss"]
               and not r["channel_projection"] and f"fid_merged_{s3}" in r), None)
    nn_ = next((r for r in runs.values() if r.get("table3") and r["n"] > 1 and not r["probabilistic_sampling"]
                and not r["consistency_loss"] and not r["channel_projection"] and f"fid_merged_{s3}" in r), None)
    if n1 and nn_:
        e, m = (nn_[f"fid_{k}_{s3}"] for k in ("ensemble", "merged"))
        rows.append(dict(claim="Decoupling helps (N = 8 models, no other technique, vs one model on all t; Table 3)",
                         evidence=f"N={nn_['n']} ensemble {e:.3f} / merged {m:.3f} vs N=1 {n1[f'fid_merged_{s3}']:.3f} "
                                  f"(DDIM-{s3}, {nn_['iterations_total']} vs {n1['iterations_total']} iterations)",
                         verdict=_all([compare(e, n1[f"fid_merged_{s3}"]), compare(m, n1[f"fid_merged_{s3}"])]),
                         seeds=1))
    else:
        v = compare(fid["merged"], fid["plain"])
        rows.append(dict(claim="Decoupling helps (Table 3: N = 8 without techniques vs N = 1)",
                         evidence=(f"no Table 3 pair of N = 1 and N > 1 without techniques is measured (runs `t3_n1`, "
                                   f"`n8_none` of {sweep_cmd}); the full recipe vs the plain control: merged "
                                   f"{fid['merged']:.3f} vs plain {fid['plain']:.3f} ({v})"
                                   if fid["merged"] and fid["plain"] else f"run {sweep_cmd}"),
                         verdict=UNKNOWN, seeds=seeds))

    # 2-3. Table 1 comparisons
    for a, b, claim in (("merged", "pretrained", "The merged model beats the pretrained model (Table 1)"),
                        ("merged", "ensemble", "The merged model beats the ensemble on DDPM (Table 1)")):
        rows.append(dict(claim=claim, evidence=(f"{a} {fid[a]:.3f} vs {b} {fid[b]:.3f}" if fid[a] and fid[b]
                                                else "run `dvc repro`"),
                         verdict=compare(fid[a], fid[b]), seeds=seeds))

    # 4. every technique helps (Table 3 factorial main effects)
    from deme.report.ablation import main_effects

    eff = {k: v for k, v in main_effects(runs, s3).items() if v["pairs"]} if runs else {}
    if eff:
        verdicts = []
        parts = []
        for k, v in eff.items():
            ref = np.mean([r[f"fid_merged_{s3}"] for r in runs.values() if r.get("table3") and r["n"] > 1
                           and f"fid_merged_{s3}" in r])
            # a mean change is called when it exceeds the tolerance of the rows' mean FID
            call = UNKNOWN if abs(v["merged"]) <= FID_TOLERANCE * ref else HOLDS if v["merged"] < 0 else FAILS
            verdicts.append(call)
            parts.append(f"{k} {v['merged']:+.3f} ({call})")
        rows.append(dict(claim="Every technique (PS, CL, CP) helps (Table 3)",
                         evidence="mean Δ merged FID when switched on: " + ", ".join(parts), verdict=_all(verdicts),
                         seeds=1))
    else:
        rows.append(dict(claim="Every technique (PS, CL, CP) helps (Table 3)",
                         evidence=f"no pair of Table 3 runs that differ in one technique only (the `n8_*` runs of {sweep_cmd})",
                         verdict=UNKNOWN, seeds=0))

    # 5-6. task-vector geometry (Fig. 7, Fig. 6b)
    tv = _npz(paths.analysis("taskvec"))
    if tv is not None and "cos" in tv:
        cos = tv["cos"]
        off = cos[~np.eye(len(cos), dtype=bool)]
        floor = tv.get("floor")
        floor_txt = (f"; two seeds of the same interval: {np.mean(floor):.3f}" if floor is not None and np.size(floor)
                     else "")
        rows.append(dict(claim="Task vectors are nearly orthogonal (Fig. 7)",
                         evidence=f"off-diagonal cosine mean {off.mean():.3f}, largest magnitude {np.abs(off).max():.3f}{floor_txt}",
                         verdict=HOLDS if np.abs(off).max() < ORTHOGONAL else FAILS, seeds=1))
        norms = tv.get("norms")
        bounds = tv.get("intervals")
        if norms is not None and bounds is not None and len(norms) >= 2:
            T = cfg.schedule.num_train_timesteps
            high = [n for n, (lo, hi) in zip(norms, bounds) if lo >= T // 2]
            low = [n for n, (lo, hi) in zip(norms, bounds) if hi <= T // 2]
            verdict = HOLDS if high and low and np.mean(high) > np.mean(low) else FAILS if high and low else UNKNOWN
            rows.append(dict(claim="Task vectors are larger at high noise, t in [T/2, T) (Fig. 6b)",
                             evidence="‖τ_i‖ = " + ", ".join(f"{n:.3f}" for n in norms)
                                      + f" (I1 … I{len(norms)}, low to high noise)", verdict=verdict, seeds=1))
    else:
        for claim in ("Task vectors are nearly orthogonal (Fig. 7)", "Task vectors are larger at high noise (Fig. 6b)"):
            rows.append(dict(claim=claim, evidence="run `dvc repro analyze@taskvec`", verdict=UNKNOWN, seeds=0))

    # 7. gradient conflict (Fig. 1a)
    gs = _npz(paths.analysis("gradsim"))
    if gs is not None:
        adj, far = gradient_agreement(gs["S"], gs["timesteps"])
        conflict = conflict_fraction(gs["S"], gs["timesteps"])
        verdict = HOLDS if adj - far > GRAD_GAP and conflict >= CONFLICT_SHARE else FAILS
        rows.append(dict(claim="Adjacent timesteps' gradients agree, distant ones conflict (Fig. 1a)",
                         evidence=f"mean cosine of grid neighbours {adj:.3f} vs timesteps ≥ T/2 apart {far:.3f}; "
                                  f"{conflict:.0%} of the distant pairs conflict (cosine < 0) "
                                  f"({len(gs['timesteps'])} timesteps, {int(gs['samples'])} images)",
                         verdict=verdict, seeds=1))
    else:
        rows.append(dict(claim="Adjacent timesteps' gradients agree, distant ones conflict (Fig. 1a)",
                         evidence="run `dvc repro analyze@gradsim`", verdict=UNKNOWN, seeds=0))
    return rows


def claims_markdown(cfg, paths, runs: dict[str, dict] | None = None, pretrained_sweep: dict | None = None) -> str:
    rows = evaluate_claims(cfg, paths, runs, pretrained_sweep)
    lines = ["| claim (the paper's) | evidence (ours) | verdict | training seeds |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['evidence']} | **{r['verdict']}** | {r['seeds']} |" for r in rows]
    lines += ["", f"Rules: an FID difference under {FID_TOLERANCE:.0%} of the larger value is not called either way "
              "(one training seed and one set of evaluation seeds give no error bar); task vectors count as nearly "
              f"orthogonal when every off-diagonal cosine is within ±{ORTHOGONAL}; gradients 'agree nearby and conflict far "
              f"away' when the neighbours' mean cosine exceeds the distant pairs' by more than {GRAD_GAP} and at least "
              f"{CONFLICT_SHARE:.0%} of the distant pairs have a negative cosine."]
    return "\n".join(lines)
