"""Stage `sweep@<run>` (sweeps/dvc.yaml): one run of Table 3 or Fig. 8, trained, merged and evaluated.

A run (params `sweep.runs.<run>`) is a DeMe variant: N intervals, probabilistic sampling (and p), the
consistency loss and the channel-wise projection switched on or off (docs/paper.md §3.3, §3.5, §5 A1-A9, S1-S2).
Its N interval models are trained as the finetune stage trains them (same objective, seeds and loop) with
the budget of `sweep.budget`/`sweep.iterations`; for N > 1 their task vectors are merged with weights found
by the search of `sweep.merge` (proxy FID, search seeds); then the ensemble ("before merge") and the merged
model are evaluated by FID on `sweep.num_samples` evaluation seeds, with 100-step DDIM for a Table 3 row
(`sweep.table3_steps`) and `sample.steps` for a Fig. 8 point. N = 1 is the single finetuned model.

`--pretrained` scores the pretrained model at the same step counts: the reference line of Fig. 8 and the
row the paper's Table 3 lacks. Writes sweeps/<profile>/<run>.json and models/<profile>/sweep/<run>/.
Resumable: interval checkpoints and scored merge candidates are kept in .ckpt/ until the run finishes.

    dvc repro sweeps/dvc.yaml          # every run, then the sweep report (reports/<profile>_sweep/report.md)
    dvc repro sweeps/dvc.yaml:sweep@n8_ps_cl_cp
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402


def add_args(ap):
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="a run name of params sweep.runs")
    g.add_argument("--pretrained", action="store_true", help="the pretrained model at the sweep's step counts")


def item(args):
    return "pretrained" if args.pretrained else args.run


def _run(ctx):
    cfg, name = ctx.cfg, ctx.args.run
    if cfg.task != "image":
        raise StageError("the sweep (Table 3, Fig. 8) runs on image profiles (docs/paper.md §3.3: CIFAR10)")
    if name not in cfg.sweep.runs:
        raise StageError(f"--run {name!r} is not in params sweep.runs (allowed: {', '.join(cfg.sweep.runs) or 'none'})")
    return cfg.sweep.runs[name]


def evaluator(ctx):
    """evaluate(model, steps, label) -> (headline FID on the sweep's evaluation seeds, images/s)."""
    import time

    from deme.evaluation import feature_spaces, load_references
    from deme.io import sample_seeds
    from deme.sweep import fid_at_steps

    cfg = ctx.cfg
    spaces = feature_spaces(cfg, ctx.device, headline=True)
    refs = load_references(cfg, spaces)
    seeds = sample_seeds("eval", cfg.sweep.num_samples or cfg.sample.num_samples, cfg.seed)

    def evaluate(model, steps, label):
        t0 = time.perf_counter()
        fid = fid_at_steps(model, cfg, steps, seeds, spaces, refs, ctx.device, desc=f"{label} DDIM-{steps}")
        return fid, len(seeds) / (time.perf_counter() - t0)
    evaluate.spaces, evaluate.refs, evaluate.num_samples = spaces, refs, len(seeds)
    return evaluate


def pretrained_body(ctx):
    """The pretrained model at the sweep's step counts: Fig. 8's reference line, the row Table 3 lacks."""
    from deme.io import write_json
    from deme.models import load_pretrained
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    if cfg.task != "image":
        raise StageError("the sweep (Table 3, Fig. 8) runs on image profiles (docs/paper.md §3.3: CIFAR10)")
    evaluate, model = evaluator(ctx), load_pretrained(cfg)
    steps = sorted({cfg.sweep.table3_steps, cfg.sample.steps})
    out, timings = {"run": "pretrained", "num_samples": evaluate.num_samples, "steps": steps}, {}  # timings: MLflow
    for s in steps:
        out[f"fid_{s}"], timings[f"images_per_s_{s}"] = evaluate(model, s, "pretrained")
        ctx.note(f"pretrained DDIM-{s}: FID {out[f'fid_{s}']:.4f}")
    if ctx.is_main:
        write_json(paths.sweep_metrics("pretrained"), out)
        ctx.run.log_metrics({k: v for k, v in out.items() if k.startswith("fid_")} | timings)
        ctx.wrote(paths.sweep_metrics("pretrained"))


def train_models(ctx, vcfg, name):
    """1. The run's N interval models (docs/paper.md §1.3-1.5), resumable per model; and the seconds it took."""
    import time

    from deme.data import load_images
    from deme.models import frozen_teacher
    from deme.paths import Paths
    from deme.sweep import train_interval

    d, paths = vcfg.deme, Paths(vcfg.profile)
    images = load_images(paths.train)
    teacher = frozen_teacher(vcfg) if d.consistency_loss and d.consistency_weight > 0 else None
    t0 = time.perf_counter()
    models = [train_interval(vcfg, i, images, ctx.device, paths.ckpt(f"sweep-{name}-interval-{i}"), teacher=teacher,
                             desc=f"sweep@{name} interval {i}/{d.n}") for i in d.intervals]
    return models, time.perf_counter() - t0


def merge_models(ctx, vcfg, name, models, evaluate):
    """2. N > 1: theta + sum_i w_i tau_i (docs/paper.md §1.8), weights from the search of `sweep.merge` scored by
    proxy FID on the search seeds; scored candidates are kept in .ckpt/ (valid only for the same models,
    settings and references). N = 1: the model itself. Returns (weights, merged, candidates scored, ensemble)."""
    import json

    from deme.io import sample_seeds
    from deme.merge import Scorer, merged_model, search, task_vector
    from deme.models import load_pretrained
    from deme.paths import Paths
    from deme.projection import add_channel_projection
    from deme.resume import ScoreLog, state_digest, stats_id
    from deme.sample import Ensemble
    from deme.sweep import fid_at_steps

    cfg, n = ctx.cfg, vcfg.deme.n
    if n == 1:
        return (1.0,), models[0], 0, models[0]
    base = load_pretrained(vcfg)
    if vcfg.deme.channel_projection:
        add_channel_projection(base)
    vectors = [task_vector(mod.state_dict(), base.state_dict()) for mod in models]
    log = ScoreLog(Paths(cfg.profile).ckpt(f"sweep-{name}") / "scores.jsonl",
                   json.dumps([vcfg.to_dict()["deme"], vcfg.to_dict()["finetune"], cfg.to_dict()["sweep"]["merge"],
                               cfg.to_dict()["sample"], cfg.to_dict()["schedule"], state_digest(base),
                               [state_digest(v) for v in vectors], stats_id(evaluate.refs), cfg.seed]))
    cache = log.load()
    if cache:
        ctx.note(f"[resume] {len(cache)} scored candidates reused")
    if ctx.is_main:
        log.start()

    def on_new(w, fid, phase):
        if ctx.is_main:
            log.append(w, fid)
            ctx.run.log_metrics({"proxy_fid": fid})

    seeds = sample_seeds("search", cfg.sweep.merge.proxy_samples, cfg.seed)
    scorer = Scorer(lambda w: fid_at_steps(merged_model(base, vectors, w), vcfg, cfg.sample.steps, seeds,
                                           evaluate.spaces, evaluate.refs, ctx.device, desc="merge candidate"),
                    cache, on_new)
    scorer((0.0,) * n, "reference")
    weights = search(scorer, n, cfg.sweep.merge)
    return weights, merged_model(base, vectors, weights), len(scorer.rows), Ensemble(models, vcfg.schedule.num_train_timesteps)


def body(ctx):
    from deme.models import count_parameters
    from deme.sweep import run_steps, variant_config

    if ctx.args.pretrained:
        return pretrained_body(ctx)
    cfg, (run, name) = ctx.cfg, (_run(ctx), ctx.args.run)
    vcfg = variant_config(cfg, run)
    d = vcfg.deme
    ctx.note(f"{name}: N={d.n}, PS={'p=' + str(d.p) if d.probabilistic_sampling else 'off'}, "
             f"CL={'on' if d.consistency_loss else 'off'}, CP={'on' if d.channel_projection else 'off'}; "
             f"{vcfg.finetune.iterations} iterations per model ({cfg.sweep.budget} budget)")
    evaluate = evaluator(ctx)
    models, train_s = train_models(ctx, vcfg, name)
    weights, merged, candidates, ensemble = merge_models(ctx, vcfg, name, models, evaluate)
    # 3. FID of the ensemble and the merged model at every step count of the run
    out = {"run": name, "n": d.n, "probabilistic_sampling": d.probabilistic_sampling, "p": d.p,
           "consistency_loss": d.consistency_loss, "channel_projection": d.channel_projection,
           "table3": run.table3, "fig8": run.fig8, "iterations_per_model": vcfg.finetune.iterations,
           "iterations_total": vcfg.finetune.iterations * d.n, "budget": cfg.sweep.budget,
           "weights": list(weights), "merge_candidates": candidates, "num_samples": evaluate.num_samples,
           "steps": run_steps(cfg, run), "parameters_per_model": count_parameters(models[0])}
    timings = {"train_s": train_s}  # clock readings: MLflow only
    for s in out["steps"]:
        out[f"fid_ensemble_{s}"], timings[f"images_per_s_ensemble_{s}"] = evaluate(ensemble, s, f"{name} ensemble")
        if d.n > 1:
            out[f"fid_merged_{s}"], timings[f"images_per_s_merged_{s}"] = evaluate(merged, s, f"{name} merged")
        else:  # one model: "before" and "after" merge are the same network
            out[f"fid_merged_{s}"] = out[f"fid_ensemble_{s}"]
        ctx.note(f"{name} DDIM-{s}: ensemble FID {out[f'fid_ensemble_{s}']:.4f}, merged {out[f'fid_merged_{s}']:.4f} "
                 f"(weights {tuple(round(w, 3) for w in weights)})")
    if ctx.is_main:
        write_run(ctx, vcfg, name, models, merged, weights, out, timings)


def write_run(ctx, vcfg, name, models, merged, weights, out, timings):
    """The run's models and metrics; then its resume state goes."""
    from deme.io import write_json
    from deme.models import save_model
    from deme.paths import Paths
    from deme.train import clear_checkpoint

    paths, d = Paths(vcfg.profile), vcfg.deme
    for i, mod in zip(d.intervals, models):
        save_model(mod, paths.sweep_dir(name) / f"interval-{i}", vcfg, method="deme", interval=i, N=d.n, sweep_run=name)
    save_model(merged, paths.sweep_dir(name) / "merged", vcfg, method="deme-merged", weights=list(weights),
               sweep_run=name)
    write_json(paths.sweep_metrics(name), out)
    ctx.run.log_metrics({k: v for k, v in out.items() if k.startswith("fid_")} | timings)
    for i in d.intervals:
        clear_checkpoint(paths.ckpt(f"sweep-{name}-interval-{i}"))
    paths.ckpt(f"sweep-{name}").joinpath("scores.jsonl").unlink(missing_ok=True)
    ctx.wrote(paths.sweep_dir(name))
    ctx.wrote(paths.sweep_metrics(name))


def tags(cfg, args):
    if args.pretrained:
        return {"method": "pretrained", "sweep_run": "pretrained"}
    run = cfg.sweep.runs.get(args.run)
    return {"method": "deme-sweep", "sweep_run": args.run, **({"N": run.n} if run else {})}


def params(cfg, args):
    d = cfg.to_dict()
    run = {} if args.pretrained else d["sweep"]["runs"].get(args.run, {})
    return {"seed": cfg.seed, **{f"run.{k}": v for k, v in run.items()},
            **{f"sweep.{k}": v for k, v in d["sweep"].items() if k != "runs"}}


if __name__ == "__main__":
    sys.exit(run_stage("sweep", __doc__, body, add_args=add_args, item=item, tags=tags, params=params))
