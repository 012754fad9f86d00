"""The one metrics file per profile that `dvc metrics show`, `dvc metrics diff` and `dvc exp show` display:
method -> FID (mean over training seeds) with its 95 % interval and n, KID, and for text-to-image the COCO /
ImageNet FID and every CLIP score. Written by the report stages to ``metrics/<profile>.json``; every other
metrics JSON of the pipeline is a plain output (timings, hashes and settings stay out of the tables)."""
from __future__ import annotations

from pathlib import Path

from deme.report.tables import TABLE1_ROWS, TABLE2_METRICS, TABLE2_ROWS, _read

IMAGE_KEYS = ("fid", "fid_lo", "fid_hi", "kid")
T2I_KEYS = tuple(k for key, _, _ in TABLE2_METRICS for k in (key, f"{key}_lo", f"{key}_hi"))


def summary(metrics_root: Path, profile: str, task: str = "image") -> dict[str, dict[str, float | int]]:
    """{method: {metric: value, ..., "n": training seeds}} for the methods evaluated so far, in table order."""
    rows, keys = (TABLE1_ROWS, IMAGE_KEYS) if task == "image" else (TABLE2_ROWS, T2I_KEYS)
    out = {}
    for method, _, _ in rows:
        m = _read(metrics_root / profile / "evaluate" / f"{method}.json")
        if not m:
            continue
        out[method] = {k: round(float(m[k]), 4) for k in keys if isinstance(m.get(k), (int, float))}
        out[method]["n"] = int(m.get("training_seeds", 1))
    return out


def sweep_summary(runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{run: {fid_<model>_<steps>: value}} of the sweep runs (sweeps/<profile>/*.json), FIDs only."""
    return {name: {k: round(float(v), 4) for k, v in m.items() if k.startswith("fid") and isinstance(v, (int, float))}
            for name, m in runs.items()}
