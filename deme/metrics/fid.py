"""FID through clean-fid, computed while sampling (no image files), with any feature network.

Generated and reference images travel the same clean-fid path (``cleanfid.fid.get_model_features``: uint8
images -> resize -> feature network), and the distance is clean-fid's ``frechet_distance``. The tiny
profile swaps Inception-v3 for its own feature network (``custom_feat_extractor`` in clean-fid's terms) and
uses an identity resize, since its images already have the network's input size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from deme.io import atomic_write_bytes


@dataclass
class FeatureSpace:
    """A feature network plus how images are resized for it; ``name``/``sha256`` identify it in metrics."""

    net: nn.Module
    name: str
    sha256: str
    mode: str = "clean"
    resize: Callable[[np.ndarray], np.ndarray] | None = None  # None: keep the image size
    device: torch.device = torch.device("cpu")

    def describe(self) -> dict:
        return {"feature_net": self.name, "feature_net_sha256": self.sha256, "fid_mode": self.mode}


def _identity_resize(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32)


def features(batches: Iterable[torch.Tensor], num: int, space: FeatureSpace, batch_size: int,
             desc: str = "features") -> np.ndarray:
    """Features of ``num`` images arriving as uint8 [b, 3, H, W] batches of size ``batch_size``."""
    from cleanfid import fid as cfid

    it: Iterator[torch.Tensor] = iter(batches)

    def generator(z: torch.Tensor) -> torch.Tensor:  # clean-fid's gen(z): z only sets the batch size
        batch = next(it, None)
        if batch is None or len(batch) == 0:
            raise RuntimeError(f"{desc}: the image stream ended before {num} images")
        if len(batch) > len(z):
            raise ValueError(f"{desc}: a batch of {len(batch)} images exceeds batch_size {len(z)}")
        if len(batch) < len(z):  # the last batch: pad; clean-fid truncates to num_gen
            pad = torch.zeros((len(z) - len(batch),) + tuple(batch.shape[1:]), dtype=batch.dtype)
            batch = torch.cat([batch, pad])
        return batch

    space.net.to(space.device).eval()
    return cfid.get_model_features(generator, space.net, mode=space.mode, z_dim=1, num_gen=num,
                                   batch_size=batch_size, device=space.device, desc=f"{desc}: ",
                                   verbose=False, custom_fn_resize=space.resize or _identity_resize)


def batch_features(batch: torch.Tensor, space: FeatureSpace) -> np.ndarray:
    """Features of one uint8 [b, 3, H, W] batch, exactly as clean-fid's ``get_model_features`` computes a
    batch (per-image resize of the HWC uint8 array, then ``get_batch_features``): used where one sampled batch
    feeds several feature spaces, or where batches are split over processes."""
    from cleanfid.fid import get_batch_features

    if space.mode == "legacy_tensorflow":  # clean-fid resizes inside the network in this mode
        resized = batch.float()
    else:
        resize = space.resize or _identity_resize
        resized = torch.cat([torch.tensor(resize(img.numpy().transpose((1, 2, 0))).transpose((2, 0, 1))).unsqueeze(0)
                             for img in batch.cpu()])
    space.net.to(space.device).eval()
    return get_batch_features(resized, space.net, space.device)


def array_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 [n, H, W, 3] -> uint8 [b, 3, H, W] torch batches."""
    for lo in range(0, len(images), batch_size):
        yield torch.as_tensor(images[lo:lo + batch_size]).permute(0, 3, 1, 2).contiguous()


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, feats: np.ndarray) -> "Stats":
        feats = np.asarray(feats, np.float64)
        return cls(feats.mean(0), np.cov(feats, rowvar=False), len(feats))

    def save(self, path: str | Path, **meta) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=self.count,
                 **{k: np.asarray(str(v)) for k, v in meta.items()})
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: FID reference statistics missing (make them: dvc repro fid_ref)")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["mu"], z["sigma"], int(z["count"]))
        except Exception as e:
            raise ValueError(f"{path}: corrupt FID statistics ({e}); rerun: dvc repro fid_ref") from None


CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"


def builtin_stats_path(dataset: str, split: str, res: int, mode: str) -> Path:
    """Where clean-fid keeps its downloaded reference statistics (cleanfid/stats/<name>_<mode>_<split>_<res>.npz)."""
    import cleanfid

    return Path(cleanfid.__file__).parent / "stats" / f"{dataset}_{mode}_{split}_{res}.npz".lower()


def builtin_stats(dataset: str, split: str, res: int, mode: str) -> Stats:
    """clean-fid's built-in statistics (e.g. cifar10 train 32, lsun_church train 256), from its cache only."""
    path = builtin_stats_path(dataset, split, res, mode)
    if not path.exists():
        raise FileNotFoundError(f"{path}: clean-fid's built-in statistics for {dataset}/{split} at {res} ({mode}) "
                                f"are not cached; on a connected machine: curl -L {CLEANFID_STATS_URL}/{path.name} "
                                f"-o {path} (or set fid.reference: train to build them from the data)")
    try:
        with np.load(path) as z:
            return Stats(z["mu"], z["sigma"], 0)  # count unknown: clean-fid's files do not record it
    except Exception as e:
        raise ValueError(f"{path}: corrupt clean-fid statistics ({e}); delete it and fetch it again") from None


def frechet_distance(a: Stats, b: Stats) -> float:
    from cleanfid import fid as cfid

    return float(cfid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def fid_of_features(feats: np.ndarray, ref: Stats) -> float:
    return frechet_distance(Stats.of(feats), ref)
