"""scripts/mlflow_screenshot.py end to end: a real `mlflow server` and headless Chromium on a small tracking DB."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mlflow_screenshot.py"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "google-chrome-stable")) if p), None)


def make_tracking_db(tmp_path: Path) -> str:
    """sqlite store with experiment 'tiny': evaluate@a/b/c (FINISHED, metric fid), a rerun of evaluate@a
    (the latest is the one to show), a FAILED evaluate@d and a train run (both left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    for name, fid, status in [("evaluate@a", 999.0, "FINISHED"), ("evaluate@a", 31.5, "FINISHED"),
                              ("evaluate@b", 42.25, "FINISHED"), ("evaluate@c", 12.75, "FINISHED"),
                              ("evaluate@d", 1.0, "FAILED"), ("train@a", 5.0, "FINISHED")]:
        run = client.create_run(exp_id, run_name=name, tags={"stage": name.split("@")[0], "profile": "tiny"})
        client.log_metric(run.info.run_id, "fid", fid)
        client.set_terminated(run.info.run_id, status)
        time.sleep(0.01)  # distinct start times: the rerun of evaluate@a is the latest
    return uri


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) "
                                             "on PATH; install it with: apt-get install -y chromium")
def test_screenshot_of_compared_runs(tmp_path):
    t0 = time.monotonic()
    uri = make_tracking_db(tmp_path)
    out = tmp_path / "shots" / "compare.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--tracking-uri", uri, "--experiment", "tiny", "--out", str(out),
         "--no-table", "--chromium", CHROMIUM, "--server-timeout", "25", "--browser-timeout", "25"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=max(5.0, 37 - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops its server and browser on SIGTERM
        stdout, _ = proc.communicate(timeout=20)
        pytest.fail(f"mlflow_screenshot.py took too long:\n{stdout}")
    assert proc.returncode == 0, stdout
    # latest FINISHED run per evaluate@ name, sorted by fid; the failed run, the old rerun and train@a left out
    listed = [line.split()[0] for line in stdout.splitlines() if line.startswith("  evaluate@")]
    assert listed == ["evaluate@c", "evaluate@a", "evaluate@b"], stdout
    assert "fid=31.50" in stdout and "fid=999" not in stdout
    assert f"saved {out}" in stdout

    from PIL import Image

    assert out.is_file() and out.stat().st_size > 20_000
    with Image.open(out) as im:
        assert im.size == (1800, 2100)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # a rendered page, not a blank one
    assert not list(tmp_path.glob("mlruns")) and not list(tmp_path.glob("mlartifacts"))  # nothing written here
    assert time.monotonic() - t0 < 40


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) "
                                             "on PATH; install it with: apt-get install -y chromium")
def test_compare_page_shows_the_differing_param_and_both_sample_grids(tmp_path, monkeypatch):
    """evaluate@merged of a workspace run and of a `dvc exp run -S deme.p=0.0` experiment, logged by the suite's
    own stage_run: MLflow's compare page lists deme.p with both values, and with samples.png opened (the
    clicked Artifacts entry) shows both runs' sample grids side by side."""
    import json

    import numpy as np
    from PIL import Image

    from deme.tracking import stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    colours = {"workspace@abc12345": (200, 30, 30), "exp-p0": (30, 30, 200)}
    for (group, colour), p in zip(colours.items(), (0.4, 0.0)):
        monkeypatch.setenv("DVC_EXP_NAME", group)
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(tmp_path / "grid.png")
        with stage_run("evaluate", "micro", item="merged", params={"deme": {"p": p}, "method": "merged"}) as run:
            run.log_metrics({"fid": 30.0 + 10 * p})
            run.log_image(tmp_path / "grid.png", "samples")
    out, facts = tmp_path / "compare.png", tmp_path / "facts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tracking-uri", uri, "--experiment", "micro", "--out",
                           str(out), "--no-table", "--per-tag", "deme.group", "--artifact", "samples.png",
                           "--facts", str(facts), "--chromium", CHROMIUM, "--server-timeout", "40",
                           "--browser-timeout", "60"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(facts.read_text())
    assert len(shown["run_ids"]) == 2 and len(shown["images"]) == 2  # one preview per run
    # the params table: the differing setting with both values (runs in order of fid)
    assert "deme.p\t0.0\t0.4" in shown["text"] or "deme.p\t0.4\t0.0" in shown["text"]
    with Image.open(out) as im:
        pixels = set(im.convert("RGB").getdata())
    assert set(colours.values()) <= pixels  # both grids are on the screenshot
