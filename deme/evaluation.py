"""Scoring models by FID while sampling: the shared core of fid_ref, the merge search, the training FID
curve and the evaluate stage.

One sampled batch feeds every feature space of the profile (clean-fid modes, docs/paper.md §8.3), no image is
written unless ``sample.save_images`` is set, and the batches are split over processes when the stage runs
under ``accelerate launch`` (deme/distributed.py): every process ends with all features, in seed order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from deme.config import Config
from deme.distributed import current, gather_batches, my_batches
from deme.metrics.fid import FeatureSpace, Stats, batch_features, fid_of_features
from deme.paths import Paths
from deme.resume import Shards, batch_key


def feature_spaces(cfg: Config, device: torch.device, headline: bool = False) -> dict[str, FeatureSpace]:
    """The profile's FID feature spaces, keyed by clean-fid mode; the first is the headline FID
    (``headline``: build only that one, for the merge search and training curves)."""
    if cfg.fid.feature_net == "featnet":  # tiny: the featnet stage's classifier, identity resize
        from deme.metrics.featnet import load_featnet

        net, sha = load_featnet(Paths(cfg.profile).featnet)
        return {"clean": FeatureSpace(net=net, name="featnet", sha256=sha, mode="clean", device=device)}
    from deme.metrics.inception import inception_space

    modes = cfg.fid.modes[:1] if headline else cfg.fid.modes
    return {mode: inception_space(mode, device, cfg.fid.inception_weights) for mode in modes}


def describe(spaces: dict[str, FeatureSpace]) -> dict:
    """Which network (file hash) and mode produced the numbers, for every metrics file."""
    return {"fid_modes": list(spaces), "feature_nets": {m: s.describe() for m, s in spaces.items()},
            **next(iter(spaces.values())).describe()}


def load_references(cfg: Config, spaces: dict[str, FeatureSpace], heldout: bool = False,
                    search: bool = False) -> dict[str, Stats]:
    """The FID reference statistics per mode (``heldout``: those of the held-out set, {} if there are none;
    ``search``: those the merge and scale searches score against, disjoint from the evaluation's reference)."""
    paths = Paths(cfg.profile)
    if search:
        return {mode: Stats.load(paths.fid_search(mode)) for mode in spaces}
    if heldout:
        return ({m: Stats.load(paths.fid_heldout(m)) for m in spaces}
                if all(paths.fid_heldout(m).exists() for m in spaces) else {})
    return {mode: Stats.load(paths.fid_ref(mode)) for mode in spaces}


def image_shape(cfg: Config) -> tuple[int, int, int]:
    return (3, cfg.data.resolution, cfg.data.resolution)


def stream_features(batches: Iterable[torch.Tensor], mine: Sequence[tuple[int, int]],
                    spaces: dict[str, FeatureSpace], keep: int = 0, on_batch=None,
                    shards: Shards | None = None) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
    """Features of this process's uint8 batches (item ranges ``mine``) in every space, gathered from all
    processes in batch order. Also returns the first ``keep`` images.

    ``shards`` (deme/resume.py): every finished batch's features are saved, and batches saved by an earlier,
    killed run are read back instead; ``batches`` must then yield only the ranges ``todo(mine, shards)``."""
    cached = _cached(mine, shards)
    fresh = iter(batches)
    local = []
    for lo, hi in mine:
        entry = cached.get((lo, hi))
        if shards is not None:
            shards.count(hi - lo, fresh=entry is None)
        if entry is None:
            batch = next(fresh)
            entry = {f"features_{m}": batch_features(batch, s) for m, s in spaces.items()}
            if lo < keep:
                entry["kept"] = batch[:keep - lo].numpy()
            if shards is not None:
                shards.put(batch_key(lo, hi), entry)
            if on_batch is not None:
                on_batch(batch, lo)
        kept = torch.from_numpy(entry["kept"]) if "kept" in entry else None
        local.append(({m: entry[f"features_{m}"] for m in spaces}, kept))
    if shards is not None:
        shards.note(len(mine), "batches")
    everything = gather_batches(local, current())
    feats = {m: np.concatenate([f[m] for f, _ in everything]) for m in spaces}
    kept = [k for _, k in everything if k is not None]
    return feats, (torch.cat(kept) if kept else None)


def _cached(mine: Sequence[tuple[int, int]], shards: Shards | None) -> dict[tuple[int, int], dict]:
    if shards is None:
        return {}
    found = {(lo, hi): shards.get(batch_key(lo, hi)) for lo, hi in mine}
    return {r: e for r, e in found.items() if e is not None}


def todo(mine: Sequence[tuple[int, int]], shards: Shards | None) -> list[tuple[int, int]]:
    """The ranges of ``mine`` that no earlier run finished (all of them without ``shards``)."""
    if shards is None:
        return list(mine)
    return [(lo, hi) for lo, hi in mine if not shards.has(batch_key(lo, hi))]


def sample_features(model: nn.Module, seeds: Sequence[int], cfg: Config, spaces: dict[str, FeatureSpace],
                    device: torch.device, desc: str, keep: int = 0, save_dir: str | Path | None = None,
                    shards: Shards | None = None) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
    """Features of DDIM samples of ``model`` for ``seeds`` in every space; also the first ``keep`` images.
    ``save_dir``: also write every sample as PNG (named by its index), e.g. for an external FID tool.
    ``shards``: keep finished batches, so a killed evaluation resumes (deme/resume.py)."""
    from deme.sample import generate

    mine = my_batches(len(seeds), cfg.sample.batch_size, current())
    if cfg.runtime.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    save = (lambda batch, lo: _save_pngs(batch, Path(save_dir), lo)) if save_dir is not None else None
    batches = generate(model, seeds, cfg.schedule, cfg.sample, image_shape(cfg), device, desc=desc,
                       batches=todo(mine, shards))
    return stream_features(batches, mine, spaces, keep, save, shards)


def _save_pngs(batch: torch.Tensor, folder: Path, first: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(batch.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"{first + k:06d}.png")


def fids(feats: dict[str, np.ndarray], refs: dict[str, Stats], prefix: str = "fid") -> dict[str, float]:
    """FID in every mode: {'<prefix>_<mode>': value}."""
    return {f"{prefix}_{m}": fid_of_features(f, refs[m]) for m, f in feats.items()}


def fid_of_model(model: nn.Module, seeds: Sequence[int], cfg: Config, spaces: dict[str, FeatureSpace],
                 refs: dict[str, Stats], device: torch.device, desc: str) -> float:
    """The headline FID (first mode) of ``model`` on ``seeds``; the same value on every process."""
    feats, _ = sample_features(model, seeds, cfg, {m: spaces[m] for m in list(spaces)[:1]}, device, desc)
    mode = next(iter(feats))
    return fid_of_features(feats[mode], refs[mode])


def array_features(images: np.ndarray, spaces: dict[str, FeatureSpace], batch_size: int,
                   desc: str, shards: Shards | None = None) -> dict[str, np.ndarray]:
    """Features of uint8 [n, H, W, 3] images (a memmap is read batch by batch), split over processes;
    ``shards``: keep finished batches (deme/resume.py)."""
    from tqdm.auto import tqdm

    mine = my_batches(len(images), batch_size, current())
    batches = (torch.as_tensor(np.ascontiguousarray(images[lo:hi])).permute(0, 3, 1, 2).contiguous()
               for lo, hi in tqdm(todo(mine, shards), desc=desc, unit="batch", dynamic_ncols=True))
    feats, _ = stream_features(batches, mine, spaces, shards=shards)
    return feats
