"""Model directories: a diffusers ``save_pretrained`` directory (safetensors) plus ``deme.json``.

``deme.json`` records how the model was made (profile, method, interval, seed, steps, git commit) and
whether it carries channel-wise projections, which :func:`load_model` re-inserts before loading the
weights strictly. Weights are only ever read as safetensors: nothing is unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deme.config import Config
from deme.io import atomic_dir, read_json, write_json
from deme.projection import add_channel_projection, has_channel_projection
from deme.schedule import make_scheduler

META = "deme.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing or unreadable; the message says what to fetch or rerun."""


def build_unet(cfg: Config) -> nn.Module:
    """A fresh UNet2DModel of the profile's architecture (tiny profiles train it from scratch)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=cfg.data.resolution, in_channels=3, out_channels=3, **cfg.model.unet.kwargs())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, path: str | Path, cfg: Config, **meta: Any) -> None:
    """Save atomically: weights + config (+ scheduler config) + deme.json."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        make_scheduler(cfg.schedule).save_pretrained(tmp)
        info = {"profile": cfg.profile, "channel_projection": has_channel_projection(model),
                "parameters": count_parameters(model), **meta}
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
    try:
        config = read_json(path / "config.json")
    except ValueError as e:
        raise CheckpointError(f"{e}; rerun the stage that makes {path} (dvc repro)") from None
    cls = _model_class(config)
    meta = model_meta(path)
    if not meta.get("channel_projection"):
        try:  # safetensors only: never fall back to unpickling a .bin that happens to lie there
            return cls.from_pretrained(path, use_safetensors=True).to(device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"{path}: no readable safetensors weights ({type(e).__name__}: {reason}); "
                                  f"rerun the stage that makes it (dvc repro)") from None
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing weights file; rerun the stage that makes {path}")
    model = add_channel_projection(cls.from_config(cls.load_config(path)))
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{weights}: corrupt or truncated checkpoint ({e}); rerun the stage") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch's message lists every key; the first line says what is wrong
        reason = (str(e).strip().splitlines() or ["mismatch"])[0][:200]
        raise CheckpointError(f"{weights}: weights do not fit the model of {path / 'config.json'} ({reason}); "
                              f"rerun the stage that makes {path}") from None
    return model.to(device).eval()


def pretrained_path(cfg: Config) -> Path:
    """Where the profile's pretrained model lives: the ``pretrain`` stage's output for every profile (tiny
    trains it; hub profiles import the checkpoint there, so the pipeline pins it by hash)."""
    return Path("models") / cfg.profile / "pretrained"


def load_pretrained(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The pretrained model theta, as the ``pretrain`` stage left it."""
    path = pretrained_path(cfg)
    if cfg.task == "t2i":  # a StableDiffusionPipeline folder: only the UNet is finetuned
        path = path / "unet"
    if not path.exists():
        what = "trains" if cfg.model.source == "train" else f"imports {cfg.model.pretrained_id or cfg.model.local_path}"
        raise CheckpointError(f"{path}: pretrained model not found; the pretrain stage {what}: dvc repro pretrain")
    return load_model(path, device)


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_checkpoint(cfg: Config) -> tuple[nn.Module, str]:
    """Load the profile's checkpoint from ``model.local_path`` or the Hugging Face cache, offline.

    Returns the model and where it came from. A missing checkpoint fails at once (``HF_HUB_OFFLINE=1``)
    with the model id, the place looked in and the command that fetches it on a connected machine.
    """
    from diffusers import UNet2DModel

    m = cfg.model
    fetch = (f"huggingface-cli download {m.pretrained_id} --local-dir {m.local_path}" if m.local_path
             else f"huggingface-cli download {m.pretrained_id}")
    if m.local_path:
        path = Path(m.local_path)
        sub = path / "unet" if not (path / "config.json").exists() and (path / "unet" / "config.json").exists() else path
        if not (sub / "config.json").exists():
            raise CheckpointError(f"{m.pretrained_id or 'model'}: no checkpoint at model.local_path={path} "
                                  f"(config.json missing); on a connected machine run: {fetch}")
        try:
            return UNet2DModel.from_pretrained(sub).eval(), str(sub)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{sub}: unreadable checkpoint ({e})") from None
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: pass it on explicitly (offline unless set to 0)
    offline = os.environ.setdefault("HF_HUB_OFFLINE", "1").upper() in ("1", "ON", "YES", "TRUE")
    try:
        model = UNet2DModel.from_pretrained(m.pretrained_id, local_files_only=offline)
        return model.eval(), f"hf://{m.pretrained_id}"
    except (OSError, EnvironmentError) as e:
        raise CheckpointError(
            f"{m.pretrained_id}: not found in the Hugging Face cache {hub_cache_dir()} (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE')}); on a connected machine run: {fetch} "
            f"(and copy the cache, or set model.local_path to the downloaded folder) [{type(e).__name__}]") from None


def check_architecture(model: nn.Module, cfg: Config) -> None:
    """The checkpoint must be the UNet the profile describes (docs/paper.md §8.1): compare the config keys."""
    want = {"sample_size": cfg.data.resolution, **cfg.model.unet.kwargs()}
    have = dict(model.config)
    bad = [f"{k}: checkpoint {have.get(k)!r} vs params {v!r}" for k, v in want.items()
           if (tuple(have[k]) if isinstance(have.get(k), list) else have.get(k)) != v]
    if bad:
        raise CheckpointError(f"{cfg.model.pretrained_id or cfg.model.local_path}: not the architecture of profile "
                              f"{cfg.profile!r} ({'; '.join(bad)}); fix model.unet / data.resolution or the checkpoint")


def frozen_teacher(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen pre-finetuning model (without projections) of the consistency loss, docs/paper.md §1.3."""
    teacher = load_pretrained(cfg, device)
    teacher.requires_grad_(False)
    return teacher.eval()
