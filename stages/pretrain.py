"""Stage `pretrain`: the pretrained model theta, written to models/<profile>/pretrained.

Hub profiles (cifar10, church, bedroom; model.source: hub) import the checkpoint (model.pretrained_id from the
Hugging Face cache with HF_HUB_OFFLINE=1, or model.local_path), check that it is the profile's UNet
(model.unet, data.resolution) and save it as safetensors, so DVC pins the exact weights every later stage
uses. A missing checkpoint stops at once with the command that fetches it.

Tiny profiles (model.source: train) train the stand-in for google/ddpm-cifar10-32 from scratch: a diffusers UNet2DModel, DDPM with T=1000 linear betas 1e-4..0.02, epsilon prediction, EMA; saved with
save_pretrained so the rest of the pipeline loads it exactly as it loads the real checkpoints. It is
deliberately short-trained: good but clearly imperfect, so finetuning has room to help.
Resumable: rerun after a crash and it continues from the last checkpoint in .ckpt/.

Text-to-image (`--t2i`): the output is a StableDiffusionPipeline folder (unet, vae, text_encoder,
tokenizer, scheduler). sd14 imports CompVis/stable-diffusion-v1-4 (cache or model.local_path, offline) and
checks its UNet against t2i.unet. tiny_t2i builds the stand-in: the real CLIP BPE tokenizer (from the
vocabulary open_clip ships), a random frozen CLIPTextModel, an AutoencoderKL trained here (pipeline.vae, latent
scaling factor measured as 1/std), and a UNet2DConditionModel pretrained on the latents with
pipeline.pretrain_caption_dropout of empty prompts so that classifier-free guidance has an unconditional branch.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def import_checkpoint(ctx):
    """model.source: hub -> models/<profile>/pretrained (safetensors), after checking the architecture."""
    from deme.io import atomic_write_text, write_json
    from deme.models import check_architecture, count_parameters, fetch_checkpoint, save_model
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    model, source = fetch_checkpoint(cfg)
    check_architecture(model, cfg)
    n = count_parameters(model)
    save_model(model, paths.pretrained, cfg, method="import", source=source, pretrained_id=cfg.model.pretrained_id)
    write_json(paths.metrics("train", "pretrain"), {"source": source, "parameters": n, "iterations": 0})
    atomic_write_text(paths.curve("pretrain"), "step,loss\n")  # no pretraining curve for an imported model
    ctx.note(f"imported {source}: UNet2DModel with {n:,} parameters ({n / 1e6:.2f}M)")
    ctx.run.log_metrics({"parameters": n})
    ctx.wrote(paths.pretrained)
    ctx.wrote(paths.metrics("train", "pretrain"))


def import_pipeline(ctx):
    """sd14: the Stable Diffusion pipeline -> models/<profile>/pretrained (safetensors)."""
    from deme.io import atomic_write_text, write_json
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.text2image import Components, check_cond_architecture, fetch_pipeline, save_pipeline

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    pipe, source = fetch_pipeline(cfg)
    check_cond_architecture(pipe.unet, cfg)
    comps = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, dict(pipe.scheduler.config))
    n = count_parameters(pipe.unet)
    save_pipeline(paths.pretrained, pipe.unet, comps, cfg, method="import", source=source,
                  pretrained_id=cfg.model.pretrained_id)
    write_json(paths.metrics("train", "pretrain"), {"source": source, "parameters": n, "iterations": 0,
                                                    "scaling_factor": comps.scaling_factor})
    atomic_write_text(paths.curve("pretrain"), "step,loss\n")
    atomic_write_text(paths.curve("vae"), "step,vae_mse,vae_kl\n")  # nor a VAE curve
    ctx.note(f"imported {source}: UNet2DConditionModel with {n:,} parameters ({n / 1e6:.1f}M)")
    ctx.run.log_metrics({"parameters": n})
    ctx.wrote(paths.pretrained)
    ctx.wrote(paths.metrics("train", "pretrain"))


def pretrain_t2i(ctx):
    """tiny_t2i: tokenizer + frozen random text encoder + trained VAE + pretrained conditional UNet."""
    import json
    import tempfile
    import time

    import torch

    from deme.data import load_set
    from deme.io import derive_seed, write_json
    from deme.models import count_parameters
    from deme.objectives import EpsObjective
    from deme.paths import Paths
    from deme.resume import content_id, state_digest
    from deme.schedule import alphas_cumprod
    from deme.text2image import (Components, LatentStream, build_cond_unet, build_text_encoder, build_tokenizer,
                                 encode_dataset, latent_shape, save_pipeline, sd_scheduler_config,
                                 text_conditioner, train_vae)
    from deme.tracking import CurveLog
    from deme.train import clear_checkpoint, train

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    if cfg.model.source == "hub":
        return import_pipeline(ctx)
    data = load_set(paths.train)
    images, captions = data["images"], [str(c) for c in data["captions"]]
    seed = derive_seed(cfg.seed, "pretrain")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(cfg.pipeline.text_encoder.max_length, tmp)
    text_encoder = build_text_encoder(cfg, derive_seed(seed, "text_encoder"))
    curve, vae_curve = CurveLog(ctx.run), CurveLog(ctx.run)  # one file per training run: each starts at step 1
    t0 = time.perf_counter()
    vae, vae_stats = train_vae(cfg, images, seed, ctx.device, log=vae_curve)
    comps = Components(tokenizer, text_encoder, vae, sd_scheduler_config(cfg)).to(ctx.device)
    ctx.note(f"VAE: reconstruction PSNR {vae_stats['vae_psnr_db']:.1f} dB, latent scaling factor "
             f"{vae_stats['scaling_factor']:.4f}")
    latents = encode_dataset(comps, images, 500, ctx.device)
    tokens = comps.tokens(captions).numpy()
    empty = comps.tokens([""])[0].numpy()
    drop = cfg.pipeline.pretrain_caption_dropout
    stream = lambda bs, s: LatentStream(latents, tokens, empty, bs, s, drop)  # noqa: E731
    torch.manual_seed(seed)
    unet = build_cond_unet(cfg, latent_shape(cfg, comps)[-1])
    ctx.note(f"UNet2DConditionModel with {count_parameters(unet):,} parameters, latents {latent_shape(cfg, comps)}")
    objective = EpsObjective(alphas_cumprod(cfg.schedule).float(), 0, cfg.schedule.num_train_timesteps)
    ckpt, settings = paths.ckpt("pretrain"), cfg.to_dict()
    unet = train(unet, objective, stream, cfg.pretrain, seed=seed, device=ctx.device, ckpt_dir=ckpt,
                 fingerprint=json.dumps([settings[k] for k in ("pretrain", "pipeline", "model", "schedule")] +
                                        [seed, state_digest(vae), content_id(paths.train)]),
                 log=curve, desc="pretrain", condition=text_conditioner(comps))
    wall = time.perf_counter() - t0
    save_pipeline(paths.pretrained, unet.cpu(), comps.to("cpu"), cfg, method="pretrain", seed=seed,
                  steps=cfg.pretrain.iterations)
    curve.save(paths.curve("pretrain"))
    vae_curve.save(paths.curve("vae"))
    last = next(r["loss"] for r in reversed(curve.rows) if "loss" in r)
    write_json(paths.metrics("train", "pretrain"), {"loss": last, "iterations": cfg.pretrain.iterations,
                                                    "parameters": count_parameters(unet), **vae_stats})
    ctx.run.log_metrics({"wall_s": wall})
    clear_checkpoint(ckpt)
    for p in (paths.pretrained, paths.curve("pretrain"), paths.curve("vae"), paths.metrics("train", "pretrain")):
        ctx.wrote(p)


def fid_scorer(cfg, device, num_samples: int):
    """(EMA model, step) -> {"fid": ...}: FID of `num_samples` samples with the profile's sampler, from the same
    "curve" seeds at every step (common random numbers: the curve's steps differ by the model only)."""
    from deme.evaluation import feature_spaces, fid_of_model, load_references
    from deme.io import sample_seeds

    spaces = feature_spaces(cfg, device, headline=True)
    refs = load_references(cfg, spaces)
    seeds = sample_seeds("curve", num_samples, cfg.seed)
    return lambda model, step: {"fid": fid_of_model(model, seeds, cfg, spaces, refs, device, f"FID @{step}")}


def body(ctx):
    import json
    import time

    import torch

    from deme.data import load_images
    from deme.io import derive_seed, read_json, write_json
    from deme.models import build_unet, count_parameters, save_model
    from deme.objectives import EpsObjective
    from deme.paths import Paths
    from deme.resume import content_id
    from deme.schedule import alphas_cumprod
    from deme.tracking import CurveLog
    from deme.train import clear_checkpoint, train

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    scratch = getattr(ctx.args, "from_scratch", False)
    if cfg.task == "t2i":
        return pretrain_t2i(ctx)
    if cfg.model.source == "hub" and not scratch:
        return import_checkpoint(ctx)
    label = "pretrain-from-scratch" if scratch else "pretrain"
    out, curve_csv, metrics_json = ((paths.from_scratch / "model", paths.from_scratch / "curve.csv",
                                     paths.from_scratch / "metrics.json") if scratch else
                                    (paths.pretrained, paths.curve("pretrain"), paths.metrics("train", "pretrain")))
    images = load_images(paths.train)
    seed = derive_seed(cfg.seed, "pretrain")
    torch.manual_seed(seed)
    model = build_unet(cfg)
    ctx.note(f"UNet2DModel with {count_parameters(model):,} parameters")
    objective = EpsObjective(alphas_cumprod(cfg.schedule).float(), 0, cfg.schedule.num_train_timesteps)
    curve, ckpt = CurveLog(ctx.run), paths.ckpt(label)
    evaluate = fid_scorer(cfg, ctx.device, cfg.pretrain.eval_samples) if cfg.pretrain.eval_every else None
    settings = cfg.to_dict()
    run = dict(settings["pretrain"])
    if cfg.pretrain.lr_schedule != "cosine":  # the trajectory does not depend on the length: a longer run continues
        run.pop("iterations")
    state = ckpt / "state.json"
    start = json.loads(state.read_text()).get("step", 0) if state.is_file() else 0
    t0 = time.perf_counter()
    model = train(model, objective, images, cfg.pretrain, seed=seed, device=ctx.device, ckpt_dir=ckpt,
                  fingerprint=json.dumps([run, settings["model"]["unet"], settings["schedule"],
                                          settings["sample"] if evaluate else None, seed, content_id(paths.train)]),
                  log=curve, desc=label, evaluate=evaluate, keep_final=scratch)
    wall = time.perf_counter() - t0
    save_model(model, out, cfg, method="pretrain", seed=seed, steps=cfg.pretrain.iterations)
    curve.save(curve_csv)
    last = next(r["loss"] for r in reversed(curve.rows) if "loss" in r)
    fid_curve = [[r["step"], r["fid"]] for r in curve.rows if "fid" in r]
    write_json(metrics_json, {"loss": last, "iterations": cfg.pretrain.iterations,
                              "parameters": count_parameters(model), **({"fid_curve": fid_curve} if fid_curve else {})})
    ctx.run.log_metrics({"wall_s": wall})
    if scratch:  # wall time per run segment (a clock reading: beside the outputs, not one of them)
        timing = paths.from_scratch / "timing.json"
        segments = [s for s in (read_json(timing) if timing.is_file() else []) if s["to_step"] <= start]
        write_json(timing, segments + [{"from_step": start, "to_step": cfg.pretrain.iterations, "wall_s": wall,
                                        "threads": torch.get_num_threads()}])
    if not scratch:  # a from-scratch run keeps its last state in .ckpt/, so a longer run continues from it
        clear_checkpoint(ckpt)
    for p in (out, curve_csv, metrics_json):
        ctx.wrote(p)


def add_args(ap):
    ap.add_argument("--from-scratch", action="store_true",
                    help="train the profile's UNet from scratch with `pretrain.*` even where the profile imports a "
                         "published checkpoint (checkpoints/dvc.yaml: how the published checkpoint was made)")


if __name__ == "__main__":
    sys.exit(run_stage("pretrain", __doc__, body, add_args=add_args,
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "model", "schedule", "pretrain")
                                            + (("pipeline",) if c.task == "t2i" else ())}))
