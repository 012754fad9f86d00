"""Profiles as data: one complete preset per setting (in the spirit of NVlabs edm's presets).

``params.yaml`` names a profile and overrides keys of its preset; ``python -m deme.profiles show NAME``
prints a preset as YAML and ``python -m deme.profiles use NAME`` writes it to ``params.yaml``.

- ``tiny``: the embedded default. 16x16 procedurally generated shapes, a UNet2DModel "pretrained" by the
  pipeline itself, a small classifier as FID feature space. Runs the whole paper pipeline on a laptop CPU.
- ``micro``: the same stages at toy size, for the end-to-end test (``dvc repro`` in a temporary repo).
- ``cifar10``, ``church``, ``bedroom``: the paper's DDPM settings (docs/paper.md §1.6, §1.9, §8) on the real
  checkpoints google/ddpm-cifar10-32, google/ddpm-ema-church-256, google/ddpm-ema-bedroom-256 and the real
  datasets, FID-50K with Inception-v3. They run on a user's GPUs; see README "Paper-scale profiles".
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

# Optimiser settings of the official church script (docs/paper.md §1.6), used for every finetuning budget.
_FINETUNE_OPTIM = dict(lr_schedule="constant", lr_warmup=0, betas=[0.95, 0.999], weight_decay=1e-6, eps=1e-8, clip_grad_norm=1.0,
                       ema_max_decay=0.9999, ema_power=0.75, ema_inv_gamma=1.0, precision="fp32")

_TINY = {
    "profile": "tiny",
    "seed": 0,
    "data": {"kind": "shapes", "resolution": 16, "num_train": 10_000, "num_ref": 2_000, "path": "",
             "ref_path": "", "format": "auto", "crop": "random", "on_corrupt": "skip"},
    # The stand-in for google/ddpm-cifar10-32: published in checkpoints/tiny (its MODEL_CARD.md), made by the
    # suite's own pretraining with `pretrain.*` below (`dvc repro checkpoints/dvc.yaml` re-creates it).
    "model": {
        "source": "hub", "pretrained_id": "", "local_path": "checkpoints/tiny/pretrained",
        "unet": {"block_out_channels": [16, 32, 64], "layers_per_block": 1,
                 "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
                 "norm_num_groups": 8, "flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-5,
                 "downsample_padding": 1, "dropout": 0.0},
    },
    "schedule": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                 "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": True},
    # The published pretraining (checkpoints/dvc.yaml): trained to convergence, rsqrt LR decay (EDM2) so one run
    # gives the FID-vs-steps curve, FID of the EMA model on 800 fixed seeds every 1000 steps.
    "pretrain": {"iterations": 16000, "batch_size": 64, "grad_accum": 1, "lr": 1e-3, "lr_schedule": "rsqrt",
                 "lr_warmup": 500, "betas": [0.9, 0.999],
                 "weight_decay": 0.0, "eps": 1e-8, "clip_grad_norm": 1.0, "ema_max_decay": 0.9999,
                 "ema_power": 0.75, "ema_inv_gamma": 1.0, "precision": "fp32", "log_every": 100,
                 "ckpt_every": 500, "eval_every": 1000, "eval_samples": 800},
    "featnet": {"iterations": 800, "batch_size": 128, "lr": 2e-3, "width": 32, "feature_dim": 64},
    # One budget shared by DeMe (per interval) and the plain control (N x iterations), docs/paper.md §1.6.
    "finetune": {"iterations": 100, "batch_size": 64, "grad_accum": 1, "lr": 2e-4, **_FINETUNE_OPTIM,
                 "log_every": 10, "ckpt_every": 100, "eval_every": 0, "eval_samples": 5000},
    "deme": {"intervals": [1, 2, 3, 4], "p": 0.4, "probabilistic_sampling": True, "ps_granularity": "batch",
             "antithetic": True, "consistency_loss": True, "consistency_weight": 1.0,
             "channel_projection": True, "seeds": 3},
    # Baselines finetune on all timesteps for N x finetune.iterations (matched budget, docs/paper.md §2).
    "baselines": {"seeds": 1,
                  "min_snr": {"gamma": 5.0, "normalize": False},
                  "p2": {"k": 1.0, "gamma": 1.0, "normalize": False},
                  "snr_plus_one": {"normalize": False},
                  "trunc_snr": {"normalize": False},
                  "ant_uw": {"num_tasks": 5, "uw_lr": 0.025},
                  "ant_nash": {"num_tasks": 5, "update_every": 25},
                  "difftuning": {"variant": "buffer", "buffer_size": 1000, "buffer_steps": 50, "kd_weight": 0.05},
                  "piecewise": {"normalize": False}},
    "merge": {"search": "coordinate", "coarse": [0.0, 0.5, 1.0], "refine_step": 0.25, "refine_rounds": 1,
              "start": 1.0, "bounds": [0.0, 1.5], "proxy_samples": 192,
              "scale_search": True},
    # DDIM-50 with eta = 0, as in the paper (arXiv 2410.06664, Sec. 4.1).
    "sample": {"sampler": "ddim", "steps": 50, "eta": 0.0, "batch_size": 200, "num_samples": 800,
               "grid_size": 64, "precision": "fp32", "save_images": False},
    "fid": {"feature_net": "featnet", "modes": ["clean"], "reference": "ref", "builtin": "", "reference_samples": 0,
            "inception_weights": "", "batch_size": 500, "bootstrap": 200, "kid_subsets": 100, "kid_subset_size": 1000},
    # One intra-op thread: on CPU the floats of a training step depend on the thread count, so it is a setting
    # (and a param of every computing stage) for bit-identical results on any machine; one thread is also the
    # fastest for these small networks on the 2-core reference machine. GPU profiles leave it to torch (0).
    "runtime": {"device": "auto", "num_threads": 1, "num_processes": 1, "channels_last": False, "compile": False,
                "cpu_kernels": "portable"},
    # The analysis figures of the default models (docs/paper.md §4), sized for minutes on a CPU.
    "analysis": {"samples": 64, "batch_size": 128, "gradsim_timesteps": 100, "sketch_dim": 4096,
                 "landscape_grid": 9, "landscape_span": 1.0, "t_draws": 2, "plane_grid": 9, "plane_margin": 0.2,
                 "plane_pairs": "all", "activation_interval": 0, "floor_intervals": [1, 4], "sequence_samples": 4},
    # Table 3 and Fig. 8 (sweeps/dvc.yaml). Compute-matched: every run trains 4 x finetune.iterations in total.
    "sweep": {"table3_steps": 100, "num_samples": 400, "budget": "total", "iterations": 0,
              "merge": {"search": "coordinate", "coarse": [0.0, 0.5, 1.0], "refine_step": 0.25, "refine_rounds": 0,
                        "start": 1.0, "bounds": [0.0, 1.5], "proxy_samples": 96, "scale_search": False},
              "runs": {}},
}


class _Row(dict):
    """A sweep run: written on one line of params.yaml (flow style)."""


def _runs(table3_n: int, fig8_n: list[int], fig8_p: list[float], n_ref: int = 4) -> dict:
    """Table 3's rows (docs/paper.md §3.3: the paper's five, then A6-A9 of §5 to complete the 2^3 factorial of
    PS x CL x CP at N = table3_n) and Fig. 8's points (§4: N sweep at the default p, p sweep at N = n_ref)."""
    def run(n, ps, cl, cp, p=None, table3=False, fig8=False):
        return _Row(n=n, probabilistic_sampling=ps, consistency_loss=cl, channel_projection=cp, p=p,
                    table3=table3, fig8=fig8)
    runs = {"t3_n1": run(1, False, False, False, table3=True),  # row 1: plain finetuning on all t
            "t3_n1_cp": run(1, False, False, True, table3=True)}
    for ps in (False, True):
        for cl in (False, True):
            for cp in (False, True):
                tag = "_".join(n for n, on in (("ps", ps), ("cl", cl), ("cp", cp)) if on) or "none"
                full = ps and cl and cp
                runs[f"n{table3_n}_{tag}"] = run(table3_n, ps, cl, cp, table3=True, fig8=full and table3_n in fig8_n)
    for n in fig8_n:
        if not (n == table3_n):
            runs[f"n{n}"] = run(n, True, True, True, fig8=True)
    for p in fig8_p:
        name = f"n{n_ref}_p{round(p * 100):03d}"
        runs[name] = run(n_ref, True, True, True, p=p, fig8=True)
    return runs


_TINY["sweep"]["runs"] = _runs(8, [1, 2, 4, 5, 8, 10], [0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0])


def _micro() -> dict:
    p = copy.deepcopy(_TINY)
    p["profile"] = "micro"
    p["runtime"]["cpu_kernels"] = "native"  # the test profile: the fastest kernels; its bits are compared on one machine
    p["data"].update(num_train=512, num_ref=256)
    p["model"]["unet"].update(block_out_channels=[8, 16], down_block_types=["DownBlock2D"] * 2,
                              up_block_types=["UpBlock2D"] * 2, norm_num_groups=4)
    p["model"].update(source="train", local_path="")
    p["pretrain"].update(iterations=40, batch_size=32, lr_schedule="constant", lr_warmup=0, ema_max_decay=0.999,
                         log_every=10, ckpt_every=20, eval_every=0)
    p["featnet"].update(iterations=40, batch_size=64, width=8, feature_dim=16)
    p["finetune"].update(iterations=6, batch_size=16, log_every=2, ckpt_every=3)
    p["deme"].update(intervals=[1, 2], seeds=2)
    p["baselines"]["difftuning"].update(buffer_size=32, buffer_steps=5)
    p["baselines"]["ant_nash"]["update_every"] = 2
    p["merge"].update(coarse=[0.0, 1.0], refine_rounds=0, proxy_samples=32)
    # batches of 16: 4 sample batches, so a 2-process evaluation splits them 2 + 2 (tests/test_pipeline.py)
    p["sample"].update(steps=5, batch_size=16, num_samples=64, grid_size=16)
    p["fid"]["batch_size"] = 16
    p["analysis"].update(samples=16, batch_size=16, gradsim_timesteps=5, sketch_dim=256, landscape_grid=3,
                         t_draws=1, plane_grid=3, floor_intervals=[1], sequence_samples=2)
    p["sweep"].update(table3_steps=6, num_samples=32, runs={k: v for k, v in _runs(2, [2], [0.0]).items()
                                                            if k in ("t3_n1", "n2_ps_cl_cp", "n4_p000")})
    p["sweep"]["runs"]["n2_p000"] = _Row(p["sweep"]["runs"].pop("n4_p000"), n=2)
    p["sweep"]["merge"].update(coarse=[0.0, 1.0], proxy_samples=32)
    return p


# The google/ddpm-* UNet2DModel configs (their config.json on the Hub), docs/paper.md §1.5 and §8.1.
_DDPM_UNET = {"layers_per_block": 2, "norm_num_groups": 32, "flip_sin_to_cos": False, "freq_shift": 1,
              "norm_eps": 1e-6, "downsample_padding": 0, "dropout": 0.0}
_CIFAR10_UNET = {"block_out_channels": [128, 256, 256, 256],
                 "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], **_DDPM_UNET}
_LSUN_UNET = {"block_out_channels": [128, 128, 256, 256, 512, 512],
              "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4, **_DDPM_UNET}


def _ddpm(name: str, kind: str, resolution: int, ckpt: str, unet: dict, data_path: str, p: float,
          micro_batch: int, grad_accum: int, lr: float, sample_batch: int) -> dict:
    """A paper-scale DDPM profile: docs/paper.md §1.6 (finetuning), §1.8 (merge grid), §1.9 and §8.3 (FID-50K)."""
    q = copy.deepcopy(_TINY)
    q["profile"] = name
    q["data"].update(kind=kind, resolution=resolution, num_train=0, num_ref=0, path=data_path)
    q["model"] = {"source": "hub", "pretrained_id": ckpt, "local_path": "", "unet": copy.deepcopy(unet)}
    q["finetune"].update(iterations=20_000, batch_size=micro_batch, grad_accum=grad_accum, lr=lr,
                         precision="fp16", log_every=100, ckpt_every=1000, eval_every=5000, eval_samples=5000)
    q["deme"].update(p=p, seeds=1)  # 3 training seeds of every DeMe model: deme.seeds = 3 (README)
    q["baselines"]["difftuning"].update(buffer_size=5000, buffer_steps=50)
    q["merge"].update(search="grid", coarse=[0.0, 0.25, 0.5, 0.75, 1.0], refine_step=0.1, refine_rounds=1,
                      proxy_samples=5000)
    q["sample"].update(eta=0.0, batch_size=sample_batch, num_samples=50_000, grid_size=64, precision="fp16")
    # 2048-d features: a bootstrap FID costs a 2048 x 2048 matrix square root, so fewer resamples
    q["fid"].update(feature_net="inception", modes=["legacy_pytorch", "clean"], reference="train",
                    reference_samples=50_000, batch_size=250, bootstrap=50)
    q["runtime"].update(channels_last=True, num_threads=0, cpu_kernels="native")
    # docs/paper.md §4 recipes at scale: 512 images with common noise for Fig. 1a (every t), 25x25 landscapes
    q["analysis"].update(samples=512, batch_size=128, gradsim_timesteps=1000, sketch_dim=65536, landscape_grid=25,
                         t_draws=4, plane_grid=31, floor_intervals=[1, 4], sequence_samples=8)
    # Table 3 at N = 8 with 20K iterations per model (the paper's reading), FID-50K; Fig. 8 at DDIM-50
    q["sweep"].update(table3_steps=100, num_samples=50_000, budget="per_model", iterations=0,
                      runs=_runs(8, [1, 2, 4, 5, 8, 10], [0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0]))
    q["sweep"]["merge"].update(coarse=[0.0, 0.25, 0.5, 0.75, 1.0], refine_step=0.1, refine_rounds=1,
                               proxy_samples=5000)
    return q


def _cifar10() -> dict:
    q = _ddpm("cifar10", "cifar10", 32, "google/ddpm-cifar10-32", _CIFAR10_UNET,
              "datasets/cifar10/cifar-10-batches-py", p=0.4, micro_batch=64, grad_accum=1, lr=2e-4,
              sample_batch=1000)
    q["data"]["crop"] = "center"  # 32x32 already: the transform is the identity
    return q


def _church() -> dict:
    return _ddpm("church", "lsun_church", 256, "google/ddpm-ema-church-256", _LSUN_UNET,
                 "datasets/lsun_church_train", p=0.3, micro_batch=16, grad_accum=4, lr=5e-5, sample_batch=128)


def _bedroom() -> dict:
    q = _ddpm("bedroom", "lsun_bedroom", 256, "google/ddpm-ema-bedroom-256", _LSUN_UNET,
              "datasets/lsun_bedroom", p=0.3, micro_batch=16, grad_accum=4, lr=5e-5, sample_batch=128)
    # ~3M training images (590 GB as uint8 256^2): a 300K seeded subset; the FID reference is 50K random
    # training images, as clean-fid has no built-in bedroom statistics (docs/paper.md §8.3)
    q["data"].update(num_train=300_000, num_ref=50_000)
    q["fid"].update(reference="ref", reference_samples=0)
    return q


# ----------------------------------------------------------------------------------------------------
# Text-to-image profiles (the `t2i:` section of params.yaml).

# Stable Diffusion's noise schedule (scaled_linear 0.00085..0.012, T = 1000, epsilon, no clipping).
_SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False}


def _tiny_t2i() -> dict:
    """The embedded text-to-image stand-in for SD v1.4: the captioned shapes at 16x16, a small AutoencoderKL
    (16x16x3 -> 8x8x4 latents) and a random frozen CLIPTextModel with the real CLIP tokenizer, a small
    UNet2DConditionModel pretrained by the pipeline with 10% caption dropout, and a small open_clip model
    trained on the captions for the CLIP score."""
    q = copy.deepcopy(_TINY)
    q.update(profile="tiny_t2i", task="t2i")
    q["model"] = {"source": "train", "pretrained_id": "", "local_path": ""}  # pipeline.unet is the UNet
    q["schedule"] = dict(_SD_SCHEDULE)
    q["pretrain"].update(iterations=800, batch_size=64, lr=1e-3, lr_schedule="constant", lr_warmup=0,
                         ema_max_decay=0.999, log_every=50, eval_every=0, eval_samples=5000)
    q["featnet"].update(iterations=400)
    q["finetune"].update(iterations=25, batch_size=32, log_every=25, ckpt_every=25)
    q["deme"]["p"] = 0.3  # the SD setting (docs/paper.md §1.6)
    q["sweep"]["runs"] = {}  # Table 3 and Fig. 8 are DDPM studies (docs/paper.md §3.3, §3.5)
    q["baselines"]["difftuning"].update(variant="kd")  # no prompt-conditioned retention buffer: §6.3's KD form
    q["merge"].update(proxy_samples=96)
    q["sample"].update(sampler="pndm", steps=20, eta=0.0, batch_size=256, num_samples=256, grid_size=64)
    q["pipeline"] = {
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 1,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                 "attention_head_dim": 8, "norm_num_groups": 8},
        "vae": {"block_out_channels": [16, 32], "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
                "iterations": 300, "batch_size": 64, "lr": 2e-3, "kl_weight": 1e-6},
        "text_encoder": {"hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64, "max_length": 16},
        "guidance_scale": 3.0, "caption_dropout": 0.0, "pretrain_caption_dropout": 0.1,
    }
    q["clip"] = {"model": "deme-tiny-clip", "pretrained": "", "local_path": "", "cache_dir": "", "batch_size": 256,
                 "train": True, "embed_dim": 64, "width": 64, "layers": 2, "heads": 2, "patch_size": 4,
                 "context_length": 16, "iterations": 200, "train_batch_size": 128, "lr": 1e-3}
    # stand-ins: COCO = held-out captions (FID vs the held-out images), ImageNet = shape x colour class names in
    # a fixed template (FID vs the held-out images), PartiPrompts = compositional rephrasings (CLIP only)
    q["benchmarks"] = {"coco_prompts": "", "coco_images": "", "coco_count": 160, "coco_proxy_prompts": "",
                       "coco_proxy_count": 96,
                       "imagenet_classes": "",
                       "imagenet_template": "a {} on a black background", "imagenet_per_class": 2,
                       "imagenet_images": "", "parti_prompts": "", "parti_count": 48, "fid_resolution": 16,
                       "reference_samples": 0, "grid_prompts": 8}
    return q


def _micro_t2i() -> dict:
    q = _tiny_t2i()
    q["profile"] = "micro_t2i"
    q["runtime"]["cpu_kernels"] = "native"
    q["deme"]["seeds"] = 1
    q["data"].update(num_train=512, num_ref=256)
    q["pretrain"].update(iterations=30, batch_size=32, log_every=10, ckpt_every=15)
    q["featnet"].update(iterations=40, batch_size=64, width=8, feature_dim=16)
    q["finetune"].update(iterations=4, batch_size=16, log_every=2, ckpt_every=2)
    q["deme"]["intervals"] = [1, 2]
    q["baselines"]["ant_nash"]["update_every"] = 2
    q["merge"].update(coarse=[0.0, 1.0], refine_rounds=0, proxy_samples=16)
    q["sample"].update(steps=4, batch_size=64, num_samples=32, grid_size=16)
    q["pipeline"]["unet"].update(block_out_channels=[16, 32], attention_head_dim=4, cross_attention_dim=16)
    q["pipeline"]["vae"].update(block_out_channels=[8, 16], iterations=20, batch_size=32)
    q["pipeline"]["text_encoder"].update(hidden_size=16, intermediate_size=32)
    q["clip"].update(embed_dim=16, width=16, layers=1, iterations=30, train_batch_size=64, batch_size=64)
    q["benchmarks"].update(coco_count=32, coco_proxy_count=16, imagenet_per_class=1, parti_count=16, grid_prompts=4)
    q["analysis"] = copy.deepcopy(_micro()["analysis"])
    return q


# The UNet2DConditionModel of CompVis/stable-diffusion-v1-4 (its unet/config.json), docs/paper.md §8.1.
_SD14_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
              "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
              "attention_head_dim": 8, "norm_num_groups": 32}


def _sd14() -> dict:
    """SD v1.4 finetuned on LAION-Aesthetics V2 6.5+ (docs/paper.md §1.6 SD column, §3.2): N=4, p=0.3, 20K x 4
    iterations at 16 x 4, lr 5e-5, fp16, EMA; PNDM-50, CFG 7.5, 512x512 (latent 64); COCO-30K FID at 256 plus
    CLIP ViT-g-14, ImageNet 2 x 1000 classes, PartiPrompts 1,632."""
    q = _tiny_t2i()
    q["profile"] = "sd14"
    q["deme"]["seeds"] = 1  # 3 training seeds of every DeMe model: deme.seeds = 3 (README)
    q["data"].update(kind="laion", resolution=512, num_train=0, num_ref=1000, path="datasets/laion_aes_6.5plus",
                     crop="center")
    q["model"] = {"source": "hub", "pretrained_id": "CompVis/stable-diffusion-v1-4", "local_path": ""}
    q["finetune"].update(iterations=20_000, batch_size=16, grad_accum=4, lr=5e-5, precision="fp16",
                         log_every=100, ckpt_every=1000, eval_every=0, eval_samples=5000)
    q["baselines"]["difftuning"].update(variant="kd")
    q["merge"].update(search="grid", coarse=[0.0, 0.25, 0.5, 0.75, 1.0], refine_step=0.1, refine_rounds=1,
                      proxy_samples=5000)  # FID-5K on COCO prompts disjoint from the 30K (Appendix A)
    q["sample"].update(sampler="pndm", steps=50, eta=0.0, batch_size=32, num_samples=5000, grid_size=16,
                       precision="fp16")
    q["fid"].update(feature_net="inception", modes=["legacy_pytorch", "clean"], reference="ref",
                    reference_samples=0, batch_size=250, bootstrap=50)
    q["runtime"].update(channels_last=True, num_threads=0, cpu_kernels="native")
    # the VAE entry documents SD's AutoencoderKL (downsampling 8: 512 -> 64x64x4 latents); it is imported, not trained
    q["pipeline"]["vae"].update(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
    q["pipeline"]["text_encoder"].update(hidden_size=768, layers=12, heads=12, intermediate_size=3072, max_length=77)
    q["pipeline"].update(unet=copy.deepcopy(_SD14_UNET), guidance_scale=7.5,
                    caption_dropout=0.0, pretrain_caption_dropout=0.0)
    q["clip"] = {"model": "ViT-g-14", "pretrained": "laion2b_s34b_b88k", "local_path": "", "cache_dir": "",
                 "batch_size": 64, "train": False, "embed_dim": 64, "width": 64, "layers": 2, "heads": 2,
                 "patch_size": 4, "context_length": 16, "iterations": 600, "train_batch_size": 128, "lr": 1e-3}
    q["benchmarks"] = {"coco_prompts": "datasets/coco/mscoco_val2014_30k/metadata.csv",
                       "coco_images": "datasets/coco/val2014", "coco_count": 30_000,
                       "coco_proxy_prompts": "datasets/coco/proxy_5k/metadata.csv", "coco_proxy_count": 5000,
                       "imagenet_classes": "datasets/imagenet/classnames.txt",
                       "imagenet_template": "a photo of a {}", "imagenet_per_class": 2,
                       "imagenet_images": "datasets/imagenet/val", "parti_prompts": "datasets/parti/PartiPrompts.tsv",
                       "parti_count": 0, "fid_resolution": 256, "reference_samples": 0, "grid_prompts": 8}
    return q


PROFILES: dict[str, dict] = {"tiny": _TINY, "micro": _micro(), "cifar10": _cifar10(), "church": _church(),
                             "bedroom": _bedroom(), "tiny_t2i": _tiny_t2i(), "micro_t2i": _micro_t2i(),
                             "sd14": _sd14()}
PAPER_SCALE = ("cifar10", "church", "bedroom")  # DDPM; the text-to-image one is sd14


def preset(name: str) -> dict:
    """A deep copy of a profile's complete preset."""
    return copy.deepcopy(PROFILES[name])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deme.profiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the profiles")
    s = sub.add_parser("show", help="print a profile's preset as YAML")
    s.add_argument("name", choices=sorted(PROFILES))
    u = sub.add_parser("use", help="write a profile's preset to params.yaml (the old file is kept as .bak); a "
                                   "text-to-image profile goes to its `t2i:` section, the rest is kept")
    u.add_argument("name", choices=sorted(PROFILES))
    u.add_argument("--params", default=None, help="default: params.yaml at the repository root (where dvc.yaml is)")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(PROFILES))
    elif args.cmd == "show":
        print(dump_yaml(preset(args.name)), end="")
    else:
        from deme.io import atomic_write_text, repo_root

        path = Path(args.params) if args.params else repo_root() / "params.yaml"
        old = yaml.safe_load(path.read_text()) if path.exists() else None
        old = old if isinstance(old, dict) else {}
        if path.exists():
            path.with_suffix(path.suffix + ".bak").write_text(path.read_text())
        new = preset(args.name)
        if new.get("task") == "t2i":  # the text-to-image pipeline's section; the image pipeline stays
            doc = {k: v for k, v in old.items() if k != "t2i"} or preset("tiny")
            doc["t2i"] = new
        else:
            doc = {**new, "t2i": old.get("t2i") or preset("tiny_t2i")}
        atomic_write_text(path, dump_yaml(doc))
        print(f"wrote {path} for profile {args.name!r}" + (" (section t2i)" if new.get("task") == "t2i" else ""))
    return 0


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for lists of scalars (``betas: [0.95, 0.999]``)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_Row, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))


def _rows(doc):
    """``doc`` with every sweep run (``sweep.runs.*``, also under ``t2i:``) as a :class:`_Row`, so a file read
    back with plain dicts is written as the presets are."""
    if not isinstance(doc, dict):
        return doc
    out = {k: _rows(v) if k == "t2i" else v for k, v in doc.items()}
    runs = (out.get("sweep") or {}).get("runs") if isinstance(out.get("sweep"), dict) else None
    if isinstance(runs, dict):
        out["sweep"] = {**out["sweep"], "runs": {k: _Row(v) if isinstance(v, dict) else v for k, v in runs.items()}}
    return out


def dump_yaml(data: dict) -> str:
    return yaml.dump(_rows(data), Dumper=_Dumper, sort_keys=False, width=160)


if __name__ == "__main__":
    sys.exit(main())
