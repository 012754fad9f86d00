"""MLflow: one run per stage execution (the lab notebook; DVC remains the build system).

Experiment = profile; run name = ``<stage>`` or ``<stage>@<item>``; tags ``stage``, ``profile``, ``item``,
``method``, ``interval``, ``seed``, ``git_commit``, ``dvc_exp``. Metric names are the same for every method
(``loss``, ``loss_eps``, ``loss_consistency``, ``fid``). Tracking URI: ``MLFLOW_TRACKING_URI`` or
``sqlite:///<repo>/mlflow.db``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from deme.io import git_commit, repo_root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo_root() / 'mlflow.db').resolve()}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class Run:
    """Thin handle on the active MLflow run."""

    def __init__(self, mlflow, run):
        self._mlflow, self.run = mlflow, run
        self.id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for lo in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[lo:lo + 100]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def stage_run(stage: str, profile: str, *, item: str | None = None, params: dict | None = None,
              tags: dict[str, Any] | None = None) -> Iterator[Run]:
    """Open the MLflow run of one stage execution; it ends FAILED if the body raises."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(profile)
    all_tags = {"stage": stage, "profile": profile, "git_commit": git_commit(),
                "dvc_exp": os.environ.get("DVC_EXP_NAME", ""), **({"item": item} if item else {}),
                **(tags or {})}
    with mlflow.start_run(run_name=f"{stage}@{item}" if item else stage,
                          tags={k: str(v) for k, v in all_tags.items()}) as active:
        run = Run(mlflow, active)
        if params:
            run.log_params(params)
        yield run


class NullRun:
    """Stands in for the MLflow run on the extra processes of `accelerate launch` (only rank 0 logs)."""

    id = "--------"

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def null_run() -> Iterator[NullRun]:
    yield NullRun()


class CurveLog:
    """Training-curve logger: sends each point to MLflow and keeps it for a DVC plots CSV."""

    def __init__(self, run: Run | None = None):
        self.run, self.rows = run, []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step)
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def save(self, path: str | Path) -> None:
        import pandas as pd

        from deme.io import atomic_write_text

        atomic_write_text(path, pd.DataFrame(self.rows).to_csv(index=False))
