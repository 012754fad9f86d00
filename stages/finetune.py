"""Stage `finetune`: DeMe interval finetuning (`--interval i`), or one single-model method (`--method`).

DeMe (docs/paper.md §1.2-1.6): model i starts from the pretrained weights (+ identity channel-wise projections)
and trains on its interval I_i = [(i-1)T/N, iT/N) with probabilistic timestep sampling (p = probability of
a global draw) and the consistency loss towards the frozen pretrained model; each technique has a switch
in params `deme`.

Single-model methods finetune the pretrained model on all timesteps at a matched budget: N x
`finetune.iterations` with the same optimiser, EMA and data as DeMe (docs/paper.md §2), once per training seed
(`baselines.seeds`):
  plain         the control: plain epsilon-MSE ("trained longer")
  min_snr, p2, snr_plus_one, trunc_snr     loss reweighting (§2.1, params baselines.<method>)
  ant_uw, ant_nash                         ANT multi-task optimisers over K timestep intervals (§2.2)
  difftuning    Diff-Tuning with the retention buffer of the `buffer` stage, or its KD variant (§6)
  piecewise     ours, §1.10: the loss weight w(t) = w_i on I_i, with the merge's searched weights of the same seed
Resumable from .ckpt/ after a crash.

Text-to-image (`--t2i`, docs/paper.md §1.6 SD column): the same objectives on the UNet2DConditionModel, trained on
the latents stage's VAE latents with each image's prompt through the frozen text encoder (the consistency
target is the frozen pretrained UNet under the same prompt); Diff-Tuning uses its KD form.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402

from deme.methods import SINGLE_MODEL_METHODS as METHODS  # noqa: E402


def add_args(ap):
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--interval", type=int, help="DeMe interval index i in 1..N")
    g.add_argument("--method", choices=METHODS, help="a single-model method on all timesteps (N x iterations)")


def item(args):
    return args.method or f"interval-{args.interval}"


def merge_weights(cfg, paths, seeds: int) -> list[list[float]]:
    """The merge stage's searched weights, one list of N per training seed (metrics/<profile>/merge.json)."""
    from deme.io import read_json

    path = paths.metrics("merge")
    if not path.is_file():
        raise StageError(f"{path} is missing: the piecewise control trains on the merge's weights (dvc repro merge)")
    weights = read_json(path).get("weights")
    if not isinstance(weights, list) or len(weights) < seeds or any(
            not isinstance(w, list) or len(w) != cfg.deme.n for w in weights[:seeds]):
        raise StageError(f"{path}: 'weights' must hold {seeds} lists of {cfg.deme.n} merge weights (one per seed), "
                         f"got {weights!r}: dvc repro merge")
    return [[float(x) for x in w] for w in weights[:seeds]]


def make_objective(cfg, method, paths, weights=None):
    """deme.objectives.for_method, with Diff-Tuning's retention buffer read from the buffer stage's output
    (``weights``: the piecewise control's merge weights)."""
    from deme.objectives import for_method

    buffer = None
    if method == "difftuning" and cfg.baselines.difftuning.variant == "buffer":
        from deme.data import load_images

        buffer = load_images(paths.buffer)
        if len(buffer) != cfg.baselines.difftuning.buffer_size:
            raise StageError(f"{paths.buffer} holds {len(buffer)} images, params say "
                             f"{cfg.baselines.difftuning.buffer_size}: dvc repro buffer")
    return for_method(cfg, method, buffer, weights)


def body(ctx):
    import dataclasses
    import json
    import time

    from deme.data import load_images
    from deme.io import derive_seed, write_json
    from deme.models import count_parameters, frozen_teacher, load_pretrained, save_model
    from deme.methods import AFTER_MERGE, method_seeds
    from deme.paths import Paths
    from deme.projection import add_channel_projection
    from deme.resume import content_id, state_digest
    from deme.schedule import interval_bounds
    from deme.sweep import interval_objective
    from deme.tracking import CurveLog
    from deme.train import clear_checkpoint, train

    cfg, args, paths = ctx.cfg, ctx.args, Paths(ctx.cfg.profile)
    d, T = cfg.deme, cfg.schedule.num_train_timesteps
    condition = None
    if cfg.task == "t2i":  # latents + prompt tokens; the frozen text encoder conditions every step
        from deme.text2image import latent_data, load_components, text_conditioner

        images = latent_data(paths, cfg.pipeline.caption_dropout)
        comps = load_components(paths.pretrained, ctx.device)
        condition = text_conditioner(comps)
        data_id = [content_id(paths.latents), state_digest(comps.text_encoder)]  # what the steps read
    else:
        images = load_images(paths.train)
        data_id = content_id(paths.train)
    settings = cfg.to_dict()
    if args.method:
        name, budget = args.method, dataclasses.replace(cfg.finetune, iterations=cfg.finetune.iterations * d.n)
        runs = [(s, paths.method(name) / f"seed-{s}") for s in range(method_seeds(cfg, name))]
        meta = {"method": name, "interval": None}
        searched = merge_weights(cfg, paths, len(runs)) if name in AFTER_MERGE else [None] * len(runs)
        if name in AFTER_MERGE:
            ctx.note("loss weight w(t) = w_i on I_i, the merge's weights: " +
                     "; ".join(f"seed {s}: {[round(x, 4) for x in w]}" for s, w in enumerate(searched)))
            ctx.run.log_params({f"merge_weights_seed_{s}": w for s, w in enumerate(searched)})
        key = [settings["finetune"], settings["baselines"].get(name), d.n]
        ctx.note(f"{name}: all timesteps, {budget.iterations} iterations (= {d.n} x {cfg.finetune.iterations}), "
                 f"{len(runs)} seed(s)")
    else:
        i = args.interval
        if i not in d.intervals:
            raise StageError(f"--interval {i} is not in deme.intervals {d.intervals}")
        name, budget, runs = f"interval-{i}", cfg.finetune, [(s, paths.interval(i, s)) for s in range(d.seeds)]
        searched = [None] * len(runs)
        lo, hi = interval_bounds(i, d.n, T)
        meta = {"method": "deme", "interval": i, "bounds": [lo, hi], "N": d.n}
        key = [settings["finetune"], settings["deme"]]
        ctx.note(f"interval {i}/{d.n}: t in [{lo}, {hi}), p={d.p if d.probabilistic_sampling else 0.0}, "
                 f"consistency={d.consistency_loss and d.consistency_weight > 0}, projection={d.channel_projection}")

    curve, walls, losses = CurveLog(ctx.run), [], []
    # resume only from a checkpoint made from the same pretrained weights, schedule and data
    inputs = [state_digest(load_pretrained(cfg)), settings["schedule"], data_id]
    evaluate = fid_curve(ctx, None if args.method else args.interval) if budget.eval_every else None
    for s, out in runs:
        model = load_pretrained(cfg)
        if args.method:
            objective = make_objective(cfg, name, paths, searched[s])
        else:
            if d.channel_projection:
                add_channel_projection(model)
            teacher = frozen_teacher(cfg) if d.consistency_loss and d.consistency_weight > 0 else None
            objective = interval_objective(cfg, i, teacher)  # the sweep's and the analysis's objective too
        # interval models: seed 0 keeps the one-seed derivation, which the sweep's runs share (deme/sweep.py)
        seed = derive_seed(cfg.seed, "finetune", name, *([] if not args.method and s == 0 else [s]))
        label = f"{name}-seed{s}"
        ckpt = paths.ckpt(f"finetune-{label}")
        log = curve if not s else None  # curves of the first seed
        t0 = time.perf_counter()
        model = train(model, objective, images, budget, seed=seed, device=ctx.device, ckpt_dir=ckpt, log=log,
                      desc=f"finetune@{label}", fingerprint=json.dumps([key, name, s, seed, inputs, searched[s]]),
                      evaluate=evaluate if not s else None, channels_last=cfg.runtime.channels_last,
                      compile=cfg.runtime.compile, condition=condition)
        walls.append(time.perf_counter() - t0)
        if not ctx.is_main:  # the other processes of `accelerate launch` only train
            continue
        extra = {"loss_weights": searched[s]} if searched[s] else {}
        save_model(model, out, cfg, seed=seed, steps=budget.iterations, **meta, seed_index=s, **extra)
        clear_checkpoint(ckpt)
        losses.append(next((r["loss_eps"] for r in reversed(curve.rows) if "loss_eps" in r), float("nan")))
        ctx.wrote(out)
    if not ctx.is_main:
        return
    curve.save(paths.curve(f"finetune-{name}"))
    write_json(paths.metrics("train", name), {
        "loss_eps": losses[0], "iterations": budget.iterations, "seeds": len(runs),
        "parameters": count_parameters(model)})
    ctx.run.log_metrics({"wall_s": sum(walls) / len(walls), **{f"wall_s_seed_{k}": w for k, w in enumerate(walls)}})
    for p in (paths.curve(f"finetune-{name}"), paths.metrics("train", name)):
        ctx.wrote(p)


def fid_curve(ctx, interval=None):
    """FID of the EMA model on `finetune.eval_samples` samples (seeds of their own), for the training curve
    (docs/paper.md §1.6: FID-5K every 5K steps, to study 20K vs 200K iterations). Runs on every process.
    A DeMe interval model is scored inside the ensemble it will serve: the pretrained model at every other
    interval's timesteps, the model being trained at its own (docs/paper.md §1.7)."""
    from deme.evaluation import feature_spaces, fid_of_model, load_references
    from deme.io import sample_seeds
    from deme.models import frozen_teacher
    from deme.sample import Ensemble

    cfg = ctx.cfg
    spaces = feature_spaces(cfg, ctx.device)
    spaces = {m: spaces[m] for m in list(spaces)[:1]}
    refs = load_references(cfg, spaces)
    seeds = sample_seeds("curve", cfg.finetune.eval_samples, cfg.seed)
    base = frozen_teacher(cfg, ctx.device) if interval is not None else None

    def evaluate(model, step):
        if base is not None:
            model = Ensemble([model if i == interval else base for i in cfg.deme.intervals],
                             cfg.schedule.num_train_timesteps)
        return {"proxy_fid": fid_of_model(model, seeds, cfg, spaces, refs, ctx.device, desc=f"FID curve @{step}")}
    return evaluate


def tags(cfg, args):
    return {"method": args.method or "deme", "interval": "all" if args.method else args.interval, "seed": cfg.seed}


if __name__ == "__main__":
    sys.exit(run_stage("finetune", __doc__, body, add_args=add_args, item=item, tags=tags,
                       params=lambda c, a: {**{k: c.to_dict()[k] for k in ("seed", "finetune", "deme", "baselines")},
                                            "runtime.num_processes": c.runtime.num_processes}))
