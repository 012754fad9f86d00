"""Scoring models by FID while sampling: the shared core of the merge search and the evaluate stage."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from deme.config import Config
from deme.metrics.fid import FeatureSpace, Stats, features, fid_of_features
from deme.paths import Paths


def feature_space(cfg: Config, device: torch.device) -> FeatureSpace:
    """The profile's FID feature network (tiny: the featnet stage's classifier)."""
    from deme.metrics.featnet import load_featnet

    net, sha = load_featnet(Paths(cfg.profile).featnet)
    return FeatureSpace(net=net, name="featnet", sha256=sha, mode=cfg.fid.mode, device=device)


def image_shape(cfg: Config) -> tuple[int, int, int]:
    return (3, cfg.data.resolution, cfg.data.resolution)


def sample_features(model: nn.Module, seeds: Sequence[int], cfg: Config, space: FeatureSpace,
                    device: torch.device, desc: str, keep: int = 0) -> tuple[np.ndarray, torch.Tensor | None]:
    """Features of DDIM samples of ``model`` for ``seeds``; also returns the first ``keep`` images."""
    from deme.sample import generate

    kept: list[torch.Tensor] = []

    def stream():
        n = 0
        for batch in generate(model, seeds, cfg.schedule, cfg.sample, image_shape(cfg), device, desc=desc):
            if n < keep:
                kept.append(batch[:keep - n])
                n += len(kept[-1])
            yield batch

    feats = features(stream(), len(seeds), space, cfg.sample.batch_size, desc=desc)
    return feats, (torch.cat(kept) if kept else None)


def fid_of_model(model: nn.Module, seeds: Sequence[int], cfg: Config, space: FeatureSpace, ref: Stats,
                 device: torch.device, desc: str) -> float:
    feats, _ = sample_features(model, seeds, cfg, space, device, desc)
    return fid_of_features(feats, ref)
