"""The published tiny checkpoint: its pretraining reproduces bit for bit from a fresh checkout (the first
logged steps, one CPU thread as it ran), its model card, and the default pipeline's import of it."""
from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deme.config import config_from_mapping
from deme.profiles import preset

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "models" / "tiny" / "from-scratch"


def test_first_pretraining_steps_reproduce_the_published_run_bit_for_bit():
    """Re-run the first `pretrain.log_every` steps of checkpoints/dvc.yaml's pretraining in a fresh process (the
    preset's settings, thread count and CPU kernels; the data the prepare stage makes) and compare the logged
    mean loss with the committed curve of the published run."""
    curve = SCRATCH / "curve.csv"
    assert curve.exists(), f"{curve} missing: the published run's curve is committed with its checkpoint"
    card = (ROOT / "checkpoints" / "tiny" / "MODEL_CARD.md").read_text()
    cfg = config_from_mapping(preset("tiny"))
    if f"runtime.cpu_kernels: {cfg.runtime.cpu_kernels}" not in card:
        pytest.skip("the published run's CPU kernels are not on its model card: it reproduces only on a CPU "
                    "like the one it ran on (deme/numerics.py)")
    first = next(r for r in csv.DictReader(curve.open()) if r.get("loss"))
    out = subprocess.run([sys.executable, "-c", "from deme.publish import first_logged_loss as f; "
                          "print(repr(f('tiny')))"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    steps, loss = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert steps == int(first["step"]) == cfg.pretrain.log_every
    assert loss == float(first["loss"])


def test_model_card_states_convergence_and_the_ratio_to_the_floor(tmp_path, monkeypatch):
    from deme.publish import convergence, model_card

    curve = [[1000, 400.0], [2000, 200.0], [4000, 120.0], [8000, 100.0], [16000, 98.0]]
    conv = convergence(curve)
    assert conv["half_steps"] == 8000 and conv["last_doubling_change"] == pytest.approx(-0.02)
    cfg = config_from_mapping(preset("tiny"))
    card = model_card(cfg, {"fid_curve": curve, "parameters": 637043, "iterations": 16000, "wall_s": 7200.0,
                            "loss": 0.03, "threads": 1}, {"sha256": "ab" * 32}, 5.0, "0" * 40)
    assert "19.6x the floor" in card and "-2.0%" in card and "| 16000 | 98.000 |" in card
    assert "lr_schedule: rsqrt" in card


def test_publish_without_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    from deme.publish import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps({"profile": "tiny"}))
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dvc repro checkpoints/dvc.yaml" in err


def test_tiny_imports_the_published_checkpoint():
    cfg = config_from_mapping(preset("tiny"))
    assert cfg.model.source == "hub" and cfg.model.local_path == "checkpoints/tiny/pretrained"
    assert cfg.sample.eta == 0.0  # the paper's deterministic DDIM, now that the stand-in is trained long
