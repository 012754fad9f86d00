"""Tables of the report: measured numbers from DVC-tracked metrics JSON, paper numbers beside them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deme.methods import BY_NAME, METHODS, SINGLE_MODEL_METHODS
from deme.report.paper import paper_table

# Table 1 rows measured by the suite: (key, label, the paper's row key where the paper has the row).
TABLE1_ROWS = [
    ("pretrained", "Pretrained (before finetuning)", "pretrained"),
    *((m.name, m.label, m.name if m.in_paper else None) for m in METHODS),
    ("ensemble", "DeMe (before merge: timestep ensemble)", "ensemble"),
    ("merged", "DeMe (after merge: task-vector merge)", "merged"),
    ("floor", "Data-vs-data floor (training vs held-out images)", None),
]
SINGLE_MODEL = SINGLE_MODEL_METHODS


def _read(path: Path) -> dict | None:
    """A metrics file, or None if there is none; a corrupt one is an error naming it."""
    from deme.io import read_json

    return read_json(path) if path.is_file() else None


def measured_profiles(metrics_root: Path, task: str = "image") -> list[str]:
    """Profiles of one task (image: Table 1; t2i: Table 2) with evaluation metrics."""
    from deme.profiles import PROFILES

    if not metrics_root.exists():
        return []
    return sorted(p.name for p in metrics_root.iterdir() if (p / "evaluate").is_dir()
                  and PROFILES.get(p.name, {}).get("task", "image") == task)


def collect_fid(metrics_root: Path, profiles: list[str]) -> pd.DataFrame:
    """FID per (method, profile); NaN where a model has not been evaluated."""
    data = {}
    for prof in profiles:
        col = {}
        for key, _, _ in TABLE1_ROWS:
            m = _read(metrics_root / prof / ("fid_ref.json" if key == "floor" else f"evaluate/{key}.json"))
            col[key] = (m or {}).get("fid_floor" if key == "floor" else "fid", np.nan)
        data[prof] = col
    return pd.DataFrame(data, index=[k for k, _, _ in TABLE1_ROWS], dtype=float)


def iterations_of(metrics_root: Path, profile: str, n: int) -> dict[str, str]:
    train = metrics_root / profile / "train"
    per = (_read(train / "interval-1.json") or {}).get("iterations")
    deme = f"{per} × {n}" if per else ""
    out = {"pretrained": "-", "ensemble": deme, "merged": deme, "floor": "-"}
    for key in SINGLE_MODEL:
        out[key] = str((_read(train / f"{key}.json") or {}).get("iterations", ""))
    return out


def searched_weights(metrics_root: Path, profile: str) -> dict[str, str]:
    """Per row, the weights its search picked for each training seed: θ + w·τ for a single-model method
    (``scale``; 0 is the pretrained model itself), θ + Σ w_i τ_i for the merged model (merge.json)."""
    out = {}
    for key in SINGLE_MODEL:
        scale = (_read(metrics_root / profile / "evaluate" / f"{key}.json") or {}).get("scale")
        out[key] = ", ".join(f"{w:.2f}" for w in scale) if scale else ""
    weights = (_read(metrics_root / profile / "merge.json") or {}).get("weights") or []
    out["merged"] = "; ".join("/".join(f"{w:g}" for w in ws) for ws in weights)
    return out


def seed_spread(metrics_root: Path, profile: str, key: str) -> tuple[float, int]:
    m = _read(metrics_root / profile / "evaluate" / f"{key}.json") or {}
    return m.get("fid_std", 0.0), m.get("training_seeds", 1)


def _fmt(v: float, digits: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _bold_best(values: pd.Series, text: pd.Series, exclude: tuple[str, ...] = ("floor",)) -> pd.Series:
    candidates = values.drop(labels=[e for e in exclude if e in values.index]).dropna()
    if candidates.empty:
        return text
    best = candidates.min()
    return pd.Series([f"**{t}**" if k in candidates.index and values[k] == best else t
                      for k, t in text.items()], index=text.index)


def table1(metrics_root: Path, n_intervals: dict[str, int]) -> str:
    """Markdown Table 1: our FID per measured profile with delta vs pretrained, then the paper's columns."""
    profiles = measured_profiles(metrics_root)
    fid = collect_fid(metrics_root, profiles)
    paper = paper_table("table1")
    out = pd.DataFrame(index=fid.index)
    out["Method"] = [label for _, label, _ in TABLE1_ROWS]
    for prof in profiles:
        col = fid[prof]
        text = col.map(_fmt)
        kids = []
        for key in fid.index:  # the mean over training seeds, its 95 % interval and n (deme/stats.py)
            m = _read(metrics_root / prof / "evaluate" / f"{key}.json") or {}
            if "fid_lo" in m and text[key]:
                text[key] = f"{text[key]} [{m['fid_lo']:.3f}, {m['fid_hi']:.3f}] n={m.get('training_seeds', 1)}"
            kids.append(f"{m['kid']:.4f} ± {m['kid_std']:.4f}" if "kid" in m else "")
        out[f"{prof} FID (ours) [95 % interval] n"] = _bold_best(col, text)
        out[f"{prof} KID ± std (ours)"] = kids
        pre = col.get("pretrained", np.nan)
        out[f"{prof} Δ vs pretrained"] = [("" if np.isnan(v) or np.isnan(pre) or k in ("pretrained", "floor")
                                           else f"{v - pre:+.3f}") for k, v in col.items()]
        its = iterations_of(metrics_root, prof, n_intervals.get(prof, 0))
        out[f"{prof} iterations"] = [its.get(k, "") for k in fid.index]
        w = searched_weights(metrics_root, prof)
        out[f"{prof} searched w per seed"] = [w.get(k, "") for k in fid.index]
    for j, name in enumerate(paper["columns"]):
        vals = pd.Series({k: (paper["rows"][pk]["values"][j] if pk else np.nan) for k, _, pk in TABLE1_ROWS})
        out[f"{name} FID (paper)"] = _bold_best(vals, vals.map(lambda v: _fmt(v, 2)))
    out["Iterations (paper)"] = [paper["rows"][pk]["iterations"] if pk else "" for _, _, pk in TABLE1_ROWS]
    return out.to_markdown(index=False, disable_numparse=True)


def paper_only_rows(table: str = "table1") -> str:
    """Rows of the paper's table the suite does not measure yet, labelled as the paper's."""
    paper = paper_table(table)
    measured = {pk for _, _, pk in TABLE1_ROWS if pk}
    rows = [{"Method (paper)": r["label"], **{f"{c} FID (paper)": f"{v:.2f}" for c, v in zip(paper["columns"], r["values"])},
             "Iterations (paper)": r["iterations"]} for k, r in paper["rows"].items() if k not in measured]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else ""


# Table 2 (docs/paper.md §3.2): the text-to-image rows, in the paper's order, and its metric columns.
TABLE2_ORDER = ("plain", "snr_plus_one", "trunc_snr", "min_snr", "p2", "ant_nash", "ant_uw", "difftuning", "piecewise")
TABLE2_ROWS = [
    ("pretrained", "Pretrained (before finetuning)", "pretrained"),
    *((k, BY_NAME[k].label + (" (KD)" if k == "difftuning" else ""), k if BY_NAME[k].in_paper else None)
      for k in TABLE2_ORDER),
    ("ensemble", "DeMe (before merge: timestep ensemble)", "ensemble"),
    ("merged", "DeMe (after merge: task-vector merge)", "merged"),
]
TABLE2_METRICS = [("coco_fid", "COCO FID↓", False), ("coco_clip", "COCO CLIP↑", True),
                  ("imagenet_fid", "ImageNet FID↓", False), ("imagenet_clip", "ImageNet CLIP↑", True),
                  ("parti_clip", "PartiPrompts CLIP↑", True)]


def collect_t2i(metrics_root: Path, profile: str) -> pd.DataFrame:
    """Table 2 metrics per method of one text-to-image profile; NaN where not evaluated."""
    rows = {}
    for key, _, _ in TABLE2_ROWS:
        m = _read(metrics_root / profile / "evaluate" / f"{key}.json") or {}
        rows[key] = {k: m.get(k, np.nan) for k, _, _ in TABLE2_METRICS}
    return pd.DataFrame.from_dict(rows, orient="index", dtype=float)


def _mark_best(values: pd.Series, text: pd.Series, higher: bool) -> pd.Series:
    candidates = values.dropna()
    if candidates.empty:
        return text
    best = candidates.max() if higher else candidates.min()
    return pd.Series([f"**{t}**" if k in candidates.index and values[k] == best else t for k, t in text.items()],
                     index=text.index)


def table2(metrics_root: Path, n_intervals: dict[str, int]) -> str:
    """Markdown Table 2: every measured text-to-image profile's FID / CLIP with the delta against its
    pretrained model in brackets (the paper's layout), the iterations, then the paper's columns."""
    profiles = measured_profiles(metrics_root, "t2i")
    out = pd.DataFrame(index=[k for k, _, _ in TABLE2_ROWS])
    out["Method"] = [label for _, label, _ in TABLE2_ROWS]
    for prof in profiles:
        data = collect_t2i(metrics_root, prof)
        for key, label, higher in TABLE2_METRICS:
            col, pre = data[key], data[key].get("pretrained", np.nan)
            text = pd.Series({k: ("" if np.isnan(v) else f"{v:.2f}" if k == "pretrained" or np.isnan(pre)
                                  else f"{v:.2f} ({v - pre:+.2f})") for k, v in col.items()})
            for k in text.index:  # the 95 % interval over training seeds and prompts, and n (deme/stats.py)
                m = _read(metrics_root / prof / "evaluate" / f"{k}.json") or {}
                if f"{key}_lo" in m and text[k]:
                    text[k] += f" [{m[f'{key}_lo']:.2f}, {m[f'{key}_hi']:.2f}] n={m.get('training_seeds', 1)}"
            out[f"{prof} {label} (ours)"] = _mark_best(col, text, higher)
        its = iterations_of(metrics_root, prof, n_intervals.get(prof, 0))
        out[f"{prof} iterations"] = [its.get(k, "") for k in out.index]
        w = searched_weights(metrics_root, prof)
        out[f"{prof} searched w per seed"] = [w.get(k, "") for k in out.index]
    paper = paper_table("table2")
    for j, name in enumerate(paper["columns"]):
        vals = pd.Series({k: (paper["rows"][pk]["values"][j] if pk else np.nan) for k, _, pk in TABLE2_ROWS})
        pre = vals["pretrained"]
        text = pd.Series({k: ("" if np.isnan(v) else f"{v:.2f}" if k == "pretrained" else f"{v:.2f} ({v - pre:+.2f})")
                          for k, v in vals.items()})
        out[f"{name} (paper)"] = _mark_best(vals, text, "CLIP" in name)
    out["Iterations (paper)"] = [paper["rows"][pk]["iterations"] if pk else "" for _, _, pk in TABLE2_ROWS]
    return out.to_markdown(index=False, disable_numparse=True)
