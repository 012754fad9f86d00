"""Stage `pretrain`: the pretrained model theta, written to models/<profile>/pretrained.

Hub profiles (cifar10, church, bedroom; model.source: hub) import the checkpoint (model.pretrained_id from the
Hugging Face cache with HF_HUB_OFFLINE=1, or model.local_path), check that it is the profile's UNet
(model.unet, data.resolution) and save it as safetensors, so DVC pins the exact weights every later stage
uses. A missing checkpoint stops at once with the command that fetches it.

Tiny profiles (model.source: train) train the stand-in for google/ddpm-cifar10-32 from scratch: a diffusers UNet2DModel, DDPM with T=1000 linear betas 1e-4..0.02, epsilon prediction, EMA; saved with
save_pretrained so the rest of the pipeline loads it exactly as it loads the real checkpoints. It is
deliberately short-trained: good but clearly imperfect, so finetuning has room to help.
Resumable: rerun after a crash and it continues from the last checkpoint in .ckpt/.
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


def body(ctx):
    import json
    import time

    import torch

    from deme.data import load_images
    from deme.io import derive_seed, write_json
    from deme.models import build_unet, count_parameters, save_model
    from deme.objectives import EpsObjective
    from deme.paths import Paths
    from deme.schedule import alphas_cumprod
    from deme.tracking import CurveLog
    from deme.train import clear_checkpoint, train

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    if cfg.model.source == "hub":
        return import_checkpoint(ctx)
    images = load_images(paths.train)
    seed = derive_seed(cfg.seed, "pretrain")
    torch.manual_seed(seed)
    model = build_unet(cfg)
    ctx.note(f"UNet2DModel with {count_parameters(model):,} parameters")
    objective = EpsObjective(alphas_cumprod(cfg.schedule).float(), 0, cfg.schedule.num_train_timesteps)
    curve, ckpt = CurveLog(ctx.run), paths.ckpt("pretrain")
    t0 = time.perf_counter()
    model = train(model, objective, images, cfg.pretrain, seed=seed, device=ctx.device, ckpt_dir=ckpt,
                  fingerprint=json.dumps([cfg.to_dict()["pretrain"], cfg.to_dict()["model"], seed]),
                  log=curve, desc="pretrain")
    wall = time.perf_counter() - t0
    save_model(model, paths.pretrained, cfg, method="pretrain", seed=seed, steps=cfg.pretrain.iterations)
    curve.save(paths.curve("pretrain"))
    write_json(paths.metrics("train", "pretrain"), {"loss": curve.rows[-1]["loss"], "wall_s": wall,
                                                    "iterations": cfg.pretrain.iterations,
                                                    "parameters": count_parameters(model)})
    clear_checkpoint(ckpt)
    for p in (paths.pretrained, paths.curve("pretrain"), paths.metrics("train", "pretrain")):
        ctx.wrote(p)


if __name__ == "__main__":
    sys.exit(run_stage("pretrain", __doc__, body,
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "model", "schedule", "pretrain")}))
