"""MLflow: one run per stage execution (the lab notebook; DVC remains the build system).

Experiment = profile; run name = ``<stage>`` or ``<stage>@<item>``; tags ``stage``, ``profile``, ``item``,
``method``, ``interval``, ``seed``, ``git_commit``, ``dvc_exp``, and ``host``/``pid``/``workdir`` (who ran it).
Metric names are the same for every method and profile (``loss``, ``loss_eps``, ``loss_consistency``, ``fid``,
and ``clip`` on text-to-image, where ``fid``/``clip`` are COCO's, beside ``imagenet_fid`` etc.). Tracking
URI: ``MLFLOW_TRACKING_URI`` (e.g. an ``mlflow server`` shared by queued experiments) or
``sqlite:///<repo>/mlflow.db``.

Outages: before any work the stage checks the tracking URI (:func:`check_tracking`): a server that is down,
does not answer within seconds or is not MLflow, a scheme MLflow does not know, or an ``mlflow.db`` that is
not an SQLite database or not writable end the stage with one line naming the URI or file. MLflow's HTTP
retries are bounded (a few seconds, not minutes). A server lost *during* a stage never fails it: the first
failed call prints one warning and the stage goes on without logging (its outputs do not depend on MLflow).
Stages started at once on a fresh ``mlflow.db`` create its schema one at a time (a file lock).

A killed process cannot close its run, so MLflow would show it RUNNING forever. When a stage starts, the
runs of the same name that are still RUNNING, were started in the same working directory on this host, and
whose process is gone are set to KILLED and linked to the new run: tag ``deme.resumed_by`` on the old run,
``deme.resumed_from`` on the new one (which resumes from the killed run's checkpoints, deme/resume.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator

from deme.io import git_commit, repo_root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo_root() / 'mlflow.db').resolve()}"


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens on runs, not GenAI traces
SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
PROBE_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The tracking URI cannot be used; one line naming it."""


def _sqlite_path(uri: str) -> Path | None:
    rest = uri[len("sqlite://"):]
    return None if rest in ("", "/", "/:memory:") else Path(rest[1:] if rest.startswith("/") else rest)


def check_tracking(uri: str) -> None:
    """Raise :class:`TrackingError` (one line naming ``uri`` or its file) unless MLflow can log there."""
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0]
    fix = "; start it, or unset MLFLOW_TRACKING_URI to log to ./mlflow.db"
    if not scheme and uri.startswith("/"):
        return  # a local folder (MLflow's file store)
    if scheme not in SCHEMES:
        raise TrackingError(f"MLFLOW_TRACKING_URI {uri!r}: unsupported or missing scheme; use http://host:port, "
                            f"sqlite:///path/mlflow.db or file:///path")
    if scheme in ("http", "https"):
        probe = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(probe, timeout=PROBE_TIMEOUT_S) as r:
                body = json.loads(r.read(1 << 20) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except urllib.error.HTTPError as e:
            raise TrackingError(f"MLflow tracking server {uri}: not an MLflow server (HTTP {e.code} for the "
                                f"experiments API){fix}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server {uri}: unreachable ({reason}){fix}") from None
        except ValueError:
            raise TrackingError(f"MLflow tracking server {uri}: not an MLflow server (the experiments API did "
                                f"not answer JSON){fix}") from None
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            return
        if db.exists():
            with open(db, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\0":
                raise TrackingError(f"{db}: not an SQLite database, so not an MLflow store; move it away to start "
                                    f"a new one")
            if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
                raise TrackingError(f"{db}: MLflow store not writable (file or folder permissions)")
        elif not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise TrackingError(f"{db}: cannot create the MLflow store there (folder missing or not writable)")


@contextlib.contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialize stages that open one SQLite store at once (MLflow creates its schema on first use)."""
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is None:
        yield
        return
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    """Thin handle on the active MLflow run. A call that fails (the server went away) prints one warning and
    turns logging off for the rest of the stage; the stage itself goes on."""

    def __init__(self, mlflow, run):
        self._mlflow, self.run = mlflow, run
        self.id = run.info.run_id
        self.lost = False

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.startswith("_") or name in ("id", "run", "lost") or not callable(attr):
            return attr

        def guarded(*args, **kwargs):
            if self.lost:
                return None
            try:
                return attr(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (any client or transport failure)
                self._lose(e)
                return None
        return guarded

    def _lose(self, e: Exception) -> None:
        self.lost = True
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"warning: MLflow: lost the tracking store {tracking_uri()} ({type(e).__name__}: {reason}); the stage "
              f"goes on without logging, its outputs are unaffected", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):  # nothing left for MLflow's exit hook to send
            self._mlflow.tracking.fluent._active_run_stack.get().clear()

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

    def log_image(self, path: str | Path, key: str) -> None:
        """An image under ``key``, twice: as an MLflow image (the experiment's chart view shows it per run, with
        the run's params) and as the artifact ``<key>.png``, a path every run of any stage shares, so the
        compare-runs page shows the compared runs' images side by side under "Artifacts"."""
        import shutil
        import tempfile

        from PIL import Image

        with Image.open(path) as img:
            self._mlflow.log_image(img.convert("RGB"), key=key)
        with tempfile.TemporaryDirectory() as tmp:
            common = Path(tmp) / f"{key}{Path(path).suffix or '.png'}"
            shutil.copyfile(path, common)
            self._mlflow.log_artifact(str(common))

    def log_dataset(self, path: str | Path, name: str, context: str = "training") -> None:
        """The data set at ``path`` as the run's input (MLflow's Datasets column), named and digested."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        from deme.resume import content_id

        dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name,
                              digest=content_id(path)[:16])
        self._mlflow.log_input(dataset, context=context)

    def set_tag_of(self, run_id: str, key: str, value: str) -> None:
        self._mlflow.MlflowClient().set_tag(run_id, key, value)

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
                                                                 "(docs/paper.md §1.8)")
            version = client.create_model_version(name, f"{self.run.info.artifact_uri}/model", run_id=self.id,
                                                  tags={k: str(v) for k, v in (tags or {}).items()})
        except Exception as e:  # e.g. a file-store URI, which has no registry
            warnings.warn(f"MLflow model registry: {name} not registered ({type(e).__name__}: {e})")
            return None
        return str(version.version)


@contextlib.contextmanager
def stage_run(stage: str, profile: str, *, item: str | None = None, params: dict | None = None,
              tags: dict[str, Any] | None = None, system_metrics: bool = False) -> Iterator[Run]:
    """Open the MLflow run of one stage execution; it ends FAILED if the body raises. The tracking URI is
    checked first (:class:`TrackingError`), and MLflow's HTTP retries are bounded.

    Every run carries tag ``deme.group``: the DVC experiment's name, or ``workspace@<commit>`` for a plain
    `dvc repro`, so the UI filters one experiment's runs with ``tags.deme.group = '...'``. Experiments are
    marked as model development (``mlflow.experimentKind``), so the UI opens on their runs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri()
    check_tracking(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow
    name = f"{stage}@{item}" if item else stage
    who = {"host": socket.gethostname(), "pid": os.getpid(), "workdir": str(repo_root().resolve())}
    commit, exp = git_commit(), os.environ.get("DVC_EXP_NAME", "")
    all_tags = {"stage": stage, "profile": profile, "git_commit": commit, "dvc_exp": exp,
                "deme.group": exp or f"workspace@{commit[:8]}", **({"item": item} if item else {}), **who,
                **(tags or {})}
    try:
        with _first_use_lock(uri), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.set_experiment(profile)
            if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
            killed = close_killed_runs(mlflow.MlflowClient(), mlflow.get_experiment_by_name(profile).experiment_id,
                                       name, who)
            if killed:
                all_tags["deme.resumed_from"] = ",".join(killed)
            if system_metrics:  # MLflow logs a sample only after a full interval (default 10 s): short stages too
                mlflow.set_system_metrics_sampling_interval(1)
            active = mlflow.start_run(run_name=name, tags={k: str(v) for k, v in all_tags.items()},
                                      log_system_metrics=system_metrics)
    except Exception as e:  # noqa: BLE001 (a store that the checks above could not foresee)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrackingError(f"MLflow store {uri}: cannot start a run ({type(e).__name__}: {reason})") from None
    run = Run(mlflow, active)
    for old in killed:
        run.set_tag_of(old, "deme.resumed_by", run.id)
    if killed:
        print(f"[resume] MLflow: run {', '.join(killed)} of {name} was killed; this run {run.id} resumes it",
              flush=True)
    if params:
        run.log_params(params)
    status = "FINISHED"
    try:
        yield run
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if not run.lost:
            try:
                mlflow.end_run(status)
            except Exception as e:  # noqa: BLE001
                run._lose(e)


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


TIMINGS = ("images_per_s", "wall_s")  # measured with a clock: MLflow only, never in a DVC output


class CurveLog:
    """Training-curve logger: sends each point to MLflow and keeps it, without the clock-measured fields
    (:data:`TIMINGS`), for a DVC plots CSV."""

    def __init__(self, run: Run | None = None):
        self.run, self.rows = run, []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step)
        kept = {k: float(v) for k, v in metrics.items() if k not in TIMINGS}
        if kept:
            self.rows.append({"step": step, **kept})

    def save(self, path: str | Path) -> None:
        import pandas as pd

        from deme.io import atomic_write_text

        atomic_write_text(path, pd.DataFrame(self.rows).to_csv(index=False))
