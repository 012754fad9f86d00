"""MLflow: one run per stage execution (the lab notebook; DVC remains the build system).

Experiment = profile; run name = ``<stage>`` or ``<stage>@<item>``; tags ``stage``, ``profile``, ``item``,
``method``, ``interval``, ``seed``, ``git_commit``, ``dvc_exp``, and ``host``/``pid``/``workdir`` (who ran it).
Metric names are the same for every method and profile (``loss``, ``loss_eps``, ``loss_consistency``, ``fid``,
and ``clip`` on text-to-image, where ``fid``/``clip`` are COCO's, beside ``imagenet_fid`` etc.). Tracking
URI: ``MLFLOW_TRACKING_URI`` (e.g. an ``mlflow server`` shared by queued experiments) or
``sqlite:///<repo>/mlflow.db``.

A killed process cannot close its run, so MLflow would show it RUNNING forever. When a stage starts, the
runs of the same name that are still RUNNING, were started in the same working directory on this host, and
whose process is gone are set to KILLED and linked to the new run: tag ``deme.resumed_by`` on the old run,
``deme.resumed_from`` on the new one (which resumes from the killed run's checkpoints, deme/resume.py).
"""
from __future__ import annotations

import contextlib
import os
import socket
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

    def register_model(self, path: str | Path, name: str, tags: dict[str, Any] | None = None) -> str | None:
        """Log the model folder ``path`` as this run's artifact ``model`` and register it as a new version of
        ``name`` in the MLflow model registry; returns the version (None, with a warning, if the tracking
        server has no registry)."""
        self.log_artifact(path, "model")
        client = self._mlflow.MlflowClient()
        try:
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                client.create_registered_model(name, description="DeMe merged model: theta + sum_i w_i tau_i "
                                                                 "(PAPER.md §1.8)")
            version = client.create_model_version(name, f"{self.run.info.artifact_uri}/model", run_id=self.id,
                                                  tags={k: str(v) for k, v in (tags or {}).items()})
        except Exception as e:  # e.g. a file-store URI, which has no registry
            warnings.warn(f"MLflow model registry: {name} not registered ({type(e).__name__}: {e})")
            return None
        return str(version.version)


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
    name = f"{stage}@{item}" if item else stage
    who = {"host": socket.gethostname(), "pid": os.getpid(), "workdir": str(repo_root().resolve())}
    all_tags = {"stage": stage, "profile": profile, "git_commit": git_commit(),
                "dvc_exp": os.environ.get("DVC_EXP_NAME", ""), **({"item": item} if item else {}),
                **who, **(tags or {})}
    killed = close_killed_runs(mlflow.MlflowClient(), mlflow.get_experiment_by_name(profile).experiment_id, name,
                               who)
    if killed:
        all_tags["deme.resumed_from"] = ",".join(killed)
    with mlflow.start_run(run_name=name, tags={k: str(v) for k, v in all_tags.items()}) as active:
        run = Run(mlflow, active)
        for old in killed:
            mlflow.MlflowClient().set_tag(old, "deme.resumed_by", run.id)
        if killed:
            print(f"[resume] MLflow: run {', '.join(killed)} of {name} was killed; this run {run.id} resumes it",
                  flush=True)
        if params:
            run.log_params(params)
        yield run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def close_killed_runs(client, experiment_id: str, name: str, who: dict) -> list[str]:
    """Set to KILLED the RUNNING runs named ``name`` of ``who``'s host and working directory whose process
    no longer exists (a SIGKILL, an OOM kill, a lost node); their ids, newest first."""
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}' and "
                                                              f"attributes.status = 'RUNNING'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    killed = []
    for r in runs:
        tags = r.data.tags
        if tags.get("host") != who["host"] or tags.get("workdir") != who["workdir"]:
            continue
        pid = int(tags.get("pid", "0") or 0)
        if pid <= 0 or pid == who["pid"] or _alive(pid):
            continue
        client.set_terminated(r.info.run_id, status="KILLED")
        killed.append(r.info.run_id)
    return killed


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
