"""Tracking outages (deme/tracking.py): a store that cannot be used ends the stage before any work with one
line naming it; a server lost mid-stage never fails the stage; concurrent first use of a fresh mlflow.db."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deme.tracking import TrackingError, check_tracking, stage_run

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def plain_http():
    """A web server that is not MLflow (answers 404 to the experiments API)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_unusable_stores_are_one_line_naming_them(tmp_path, plain_http):
    closed = f"http://127.0.0.1:{_free_port()}"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 10)
    cases = {closed: "unreachable", plain_http: "not an MLflow server", "localhost:5000": "scheme",
             f"sqlite:///{garbage}": "not an SQLite database", f"sqlite:///{tmp_path}/missing/m.db": "cannot create"}
    for uri, words in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(TrackingError) as e:
            check_tracking(uri)
        assert words in str(e.value) and "\n" not in str(e.value) and time.perf_counter() - t0 < 10
        assert (str(garbage) if "garbage" in uri else uri.split("///")[-1].split("/m.db")[0]) in str(e.value)


def test_read_only_store_names_the_file(tmp_path, monkeypatch):
    import sqlite3

    db = tmp_path / "ro.db"
    sqlite3.connect(db).close()
    db.chmod(0o444)
    if os.geteuid() == 0:  # root writes through file permissions: ask as a user would
        monkeypatch.setattr("deme.tracking.os.access", lambda p, mode: Path(p) != db)
    with pytest.raises(TrackingError, match="not writable"):
        check_tracking(f"sqlite:///{db}")


def test_stage_cli_with_a_closed_port_fails_fast_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: micro\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "prepare.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.perf_counter() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prepare: MLflow tracking server http://127.0.0.1:")
    assert not (tmp_path / "data").exists()


def test_concurrent_first_use_of_a_fresh_store(tmp_path):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from deme.tracking import stage_run\n"
            "with stage_run('s' + sys.argv[1], 'p') as run: run.log_metrics({'x': 1.0})\n") % str(REPO)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]


def test_a_server_lost_mid_stage_does_not_fail_it(tmp_path, capsys):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
                               "--default-artifact-root", str(tmp_path / "art"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                check_tracking(uri)
                break
            except TrackingError:
                time.sleep(0.5)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        out = tmp_path / "output.txt"
        t0 = time.perf_counter()
        with stage_run("s", "p") as run:
            run.log_metrics({"x": 1.0})
            os.killpg(server.pid, 9)
            server.wait()
            out.write_text("written")  # the stage's work
            run.log_metrics({"x": 2.0}, step=1)
            run.log_params({"a": 1})
        assert out.read_text() == "written" and run.lost and time.perf_counter() - t0 < 60
        assert capsys.readouterr().err.count("warning: MLflow: lost the tracking store") == 1
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if server.poll() is None:
            os.killpg(server.pid, 9)


def test_runs_carry_settings_group_images_and_dataset_for_compare(tmp_path, monkeypatch):
    """What MLflow's compare view needs: every setting as a param, a group tag per experiment, images under
    one key per kind, the data set as an input; the experiment opens on its runs (not GenAI traces)."""
    import mlflow
    import numpy as np
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-p0")
    grid, data = tmp_path / "grid.png", tmp_path / "train.npy"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(grid)
    np.save(data, np.zeros((4, 2, 2, 3), np.uint8))
    with stage_run("evaluate", "micro", item="merged", params={"deme.p": 0.0, "method": "merged"}) as run:
        run.log_image(grid, "samples")
        run.log_dataset(data, "micro/train")
    client = mlflow.MlflowClient(tracking_uri=uri)
    r = client.get_run(run.id)
    assert r.data.params["deme.p"] == "0.0" and r.data.params["method"] == "merged"
    assert r.data.tags["deme.group"] == "exp-p0" and not run.lost
    assert client.get_experiment_by_name("micro").tags["mlflow.experimentKind"] == "custom_model_development"
    assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["micro/train"]
    assert any("samples" in a.path for a in client.list_artifacts(run.id, "images"))
    assert "samples.png" in [a.path for a in client.list_artifacts(run.id)]  # a path every run shares: compare


def test_a_training_run_of_a_few_seconds_has_system_metrics(tmp_path, monkeypatch):
    """MLflow publishes system metrics once per sampling interval (10 s by default, longer than a short
    stage); stage_run samples every second."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("finetune", "micro", item="plain", system_metrics=True) as run:
        time.sleep(3)
    metrics = mlflow.MlflowClient(tracking_uri=uri).get_run(run.id).data.metrics
    assert any(k.startswith("system/") for k in metrics), sorted(metrics)
