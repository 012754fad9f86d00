"""Benchmark: Stable Diffusion v1.4 throughput of the suite's text-to-image path, one table, one run.

The ``sd14`` profile's architecture with random weights (no checkpoint, no dataset: random latents and
random token ids), measured in this one process:

1. Training images/s of ``deme.train.train`` (the suite's loop: accelerate, AdamW, clipping, EMA) on
   latents 4 x 64 x 64 with the prompt through a CLIPTextModel of SD's size (frozen), micro-batch 16,
   ``--precision`` (bf16 default), for the plain objective and for the DeMe objective of interval 1
   (probabilistic sampling, consistency loss against a frozen teacher UNet under the same prompt,
   channel-wise projections). Timed as the difference of two whole ``train()`` calls (``--warmup`` and
   ``--warmup + --steps`` iterations), so set-up is excluded, after one untimed priming call of one iteration
   per objective (lazy CUDA/cuBLAS initialisation and first-use kernel selection go there; without it the
   first timed call paid them and the difference came out negative on the H200). The DeMe-step overhead is
   plain / DeMe img/s.
2. Text-to-image sampling images/s: ``deme.text2image.generate_images`` (CFG 7.5 with one UNet call on the
   stacked [uncond; cond] batch per step, PNDM-50, fp16/bf16 autocast, VAE decode, 512 -> 256 resize), at
   ``--sample-batch``.
3. The projected wall time of the COCO-30K generation (30,000 / sampling rate); FID and CLIP feature
   extraction are not included (Inception-v3 at 256 and ViT-g-14 add to it; see bench/gpu_throughput.py
   for the Inception rate).

On the lent GPU, from the repository root:

    python bench/sd_throughput.py --out bench/sd_throughput.json

A CPU smoke test of the same code on the tiny_t2i architecture (numbers are not a verdict):

    python bench/sd_throughput.py --profile tiny_t2i --steps 2 --warmup 1 --sample-batch 4 --sample-steps 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def components(cfg, device):
    from deme.text2image import Components, build_text_encoder, build_tokenizer, build_vae, sd_scheduler_config

    tok = build_tokenizer(cfg.pipeline.text_encoder.max_length)
    vae = build_vae(cfg).eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=0.18215)
    return Components(tok, build_text_encoder(cfg, 0), vae, sd_scheduler_config(cfg)).to(device)


def train_rate(cfg, comps, device, deme: bool, steps: int, warmup: int, batch: int, precision: str) -> float:
    import numpy as np
    import torch

    from deme.objectives import EpsObjective
    from deme.projection import add_channel_projection
    from deme.schedule import alphas_cumprod
    from deme.text2image import LatentStream, build_cond_unet, latent_shape, text_conditioner
    from deme.train import train

    shape = latent_shape(cfg, comps)
    n = batch * (warmup + steps + 2)
    latents = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float16)
    tokens = np.random.default_rng(1).integers(0, 49406, size=(n, comps.max_length)).astype(np.int32)
    empty = comps.tokens([""])[0].numpy()
    stream = lambda bs, s: LatentStream(latents, tokens, empty, bs, s)  # noqa: E731
    ab = alphas_cumprod(cfg.schedule).float()
    walls = []
    for iters in (1, warmup, warmup + steps):  # the first call primes one-time costs and is not timed
        torch.manual_seed(0)
        unet = build_cond_unet(cfg, shape[-1])
        teacher = None
        if deme:
            teacher = build_cond_unet(cfg, shape[-1]).to(device).eval().requires_grad_(False)
            add_channel_projection(unet)
        obj = EpsObjective(ab, 0, 250, p=cfg.deme.p if deme else 0.0, teacher=teacher) if deme else EpsObjective(ab, 0, 1000)
        tc = dataclasses.replace(cfg.finetune, iterations=iters, batch_size=batch, grad_accum=1, precision=precision,
                                 ckpt_every=0, log_every=10**9)
        sync(device)
        t0 = time.perf_counter()
        train(unet, obj, stream, tc, seed=0, device=device, condition=text_conditioner(comps),
              channels_last=cfg.runtime.channels_last)
        sync(device)
        walls.append(time.perf_counter() - t0)
        del unet, teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = walls[2] - walls[1]
    return steps * batch / seconds if seconds > 0 else float("nan")


def sample_rate(cfg, comps, device, batch: int, steps: int, precision: str) -> float:
    import torch

    from deme.text2image import build_cond_unet, generate_images, latent_shape

    torch.manual_seed(0)
    unet = build_cond_unet(cfg, latent_shape(cfg, comps)[-1]).to(device).eval()
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, precision=precision, steps=steps))
    prompts = [f"a photo of a red cube number {i}" for i in range(batch)]
    generate_images(unet, comps, prompts, list(range(batch)), cfg, device, steps=2)  # warm-up, same batch
    sync(device)
    t0 = time.perf_counter()
    generate_images(unet, comps, prompts, list(range(batch)), cfg, device)
    sync(device)
    return batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import torch

    from deme.config import config_from_mapping

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="sd14", help="text-to-image profile whose architecture is measured")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--batch", type=int, default=16, help="training micro-batch (latents)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--out", help="also write the table as JSON")
    args = ap.parse_args(argv)
    cfg = config_from_mapping({"t2i": {"profile": args.profile}}, "t2i")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    comps = components(cfg, device)
    plain = train_rate(cfg, comps, device, False, args.steps, args.warmup, args.batch, args.precision)
    deme = train_rate(cfg, comps, device, True, args.steps, args.warmup, args.batch, args.precision)
    sample = sample_rate(cfg, comps, device, args.sample_batch, args.sample_steps,
                         "fp16" if device.type == "cuda" else "fp32")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    res = {"device": gpu, "profile": args.profile, "precision": args.precision, "batch": args.batch,
           "train_img_s_plain": plain, "train_img_s_deme": deme, "deme_step_overhead": plain / deme,
           "sample_img_s": sample, "sampler": f"{cfg.sample.scheduler_class}-{args.sample_steps}",
           "guidance_scale": cfg.pipeline.guidance_scale, "coco30k_generation_min": 30_000 / sample / 60}
    from deme.text2image import latent_shape

    print(f"\n{args.profile} on {gpu} ({args.precision}, micro-batch {args.batch}, latents "
          f"{'x'.join(map(str, latent_shape(cfg, comps)))}):")
    print("| quantity | value |\n|---|---|")
    print(f"| training img/s, plain objective | {plain:.2f} |")
    print(f"| training img/s, DeMe objective (PS + consistency + projection) | {deme:.2f} |")
    print(f"| DeMe-step overhead (plain / DeMe) | {plain / deme:.2f}x |")
    print(f"| sampling img/s ({res['sampler']}, CFG {res['guidance_scale']}, batch {args.sample_batch}) | {sample:.2f} |")
    print(f"| projected COCO-30K generation | {res['coco30k_generation_min']:.1f} min |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
