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
