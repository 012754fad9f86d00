"""Text-to-image components and sampling: the Stable Diffusion path of the suite (docs/paper.md §1.6, §1.9, §3.2).

A text-to-image profile's pretrained model is a diffusers ``StableDiffusionPipeline`` folder
(models/<profile>/pretrained/{unet,vae,text_encoder,tokenizer,scheduler}): imported from
CompVis/stable-diffusion-v1-4 for ``sd14``, built and trained by the pretrain stage for ``tiny_t2i``.
Only the UNet is finetuned; the VAE and the text encoder stay frozen (docs/paper.md §1.6, SD settings).

Sampling: classifier-free guidance with one UNet call per step on the stacked [unconditional, conditional]
batch, so a DeMe ensemble (``deme.sample.Ensemble``) serves both branches with the interval model of the
current timestep (docs/paper.md §1.7). Any diffusers scheduler by name (``sample.sampler``; PNDM-50 default as SD
v1.4), configured from the pipeline's own scheduler config. Every image has its own initial-noise seed.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from deme.config import Config
from deme.io import derive_seed

# ----------------------------------------------------------------------------------------------------
# Components


@dataclass
class Components:
    """The frozen parts of a text-to-image pipeline."""

    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: nn.Module  # transformers CLIPTextModel
    vae: nn.Module  # diffusers AutoencoderKL
    scheduler_config: dict  # the pipeline's scheduler config (sampling starts from it)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def to(self, device) -> "Components":
        self.text_encoder.to(device)
        self.vae.to(device)
        return self

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [n, max_length] (padded, truncated), as StableDiffusionPipeline tokenizes."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()  # not inference_mode: the hidden states feed a UNet that is being trained
    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states [n, L, D] (the UNet's encoder_hidden_states)."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0].float()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokens(prompts))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float32)."""
        return self.vae.decode(latents.float() / self.scaling_factor).sample.float().clamp(-1, 1)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior mean: the VAE is frozen, docs/paper.md §1.6)."""
        return self.vae.encode(images.float()).latent_dist.mean * self.scaling_factor


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of OpenAI CLIP's BPE (SD's tokenizer, 49,408 tokens), built from the
    vocabulary file open_clip ships, so the tiny pipeline has the real tokenizer without a download."""
    import open_clip

    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def build_tokenizer(max_length: int, workdir: str | Path | None = None):
    """transformers' CLIPTokenizer on CLIP's BPE (``workdir``: where transformers 4 needs the files)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    try:  # transformers >= 5: the vocabulary and merges in memory
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    except TypeError:  # transformers 4: files
        out = Path(workdir)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizer(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"),
                            model_max_length=max_length)
    if len(tok) != 49408:
        raise RuntimeError(f"CLIP tokenizer built with {len(tok)} tokens instead of 49408")
    return tok


def build_text_encoder(cfg: Config, seed: int) -> nn.Module:
    """A random CLIPTextModel (frozen, as SD's encoder is frozen; the UNet learns to read it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg.pipeline.text_encoder
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                            num_hidden_layers=t.layers, num_attention_heads=t.heads,
                            max_position_embeddings=t.max_length, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae(cfg: Config) -> nn.Module:
    from diffusers import AutoencoderKL

    v = cfg.pipeline.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(v.block_out_channels),
                         layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
                         norm_num_groups=v.norm_num_groups, sample_size=cfg.data.resolution)


def build_cond_unet(cfg: Config, latent_size: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=latent_size, in_channels=cfg.pipeline.vae.latent_channels,
                                out_channels=cfg.pipeline.vae.latent_channels, **cfg.pipeline.unet.kwargs())


def sd_scheduler_config(cfg: Config) -> dict:
    """SD v1.4's scheduler config (PNDM, skip_prk_steps, steps_offset 1) on the profile's noise schedule."""
    s = cfg.schedule
    return {"_class_name": "PNDMScheduler", "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start,
            "beta_end": s.beta_end, "beta_schedule": s.beta_schedule, "prediction_type": s.prediction_type,
            "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


def save_pipeline(path: str | Path, unet: nn.Module, comps: Components, cfg: Config, **meta) -> None:
    """Write a StableDiffusionPipeline folder (safetensors) atomically, plus deme.json in unet/."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from deme.io import atomic_dir, write_json
    from deme.models import META, count_parameters

    sched = PNDMScheduler.from_config({k: v for k, v in comps.scheduler_config.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(Path(tmp) / "unet" / META, {"profile": cfg.profile, "channel_projection": False,
                                               "parameters": count_parameters(unet),
                                               "scaling_factor": comps.scaling_factor, **meta})


def load_components(path: str | Path, device="cpu") -> Components:
    """Tokenizer, text encoder, VAE and scheduler config of a pipeline folder (the pretrain stage's output)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from deme.models import CheckpointError

    path = Path(path)
    missing = [sub for sub in ("tokenizer", "text_encoder", "vae", "scheduler") if not (path / sub).exists()]
    if missing:
        raise CheckpointError(f"{path}: not a text-to-image pipeline folder (missing {', '.join(missing)}); "
                              f"make it with: dvc repro t2i_pretrain")
    try:
        tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
        te = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True).eval().requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable pipeline component ({e})") from None
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return Components(tok, te, vae, sched).to(device)


def fetch_pipeline(cfg: Config):
    """Load the profile's Stable Diffusion pipeline from ``model.local_path`` or the Hugging Face cache,
    offline (real loading path: ``StableDiffusionPipeline.from_pretrained``). A missing one fails at once
    naming the id, the cache looked in and the fetch command."""
    from diffusers import StableDiffusionPipeline

    from deme.models import CheckpointError, hub_cache_dir

    m = cfg.model
    fetch = (f"huggingface-cli download {m.pretrained_id} --local-dir {m.local_path}" if m.local_path
             else f"huggingface-cli download {m.pretrained_id}")
    kw = dict(safety_checker=None, requires_safety_checker=False, use_safetensors=True)  # never unpickle a .bin
    if m.local_path:
        path = Path(m.local_path)
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{m.pretrained_id or 'pipeline'}: no pipeline at model.local_path={path} "
                                  f"(model_index.json missing); on a connected machine run: {fetch}")
        try:
            return StableDiffusionPipeline.from_pretrained(path, **kw), str(path)
        except (OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"{path}: unreadable pipeline, or no .safetensors weights ({reason}); "
                                  f"on a connected machine run: {fetch}") from None
    offline = os.environ.setdefault("HF_HUB_OFFLINE", "1").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return StableDiffusionPipeline.from_pretrained(m.pretrained_id, local_files_only=offline, **kw), \
            f"hf://{m.pretrained_id}"
    except (OSError, EnvironmentError, ValueError) as e:
        raise CheckpointError(
            f"{m.pretrained_id}: not found in the Hugging Face cache {hub_cache_dir()} (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE')}); on a connected machine run: {fetch} "
            f"(and copy the cache, or set model.local_path to the downloaded folder) [{type(e).__name__}]") from None


def check_cond_architecture(unet: nn.Module, cfg: Config) -> None:
    """The checkpoint's UNet must be the one the profile describes (pipeline.unet)."""
    from deme.models import CheckpointError

    have = dict(unet.config)
    bad = []
    for k, v in cfg.pipeline.unet.kwargs().items():
        h = have.get(k)
        h = tuple(h) if isinstance(h, list) else h
        if k == "attention_head_dim" and isinstance(h, tuple):
            h = h[0] if len(set(h)) == 1 else h
        if h != v:
            bad.append(f"{k}: checkpoint {h!r} vs params {v!r}")
    if bad:
        raise CheckpointError(f"{cfg.model.pretrained_id or cfg.model.local_path}: not the UNet of profile "
                              f"{cfg.profile!r} ({'; '.join(bad)}); fix t2i.pipeline.unet or the checkpoint")


# ----------------------------------------------------------------------------------------------------
# Training data: latents + prompt tokens


class LatentStream:
    """Micro-batch m = (latents, token ids) of a seeded shuffle (like deme.train.BatchStream), with caption
    dropout: a dropped sample's tokens become the empty prompt's (the unconditional branch of CFG)."""

    def __init__(self, latents: np.ndarray, tokens: np.ndarray, empty: np.ndarray, batch_size: int, seed: int,
                 caption_dropout: float = 0.0):
        if len(latents) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the dataset size {len(latents)}")
        self.latents, self.tokens, self.empty = latents, tokens, torch.as_tensor(np.asarray(empty, np.int64))
        self.batch_size, self.seed, self.dropout = batch_size, seed, caption_dropout
        self.per_epoch = len(latents) // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(len(self.latents), generator=g)
        idx = np.sort(self._perm[k * self.batch_size:(k + 1) * self.batch_size].numpy())
        x0 = torch.from_numpy(np.asarray(self.latents[idx], np.float32))
        ids = torch.from_numpy(np.asarray(self.tokens[idx], np.int64))
        if self.dropout > 0:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "dropout", m))
            drop = torch.rand(len(idx), generator=g) < self.dropout
            ids[drop] = self.empty
        return x0, ids


def latent_data(paths, dropout: float = 0.0):
    """The latents stage's arrays as a stream factory ``(batch_size, per-process seed) -> LatentStream``
    for :func:`deme.train.train`."""
    lat, tok = paths.latents / "latents.npy", paths.latents / "tokens.npy"
    from deme.models import CheckpointError

    if not lat.exists() or not tok.exists():
        raise CheckpointError(f"{paths.latents}: latents missing; make them with: dvc repro t2i_latents")
    latents, tokens = np.load(lat, mmap_mode="r"), np.load(tok, mmap_mode="r")
    empty = np.load(paths.latents / "empty.npy")
    return lambda batch_size, rank_seed: LatentStream(latents, tokens, empty, batch_size, rank_seed, dropout)


def text_conditioner(comps: Components):
    """token ids (on the training device) -> UNet keyword arguments."""
    return lambda ids: {"encoder_hidden_states": comps.encode_tokens(ids)}


# ----------------------------------------------------------------------------------------------------
# Sampling with classifier-free guidance


def make_sampler(cfg: Config, scheduler_config: dict):
    """``sample.sampler`` (alias or diffusers class) configured from the pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, cfg.sample.scheduler_class)
    return cls.from_config({k: v for k, v in scheduler_config.items() if not k.startswith("_")})


@torch.inference_mode()
def cfg_sample(unet: nn.Module, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, cfg: Config,
               scheduler_config: dict, steps: int | None = None, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Latents from ``noise`` by the profile's sampler with guidance ``pipeline.guidance_scale``:
    eps = eps_u + s (eps_c - eps_u), both branches from one call of ``unet`` (an Ensemble picks its model by
    the step's timestep for the whole stacked batch)."""
    sched = make_sampler(cfg, scheduler_config)
    sched.set_timesteps(steps or cfg.sample.steps, device=noise.device)
    scale = cfg.pipeline.guidance_scale
    guided = scale != 1.0
    x = noise * sched.init_noise_sigma
    kw = {}
    if seeds is not None and "generator" in sched.step.__code__.co_varnames:
        kw["generator"] = [torch.Generator(device=noise.device).manual_seed(int(s) + 1) for s in seeds]
    if "eta" in sched.step.__code__.co_varnames:
        kw["eta"] = cfg.sample.eta
    hidden = torch.cat([uncond.expand_as(cond), cond]) if guided else cond
    for t in sched.timesteps:
        xin = torch.cat([x, x]) if guided else x
        xin = sched.scale_model_input(xin, t)
        eps = unet(xin, t, encoder_hidden_states=hidden).sample
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        x = sched.step(eps, t, x, **kw).prev_sample
    return x


def latent_shape(cfg: Config, comps: Components) -> tuple[int, int, int]:
    factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    return (int(comps.vae.config.latent_channels), cfg.data.resolution // factor, cfg.data.resolution // factor)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> [n, 3, size, size] with PIL bicubic (BK-SDM's 512 -> 256, docs/paper.md §8.3)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    from PIL import Image

    out = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
           for im in images.permute(0, 2, 3, 1).numpy()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def generate_images(unet: nn.Module, comps: Components, prompts: Sequence[str], seeds: Sequence[int], cfg: Config,
                    device: torch.device, steps: int | None = None) -> torch.Tensor:
    """uint8 [n, 3, R, R] images for (prompt, seed) pairs at benchmarks.fid_resolution R."""
    from deme.sample import autocast, initial_noise, to_uint8

    cond = comps.encode(prompts).to(device)
    uncond = comps.encode([""]).to(device)
    noise = initial_noise(seeds, latent_shape(cfg, comps)).to(device)
    with autocast(device, cfg.sample.precision):
        lat = cfg_sample(unet, cond, uncond, noise, cfg, comps.scheduler_config, steps, seeds)
    images = to_uint8(comps.decode(lat)).cpu()
    return resize_uint8(images, cfg.benchmarks.fid_resolution)


def prompt_batches(n: int, cfg: Config):
    from deme.distributed import current, my_batches

    return my_batches(n, cfg.sample.batch_size, current())


def sample_prompts(unet: nn.Module, comps: Components, prompts: Sequence[str], seeds: Sequence[int], cfg: Config,
                   device: torch.device, spaces: dict | None = None, clip=None, keep: int = 0, desc: str = "sampling",
                   steps: int | None = None, shards=None) -> dict:
    """Sample one image per (prompt, seed) and score them while sampling (no files): features in every FID
    space, per-image CLIP scores, the first ``keep`` images. Batches are split over the processes of
    ``accelerate launch`` and gathered in order, so every process gets the same result. ``shards``
    (deme/resume.py): keep every finished batch's scores, and read back those of an earlier, killed run."""
    from tqdm.auto import tqdm

    from deme.distributed import current, gather_batches
    from deme.metrics.fid import batch_features
    from deme.resume import batch_key

    unet.to(device).eval()
    mine = prompt_batches(len(prompts), cfg)
    todo = [r for r in mine if shards is None or not shards.has(batch_key(*r))]
    local = []
    bar = tqdm(total=sum(hi - lo for lo, hi in todo), desc=desc, unit="img", dynamic_ncols=True)
    for lo, hi in mine:
        entry = shards.get(batch_key(lo, hi)) if shards is not None else None
        if shards is not None:
            shards.count(hi - lo, fresh=entry is None)
        if entry is None:
            images = generate_images(unet, comps, prompts[lo:hi], seeds[lo:hi], cfg, device, steps)
            entry = {f"features_{m}": batch_features(images, s) for m, s in (spaces or {}).items()}
            if clip is not None:
                entry["clip"] = clip.score(images, list(prompts[lo:hi]))
            if lo < keep:
                entry["kept"] = images[:keep - lo].numpy()
            if shards is not None:
                shards.put(batch_key(lo, hi), entry)
            bar.update(hi - lo)
        kept = torch.from_numpy(entry["kept"]) if "kept" in entry else None
        local.append(({m: entry[f"features_{m}"] for m in (spaces or {})}, entry.get("clip"), kept))
    bar.close()
    if shards is not None:
        shards.note(len(mine), "batches")
    everything = gather_batches(local, current())
    out = {"features": {m: np.concatenate([f[m] for f, _, _ in everything]) for m in (spaces or {})}}
    out["clip"] = np.concatenate([c for _, c, _ in everything]) if clip is not None else None
    kept = [k for _, _, k in everything if k is not None]
    out["images"] = torch.cat(kept) if kept else None
    return out


BENCH_SEED_BLOCK = 1_000_000  # prompts per benchmark within the evaluation's seed space


def bench_seeds(bench: str, n: int, base: int = 0) -> range:
    """Per-prompt seeds of one benchmark: disjoint blocks of the ``eval`` seed space (so never the merge
    search's), one seed per prompt index, the same for every model."""
    from deme.io import sample_seeds

    k = ("coco", "imagenet", "parti").index(bench)
    if n > BENCH_SEED_BLOCK:
        raise ValueError(f"{bench}: {n} prompts exceed the seed block of a benchmark ({BENCH_SEED_BLOCK})")
    return sample_seeds("eval", (k + 1) * BENCH_SEED_BLOCK, base)[k * BENCH_SEED_BLOCK:k * BENCH_SEED_BLOCK + n]


def load_prompt_set(paths, bench: str) -> dict:
    from deme.models import CheckpointError

    p = paths.prompts(bench)
    if not p.exists():
        raise CheckpointError(f"{p}: prompt set missing; make it with: dvc repro t2i_prepare")
    from deme.io import read_json

    return read_json(p)


def proxy_fid_scorer(cfg: Config, paths, spaces: dict, device, desc: str = "merge candidate"):
    """score(unet): its proxy FID on the first merge.proxy_samples coco_proxy prompts with the evaluation's
    sampler and guidance, against those prompts' own images (stats/<profile>/fid_coco_search_*, left out of the
    evaluation's COCO reference), in the one mode of ``spaces``. The merge's weight search and the single-model
    scale search score their candidates theta + sum_i w_i tau_i with it (docs/paper.md §1.8)."""
    from deme.io import sample_seeds
    from deme.metrics.fid import Stats, fid_of_features

    comps = load_components(paths.pretrained, device)
    prompts = load_prompt_set(paths, "coco_proxy")["prompts"][:cfg.merge.proxy_samples]
    if len(prompts) < cfg.merge.proxy_samples:
        raise ValueError(f"{paths.prompts('coco_proxy')}: {len(prompts)} proxy prompts, merge.proxy_samples is "
                         f"{cfg.merge.proxy_samples}; rerun: dvc repro t2i_prepare")
    seeds = sample_seeds("search", len(prompts), cfg.seed)
    (mode, space), = spaces.items()
    ref = Stats.load(paths.bench_stats("coco_search", mode))

    def score(unet: nn.Module) -> float:
        res = sample_prompts(unet, comps, prompts, seeds, cfg, device, {mode: space}, desc=desc)
        return fid_of_features(res["features"][mode], ref)
    return score


# ----------------------------------------------------------------------------------------------------
# The tiny pipeline's autoencoder


def train_vae(cfg: Config, images: np.ndarray, seed: int, device: torch.device, log=None) -> tuple[nn.Module, dict]:
    """Train the tiny_t2i AutoencoderKL: MSE reconstruction + kl_weight x KL (no perceptual/GAN terms: the
    16x16 shapes need none). Sets ``scaling_factor`` to 1 / std of the latent means on training images, the
    rule that gave SD's 0.18215, so the diffusion model sees unit-variance latents."""
    from tqdm.auto import tqdm

    from deme.train import BatchStream

    v = cfg.pipeline.vae
    torch.manual_seed(derive_seed(seed, "vae-init"))
    vae = build_vae(cfg).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=v.lr, weight_decay=0.0)
    stream = BatchStream(images, v.batch_size, derive_seed(seed, "vae-data"))
    rows = []
    for step in tqdm(range(v.iterations), desc="vae", dynamic_ncols=True):
        x = stream(step).to(device)
        gen = torch.Generator().manual_seed(derive_seed(seed, "vae-step", step))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = post.kl().mean() / np.prod(post.mean.shape[1:])
        loss = mse + v.kl_weight * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"vae: non-finite loss at step {step + 1} (mse={float(mse):.4g}, kl={float(kl):.4g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if log is not None and ((step + 1) % 50 == 0 or step + 1 == v.iterations):
            log({"vae_mse": float(mse), "vae_kl": float(kl)}, step + 1)
        rows.append(mse.item())
    vae.eval().requires_grad_(False)
    with torch.inference_mode():
        probe = torch.from_numpy(np.ascontiguousarray(images[:min(len(images), 2000)]))
        from deme.train import to_model_range

        x = to_model_range(probe).to(device)
        mean = torch.cat([vae.encode(x[i:i + 500]).latent_dist.mean for i in range(0, len(x), 500)])
        recon = torch.cat([vae.decode(mean[i:i + 500]).sample for i in range(0, len(mean), 500)])
        psnr = float(10 * torch.log10(4.0 / torch.nn.functional.mse_loss(recon.clamp(-1, 1), x)))
    factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=factor)
    return vae.cpu(), {"vae_mse": float(np.mean(rows[-20:])), "vae_psnr_db": psnr, "scaling_factor": factor}


@torch.inference_mode()
def encode_dataset(comps: Components, images: np.ndarray, batch_size: int, device: torch.device,
                   out: np.ndarray | None = None, desc: str = "latents") -> np.ndarray:
    """Scaled VAE latents of uint8 [n, H, W, 3] images (a memmap is read batch by batch), float16 unless
    ``out`` (e.g. an np.lib.format.open_memmap) is given."""
    from tqdm.auto import tqdm

    from deme.train import to_model_range

    comps.vae.to(device)
    n = len(images)
    for lo in tqdm(range(0, n, batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch_size]))).to(device)
        z = comps.encode_images(x).cpu().numpy()
        if out is None:
            out = np.empty((n, *z.shape[1:]), np.float16)
        out[lo:lo + len(z)] = z
    return out
