"""Memory a setting needs, against what this machine has: the bounds behind every value that sizes memory.

A value that cannot fit is refused with one line naming its key, before any stage runs, instead of a
MemoryError (or an out-of-memory kill) hours in. Three kinds of value size memory:

- the generated data set (``data.num_train`` + ``data.num_ref`` images, held in memory while made);
- the evaluation's sample counts (``sample.num_samples``, ``fid.reference_samples``, ``merge.proxy_samples``):
  every training seed's features, their float64 copy inside FID and the bootstrap's index table;
- a batch through the UNet (``pretrain.batch_size``, ``finetune.batch_size``, ``sample.batch_size``). Its peak
  is measured, not guessed: the profile's own UNet runs one training step (forward and backward) or one
  sampling call on fake tensors (no memory, no arithmetic) under torch's MemTracker, in fp32 (more than
  for fp16/bf16 runs). Training adds the AdamW moments, the EMA copy and the frozen teacher; sampling adds
  the N interval models the ensemble keeps resident; text-to-image sampling doubles the batch for guidance.

The budget is half the physical memory on CPU (the rest is for data, the other models and the process) and
90 % of the first GPU's memory on CUDA. The data and sample-count checks here are arithmetic and run in every
stage (deme/cli.py); the batch checks measure the UNet, take a few seconds the first time and run in the
`validate` stage (deme/validation.py), so that no stage imports the model code only to check a setting.
"""
from __future__ import annotations

import os

from deme.config import Config, ConfigError

GiB = 2 ** 30


def host_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget(device: str) -> tuple[str, int]:
    """(what, bytes) a setting may use on ``device`` ('auto', 'cpu' or 'cuda', as runtime.device)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} has {props.total_memory / GiB:.1f} GiB (90 % may be used)", int(0.9 * props.total_memory)
    return host_budget()


def host_budget() -> tuple[str, int]:
    """(what, bytes) a setting may use of this machine's memory: half of it."""
    return f"this machine has {host_memory() / GiB:.1f} GiB (half may be used)", host_memory() // 2


def refuse(key: str, need: int, what: str, avail: tuple[str, int], how: str = "") -> None:
    """ConfigError naming ``key`` if ``need`` bytes (for ``what``) exceed the budget ``avail``."""
    if need > avail[1]:
        raise ConfigError(key, f"{what} takes about {need / GiB:.1f} GiB of memory{how}; {avail[0]}")


# ---------------------------------------------------------------------------------------------- arithmetic


def feature_dims(cfg: Config) -> int:
    """Feature floats kept per evaluated image: every FID mode's feature vector (and the CLIP embedding)."""
    per_mode = cfg.featnet.feature_dim if cfg.fid.feature_net == "featnet" else 2048  # Inception-v3 pool3
    return per_mode * len(cfg.fid.modes) + (cfg.clip.embed_dim if cfg.task == "t2i" else 0)


def evaluation_bytes(n: int, dims: int, seeds: int, bootstrap: int) -> int:
    """n images' float32 features for each training seed, one float64 copy (FID's moments) and the
    bootstrap's [bootstrap, n] int64 index table (deme/stats.py)."""
    return n * dims * (4 * seeds + 8) + bootstrap * n * 8


def check_counts(cfg: Config, avail: tuple[str, int] | None = None) -> None:
    """The generated data set and the evaluation's sample counts, against host memory (numpy arrays)."""
    avail = avail or host_budget()
    p = "t2i." if cfg.task == "t2i" else ""
    d = cfg.data
    if d.kind == "shapes":
        refuse(f"{p}data.num_train", (d.num_train + d.num_ref) * d.resolution ** 2 * 3,
               f"generating {d.num_train} + {d.num_ref} images of {d.resolution}x{d.resolution}", avail)
    dims, seeds = feature_dims(cfg), max(cfg.deme.seeds, cfg.baselines.seeds)
    refuse(f"{p}sample.num_samples", evaluation_bytes(cfg.sample.num_samples, dims, seeds, cfg.fid.bootstrap),
           f"evaluating {cfg.sample.num_samples} images x {seeds} training seeds ({dims} feature floats each)", avail)
    refuse(f"{p}fid.reference_samples", evaluation_bytes(cfg.fid.reference_samples, dims, 1, 0),
           f"a reference of {cfg.fid.reference_samples} images ({dims} feature floats each)", avail)
    refuse(f"{p}merge.proxy_samples", evaluation_bytes(cfg.merge.proxy_samples, dims, 1, 0),
           f"scoring {cfg.merge.proxy_samples} search images ({dims} feature floats each)", avail)
