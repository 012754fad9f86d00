"""Stage `pretrain` (tiny profiles): train the stand-in for google/ddpm-cifar10-32 from scratch.

A diffusers UNet2DModel, DDPM with T=1000 linear betas 1e-4..0.02, epsilon prediction, EMA; saved with
save_pretrained so the rest of the pipeline loads it exactly as it loads the real checkpoints. It is
deliberately short-trained: good but clearly imperfect, so finetuning has room to help.
Resumable: rerun after a crash and it continues from the last checkpoint in .ckpt/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402


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
    if cfg.model.source != "train":
        raise StageError(f"profile {cfg.profile!r} loads {cfg.model.pretrained_id or cfg.model.local_path}; "
                         "the pretrain stage only trains tiny profiles (model.source: train)")
    images = torch.as_tensor(load_images(paths.train))
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
