"""Stage `finetune`: DeMe interval finetuning (`--interval i`) or the plain-finetuning control (`--plain`).

DeMe (PAPER.md §1.2-1.6): model i starts from the pretrained weights (+ identity channel-wise projections)
and trains on its interval I_i = [(i-1)T/N, iT/N) with probabilistic timestep sampling (p = probability of
a global draw) and the consistency loss towards the frozen pretrained model; each technique has a switch
in params `deme`. The plain control finetunes the pretrained model on all timesteps for N x the
per-interval iterations, with the same optimiser, EMA and data: the honest "trained longer" baseline.
Resumable from .ckpt/ after a crash.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402


def add_args(ap):
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--interval", type=int, help="DeMe interval index i in 1..N")
    g.add_argument("--plain", action="store_true", help="plain finetuning on all timesteps (N x iterations)")


def item(args):
    return "plain" if args.plain else f"interval-{args.interval}"


def body(ctx):
    import dataclasses
    import json
    import time

    import torch

    from deme.data import load_images
    from deme.io import derive_seed, write_json
    from deme.models import count_parameters, frozen_teacher, load_pretrained, save_model
    from deme.objectives import EpsObjective
    from deme.paths import Paths
    from deme.projection import add_channel_projection
    from deme.schedule import alphas_cumprod, interval_bounds
    from deme.tracking import CurveLog
    from deme.train import clear_checkpoint, train

    cfg, args, paths = ctx.cfg, ctx.args, Paths(ctx.cfg.profile)
    d, T = cfg.deme, cfg.schedule.num_train_timesteps
    ab = alphas_cumprod(cfg.schedule).float()
    model = load_pretrained(cfg)
    if args.plain:
        name, out = "plain", paths.plain
        budget = dataclasses.replace(cfg.finetune, iterations=cfg.finetune.iterations * d.n)
        objective = EpsObjective(ab, 0, T, p=0.0, antithetic=d.antithetic)
        meta = {"method": "plain", "interval": None}
    else:
        i = args.interval
        if i not in d.intervals:
            raise StageError(f"--interval {i} is not in deme.intervals {d.intervals}")
        name, out, budget = f"interval-{i}", paths.interval(i), cfg.finetune
        lo, hi = interval_bounds(i, d.n, T)
        if d.channel_projection:
            add_channel_projection(model)
        teacher = frozen_teacher(cfg) if d.consistency_loss and d.consistency_weight > 0 else None
        objective = EpsObjective(ab, lo, hi, p=d.p if d.probabilistic_sampling else 0.0,
                                 granularity=d.ps_granularity, antithetic=d.antithetic, teacher=teacher,
                                 consistency_weight=d.consistency_weight)
        meta = {"method": "deme", "interval": i, "bounds": [lo, hi], "N": d.n}
        ctx.note(f"interval {i}/{d.n}: t in [{lo}, {hi}), p={objective.p}, consistency={teacher is not None}, "
                 f"projection={d.channel_projection}")
    seed = derive_seed(cfg.seed, "finetune", name)
    curve, ckpt = CurveLog(ctx.run), paths.ckpt(f"finetune-{name}")
    t0 = time.perf_counter()
    model = train(model, objective, torch.as_tensor(load_images(paths.train)), budget, seed=seed,
                  device=ctx.device, ckpt_dir=ckpt, log=curve, desc=f"finetune@{name}",
                  fingerprint=json.dumps([cfg.to_dict()["finetune"], cfg.to_dict()["deme"], name, seed]))
    wall = time.perf_counter() - t0
    save_model(model, out, cfg, seed=seed, steps=budget.iterations, **meta)
    curve.save(paths.curve(f"finetune-{name}"))
    last = curve.rows[-1]
    write_json(paths.metrics("train", name), {"loss": last["loss"], "loss_eps": last["loss_eps"],
                                              "wall_s": wall, "iterations": budget.iterations,
                                              "parameters": count_parameters(model)})
    ctx.run.log_metrics({"wall_s": wall})
    clear_checkpoint(ckpt)
    for p in (out, paths.curve(f"finetune-{name}"), paths.metrics("train", name)):
        ctx.wrote(p)


def tags(cfg, args):
    return {"method": "plain" if args.plain else "deme", "interval": "all" if args.plain else args.interval,
            "seed": cfg.seed}


if __name__ == "__main__":
    sys.exit(run_stage("finetune", __doc__, body, add_args=add_args, item=item, tags=tags,
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "finetune", "deme")}))
