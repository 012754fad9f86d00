"""Table 3 (technique ablation), Fig. 8 (sensitivity to N and p) and Table 4 (cost against
mixture-of-experts methods): measured rows from the sweep's and the evaluate stage's JSON, the paper's
numbers beside them in columns labelled as the paper's (docs/paper.md §3.3-3.5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deme.report.paper import paper_table
from deme.report.tables import _read

PAPER_DATASET = {"cifar10": "CIFAR10", "church": "LSUN-Church", "bedroom": "LSUN-Bedroom"}


def load_runs(sweep_dir: Path) -> dict[str, dict]:
    """Every finished sweep run's metrics (sweeps/<profile>/<run>.json), keyed by run name."""
    runs = {f.stem: _read(f) for f in sorted(Path(sweep_dir).glob("*.json"))}
    return {name: m for name, m in runs.items() if m is not None}


def _mark(on: bool) -> str:
    return "✓" if on else "✗"


def _paper_fid(run: dict) -> float:
    for row in paper_table("table3")["rows"]:
        if (row["n"], row["ps"], row["cl"], row["cp"]) == (run["n"], run["probabilistic_sampling"] and run["n"] > 1,
                                                             run["consistency_loss"], run["channel_projection"]):
            return row["fid"]
    return np.nan


def table3(runs: dict[str, dict], steps: int) -> pd.DataFrame:
    """One row per Table 3 run (paper rows first), with the ensemble and merged FID at ``steps`` DDIM steps
    and the difference against the N = 1 plain row, plus the pretrained model when measured."""
    rows = []
    base = next((r for r in runs.values() if r.get("table3") and r.get("n") == 1
                 and not (r["consistency_loss"] or r["channel_projection"])), None)
    base_fid = base.get(f"fid_merged_{steps}") if base else None
    for name, r in runs.items():
        if not r.get("table3") or f"fid_ensemble_{steps}" not in r:
            continue
        ens, mer, paper = r[f"fid_ensemble_{steps}"], r[f"fid_merged_{steps}"], _paper_fid(r)
        rows.append({"run": name, "N": r["n"], "PS": _mark(r["probabilistic_sampling"]) + (f" p={r['p']:g}" if r["probabilistic_sampling"] else ""),
                     "CL": _mark(r["consistency_loss"]), "CP": _mark(r["channel_projection"]),
                     "iterations": f"{r['iterations_per_model']} × {r['n']}",
                     "FID ensemble (ours)": ens, "FID merged (ours)": mer,
                     "Δ merged vs N=1 plain": (mer - base_fid) if base_fid is not None and r is not base else np.nan,
                     "merge weights": ", ".join(f"{w:.2f}" for w in r["weights"]) if r["n"] > 1 else "-",
                     "FID (paper)": paper, "in the paper": "yes" if paper == paper else "no (added)"})
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["in the paper", "N"], ascending=[False, True], kind="stable").reset_index(drop=True)
    return df


def table3_markdown(runs: dict[str, dict], steps: int, pretrained: dict | None) -> str:
    df = table3(runs, steps)
    if df.empty:
        return "_No Table 3 run has finished: `dvc repro sweeps/dvc.yaml`._"
    text = df.copy()
    for col in ("FID ensemble (ours)", "FID merged (ours)"):
        best = df[col].min()
        text[col] = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in df[col]]
    text["Δ merged vs N=1 plain"] = ["" if np.isnan(v) else f"{v:+.3f}" for v in df["Δ merged vs N=1 plain"]]
    text["FID (paper)"] = ["" if np.isnan(v) else f"{v:.2f}" for v in df["FID (paper)"]]
    out = text.to_markdown(index=False, disable_numparse=True)
    if pretrained and f"fid_{steps}" in pretrained:
        out += (f"\n\nPretrained model at DDIM-{steps} (ours; the paper does not give it): "
                f"**{pretrained[f'fid_{steps}']:.3f}**.")
    return out


def main_effects(runs: dict[str, dict], steps: int, n: int | None = None) -> dict[str, dict]:
    """Average change of the FID when one technique is switched on, over the factorial rows at N = n that
    differ only in that technique (docs/paper.md §5 A3-A9): {technique: {"ensemble": d, "merged": d, "pairs": k}}."""
    rows = [r for r in runs.values() if r.get("table3") and r["n"] > 1 and (n is None or r["n"] == n)
            and f"fid_merged_{steps}" in r]
    keys = {"PS": "probabilistic_sampling", "CL": "consistency_loss", "CP": "channel_projection"}
    out = {}
    for label, key in keys.items():
        diffs = {"ensemble": [], "merged": []}
        for on in (r for r in rows if r[key]):
            off = next((r for r in rows if not r[key] and r["n"] == on["n"]
                        and all(r[k] == on[k] for k in keys.values() if k != key)), None)
            if off is not None:
                for rep in diffs:
                    diffs[rep].append(on[f"fid_{rep}_{steps}"] - off[f"fid_{rep}_{steps}"])
        out[label] = {rep: float(np.mean(v)) if v else np.nan for rep, v in diffs.items()}
        out[label]["pairs"] = len(diffs["merged"])
    return out


def fig8_data(runs: dict[str, dict], steps: int, n_default: int, p_default: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The N sweep (full recipe at the default p) and the p sweep (full recipe at the default N)."""
    full = [r for r in runs.values() if r.get("fig8") and f"fid_ensemble_{steps}" in r and r["consistency_loss"]
            and r["channel_projection"] and (r["probabilistic_sampling"] or r["n"] == 1)]
    cols = ["n", "p", f"fid_ensemble_{steps}", f"fid_merged_{steps}"]
    by_n = pd.DataFrame([{k: r[k] for k in cols} for r in full if r["n"] == 1 or abs(r["p"] - p_default) < 1e-9],
                        columns=cols).sort_values("n")
    by_p = pd.DataFrame([{k: r[k] for k in cols} for r in full if r["n"] == n_default],
                        columns=cols).sort_values("p")
    return by_n, by_p


def fig8(runs: dict[str, dict], steps: int, n_default: int, p_default: float, pretrained: float | None,
         path: Path) -> Path | None:
    """Fig. 8: FID against N and against p, ensemble and merged, pretrained as a reference line."""
    from deme.report.figures import _save, plt

    by_n, by_p = fig8_data(runs, steps, n_default, p_default)
    if by_n.empty and by_p.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, df, x, title in ((axes[0], by_n, "n", f"FID vs N (p = {p_default:g})"),
                             (axes[1], by_p, "p", f"FID vs p (N = {n_default})")):
        if len(df):
            ax.plot(df[x], df[f"fid_ensemble_{steps}"], "o-", label="ensemble (before merge)")
            ax.plot(df[x], df[f"fid_merged_{steps}"], "s--", label="merged (after merge)")
        if pretrained is not None:
            ax.axhline(pretrained, color="gray", ls=":", label="pretrained")
        ax.set(xlabel=x if x == "p" else "N (intervals)", ylabel=f"FID (DDIM-{steps})", title=title)
        if x == "n" and len(df):
            ax.set_xticks(sorted(df[x].unique()))
        ax.legend(fontsize=8)
    return _save(fig, path, pdf=True)


def fig8_markdown(runs: dict[str, dict], steps: int, n_default: int, p_default: float) -> str:
    by_n, by_p = fig8_data(runs, steps, n_default, p_default)
    paper = paper_table("fig8")
    lines = []
    if len(by_n):
        t = pd.DataFrame({"N": by_n["n"].astype(int), "FID ensemble (ours)": by_n[f"fid_ensemble_{steps}"].map("{:.3f}".format),
                          "FID merged (ours)": by_n[f"fid_merged_{steps}"].map("{:.3f}".format),
                          "FID ensemble (paper, CIFAR10)": [f"{paper['n'][int(n)]:.2f}" if int(n) in paper["n"] else ""
                                                            for n in by_n["n"]]})
        lines += [t.to_markdown(index=False, disable_numparse=True), "", f"The paper: {paper['n_note']}.", ""]
    if len(by_p):
        t = pd.DataFrame({"p": by_p["p"].map("{:g}".format), "FID ensemble (ours)": by_p[f"fid_ensemble_{steps}"].map("{:.3f}".format),
                          "FID merged (ours)": by_p[f"fid_merged_{steps}"].map("{:.3f}".format)})
        lines += [t.to_markdown(index=False, disable_numparse=True), "", f"The paper: {paper['p_note']}.", ""]
    return "\n".join(lines)


def table4_markdown(metrics_dir: Path, profile: str) -> str:
    """Table 4: the cost of pretrained, DeMe ensemble and merged (models, parameters, NFEs per image, FID; the
    measured sampling rate is the `images_per_s` metric of each evaluate run in MLflow), then the paper's table for the matching dataset with its quoted rows."""
    rows = []
    for key, label in (("pretrained", "Pretrained"), ("ensemble", "DeMe (Before Merge)"),
                       ("merged", "DeMe (After Merge)")):
        m = _read(Path(metrics_dir) / profile / "evaluate" / f"{key}.json")
        if m is None:
            continue
        models, per = m.get("models", 1), m.get("parameters_per_model", 0)
        rows.append({"Model (ours)": label, "#Models": models,
                     "#Params": f"{per / 1e6:.3f}M" + (f" × {models}" if models > 1 else ""),
                     "Params loaded": f"{per * models / 1e6:.3f}M",
                     "NFEs / image": m.get("steps", ""), "FID (ours)": f"{m['fid']:.3f}"})
    out = [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else
           "_No evaluation metrics yet._", ""]
    if rows:
        out += ["The ensemble calls one model per sampling step (the interval's), so its NFEs (and sampling rate: "
                "`images_per_s` of the evaluate runs in MLflow) equal a single model's; it holds N models' parameters. The merged model is one network of the same size "
                "(the channel-wise projections add their 1x1 convolutions).", ""]
    datasets = paper_table("table4")["datasets"]
    shown = [PAPER_DATASET.get(profile, "CIFAR10")]  # the tiny profiles stand in for CIFAR10
    for name in shown:
        t = pd.DataFrame([{"Model": r["model"] + (" (quoted by the paper)" if r.get("quoted") else ""),
                           "#Models": r["models"], "#Params": r["params"], "FID (paper)": r["fid"]}
                          for r in datasets[name]])
        out += [f"The paper's Table 4, {name} (the OMS-DPM and DiffPruning rows are quoted from their own papers, "
                "with their own protocols):", "", t.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)
