"""The tiny profile's FID feature network.

Inception-v3 features of 16x16 shapes mean little, so the tiny domain gets its own feature space: a small
CNN classifier trained on the shapes to predict shape, colour, background and size. Its penultimate
activations (before the ReLU, so they are dense) play the role of Inception's pool3 features; FID then
runs through clean-fid exactly as with Inception (``deme.metrics.fid``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deme.data.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES
from deme.io import atomic_dir, derive_seed, sha256_file

HEADS = {"shape": len(SHAPES), "color": len(COLORS), "background": len(BACKGROUNDS), "size": len(SIZES)}


class FeatNet(nn.Module):
    """Input: float [n, 3, H, W] with values in [0, 255] (clean-fid's convention). Output: features."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * w, feature_dim))
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})
        self.config = {"width": width, "feature_dim": feature_dim}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float() / 127.5 - 1.0)

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self(x))
        return {k: head(h) for k, head in self.heads.items()}


def _targets(labels: dict[str, np.ndarray], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(labels[k])[idx].long() for k in HEADS}


def train_featnet(images: np.ndarray, labels: dict[str, np.ndarray], *, width: int, feature_dim: int,
                  iterations: int, batch_size: int, lr: float, seed: int, log=None) -> FeatNet:
    """Train on uint8 [n, H, W, 3] images with the attribute labels of the shapes generator."""
    torch.manual_seed(derive_seed(seed, "featnet", "init"))
    net = FeatNet(width, feature_dim)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    x_all = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    g = torch.Generator().manual_seed(derive_seed(seed, "featnet", "data"))
    bar = tqdm(range(iterations), desc="featnet", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        logits, targets = net.logits(x_all[idx]), _targets(labels, idx)
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log({"loss": loss.item()}, step + 1)
    return net.eval()


@torch.no_grad()
def accuracy(net: FeatNet, images: np.ndarray, labels: dict[str, np.ndarray], batch: int = 1000) -> dict:
    """Held-out accuracy per attribute and for all four attributes at once."""
    correct = {k: 0 for k in HEADS}
    joint = 0
    for lo in range(0, len(images), batch):
        x = torch.as_tensor(images[lo:lo + batch]).permute(0, 3, 1, 2).float()
        logits = net.logits(x)
        idx = torch.arange(lo, min(lo + batch, len(images)))
        targets = _targets(labels, idx)
        ok = torch.ones(len(idx), dtype=torch.bool)
        for k in HEADS:
            hit = logits[k].argmax(1) == targets[k]
            correct[k] += int(hit.sum())
            ok &= hit
        joint += int(ok.sum())
    n = len(images)
    return {**{f"accuracy_{k}": v / n for k, v in correct.items()}, "accuracy_all": joint / n}


def save_featnet(net: FeatNet, path: str | Path, **meta) -> None:
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file(net.state_dict(), str(tmp / "featnet.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**net.config, **meta}, indent=2) + "\n")


def load_featnet(path: str | Path) -> tuple[FeatNet, str]:
    """The network and the sha256 of its weights (recorded in every FID metrics file)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "featnet.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: feature network missing (make it with: dvc repro featnet)")
    from deme.io import read_json

    config = read_json(path / "config.json")
    net = FeatNet(config["width"], config["feature_dim"])
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise ValueError(f"{weights}: corrupt feature network ({e}); rerun: dvc repro featnet") from None
    return net.eval(), sha256_file(weights)
