"""Stage CLIs on bad input: one line naming the key or file, exit status 2, no traceback, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("params, key", [
    ("profile: nope\n", "profile"),
    ("profile: micro\nfinetune:\n  lr: fast\n", "finetune.lr"),
    ("profile: micro\ndeme:\n  intervals: [1, 2, 3]\n", "deme.intervals"),
    ("profile: micro\ndeme:\n  pp: 0.3\n", "deme.pp"),
    ("profile: micro\nsample: [1, 2]\n", "sample"),
    ("profile: micro\nseed: [\n", "not valid YAML"),
])
def test_bad_params_one_line_error_and_nothing_written(tmp_path, params, key):
    (tmp_path / "params.yaml").write_text(params)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_stage("finetune", tmp_path, "--interval", "1")
    assert proc.returncode == 2
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_checkpoint_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: micro\n")
    proc = run_stage("evaluate", tmp_path, "--model", "merged")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "models/micro" in proc.stderr and "dvc repro" in proc.stderr


def test_help_explains_the_stage():
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "finetune.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--interval" in proc.stdout and "consistency" in proc.stdout
