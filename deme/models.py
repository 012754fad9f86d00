"""Model directories: a diffusers ``save_pretrained`` directory (safetensors) plus ``deme.json``.

``deme.json`` records how the model was made (profile, method, interval, seed, steps, git commit) and
whether it carries channel-wise projections, which :func:`load_model` re-inserts before loading the
weights strictly. Weights are only ever read as safetensors: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deme.config import Config
from deme.io import atomic_dir, git_commit, read_json, write_json
from deme.projection import add_channel_projection, has_channel_projection
from deme.schedule import make_scheduler

META = "deme.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing or unreadable; the message says what to fetch or rerun."""


def build_unet(cfg: Config) -> nn.Module:
    """A fresh UNet2DModel of the profile's architecture (tiny profiles train it from scratch)."""
    from diffusers import UNet2DModel

    u = cfg.model.unet
    return UNet2DModel(sample_size=cfg.data.resolution, in_channels=3, out_channels=3,
                       block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
                       down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
                       norm_num_groups=u.norm_num_groups)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, path: str | Path, cfg: Config, **meta: Any) -> None:
    """Save atomically: weights + config (+ scheduler config) + deme.json."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        make_scheduler(cfg.schedule).save_pretrained(tmp)
        info = {"profile": cfg.profile, "channel_projection": has_channel_projection(model),
                "parameters": count_parameters(model), "git_commit": git_commit(), **meta}
        write_json(Path(tmp) / META, info)


def model_meta(path: str | Path) -> dict:
    p = Path(path) / META
    return read_json(p) if p.exists() else {}


def _model_class(config: dict):
    import diffusers

    name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"unknown model class {name!r} in the checkpoint's config.json")
    return cls


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model directory written by :func:`save_model` (or any diffusers UNet directory)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no model here (config.json missing); rerun the stage that makes it "
                              f"(dvc repro) or fix the path")
    config = json.loads((path / "config.json").read_text())
    cls = _model_class(config)
    meta = model_meta(path)
    if not meta.get("channel_projection"):
        return cls.from_pretrained(path).to(device).eval()
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing weights file; rerun the stage that makes {path}")
    model = add_channel_projection(cls.from_config(cls.load_config(path)))
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{weights}: corrupt or truncated checkpoint ({e}); rerun the stage") from None
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def pretrained_path(cfg: Config) -> Path:
    """Where the profile's pretrained model lives (tiny: the pretrain stage's output)."""
    if cfg.model.source == "train":
        return Path("models") / cfg.profile / "pretrained"
    if cfg.model.local_path:
        return Path(cfg.model.local_path)
    return Path(cfg.model.pretrained_id)


def load_pretrained(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The pretrained model theta, from the pipeline (tiny) or a local path / the Hugging Face cache."""
    if cfg.model.source == "train" or cfg.model.local_path:
        path = pretrained_path(cfg)
        if not path.exists():
            how = ("dvc repro pretrain" if cfg.model.source == "train"
                   else f"huggingface-cli download {cfg.model.pretrained_id} --local-dir {path}")
            raise CheckpointError(f"{path}: pretrained model not found; make or fetch it with: {how}")
        return load_model(path, device)
    from diffusers import UNet2DModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return UNet2DModel.from_pretrained(cfg.model.pretrained_id).to(device).eval()
    except (OSError, EnvironmentError) as e:
        raise CheckpointError(
            f"{cfg.model.pretrained_id}: not in the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
            f"on a connected machine run: huggingface-cli download {cfg.model.pretrained_id}, "
            f"or set model.local_path to a save_pretrained directory ({type(e).__name__})") from None


def frozen_teacher(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen pre-finetuning model (without projections) of the consistency loss, PAPER.md §1.3."""
    teacher = load_pretrained(cfg, device)
    teacher.requires_grad_(False)
    return teacher.eval()
