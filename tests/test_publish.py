"""The published tiny checkpoint: its pretraining reproduces bit for bit from a fresh checkout (the first
logged steps, one CPU thread as it ran), its model card, and the default pipeline's import of it."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from deme.config import config_from_mapping
from deme.profiles import preset

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "models" / "tiny" / "from-scratch"


def test_first_pretraining_steps_reproduce_the_published_run_bit_for_bit():
    """Re-run the first `pretrain.log_every` steps of checkpoints/dvc.yaml's pretraining (the preset's
    settings, the data the prepare stage makes) and compare the logged mean loss with the committed curve."""
    from deme.data.shapes import generate_shapes
    from deme.io import derive_seed
    from deme.models import build_unet
    from deme.objectives import EpsObjective
    from deme.schedule import alphas_cumprod
    from deme.train import train

    curve = SCRATCH / "curve.csv"
    assert curve.exists(), f"{curve} missing: the published run's curve is committed with its checkpoint"
    first = next(r for r in csv.DictReader(curve.open()) if r.get("loss"))
    cfg = config_from_mapping(preset("tiny"))
    steps = int(first["step"])
    assert steps == cfg.pretrain.log_every
    data = generate_shapes(cfg.data.num_train, derive_seed(cfg.seed, "data", "train"), cfg.data.resolution)
    seed = derive_seed(cfg.seed, "pretrain")
    torch.manual_seed(seed)
    model = build_unet(cfg)
    objective = EpsObjective(alphas_cumprod(cfg.schedule).float(), 0, cfg.schedule.num_train_timesteps)
    logged = {}
    budget = dataclasses.replace(cfg.pretrain, iterations=steps, eval_every=0)  # the LR schedule is step-wise
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # the published run's thread count (its metrics.json)
    try:
        train(model, objective, data.images, budget, seed=seed, device=torch.device("cpu"),
              log=lambda m, s: logged.setdefault(s, m), desc="reproduce")
    finally:
        torch.set_num_threads(prev)
    assert logged[steps]["loss"] == float(first["loss"])


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
