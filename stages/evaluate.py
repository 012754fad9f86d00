"""Stage `evaluate`: FID of one model, computed while sampling (no image files), and a sample grid.

--model pretrained | ensemble | merged | plain | <baseline>. DDIM (params `sample`: 50 steps, eta 0) from
per-image seeds shared by every model, so all models start from the same noise; FID against the held-out
reference statistics in the profile's feature space. `ensemble` is DeMe before merge: model i serves the
steps whose timestep lies in interval i (PAPER.md §1.7). A single-model method trained with several seeds
(`baselines.seeds`) is evaluated once per seed: the metrics hold the mean, the standard deviation and every
seed's FID. Writes metrics/<profile>/evaluate/<model>.json and samples/<profile>/<model>.png.

Text-to-image (`--t2i`, PAPER.md §3.2): the zero-shot benchmarks of Table 2, one image per prompt from
per-prompt seeds shared by every model, classifier-free guidance t2i.pipeline.guidance_scale with the sampler of
`sample.sampler` (PNDM-50 on sd14): COCO (FID against the val2014 statistics at benchmarks.fid_resolution,
plus CLIP score), ImageNet (template x class names; FID and CLIP), PartiPrompts (CLIP only). CLIP score =
100 x cosine of the normalised open_clip embeddings (PAPER.md §8.3). The ensemble's interval model serves
both CFG branches. Also writes samples/<profile>/<model>-prompts.png (the first benchmarks.grid_prompts
PartiPrompts), the report's prompt-by-model grid.

Resumable: the features (and CLIP scores) of every finished batch are kept in .ckpt/<profile>/evaluate-<model>/
until the metrics are written, so a killed evaluation samples only the batches it had not finished and ends
with the uninterrupted run's numbers (deme/resume.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402

from deme.objectives import SINGLE_MODEL_METHODS  # noqa: E402

MODELS = ("pretrained", "ensemble", "merged", *SINGLE_MODEL_METHODS)


def add_args(ap):
    ap.add_argument("--model", required=True, choices=MODELS, help="which model to evaluate")


def load(name, cfg, paths):
    """The models to evaluate: one, or one per training seed of a single-model method."""
    from deme.models import CheckpointError, load_model, load_pretrained
    from deme.sample import Ensemble

    if name == "pretrained":
        return [load_pretrained(cfg)]
    if name == "ensemble":
        return [Ensemble([load_model(paths.interval(i)) for i in cfg.deme.intervals],
                         cfg.schedule.num_train_timesteps)]
    if name == "merged":
        return [load_model(paths.merged)]
    seeds = [paths.method(name) / f"seed-{s}" for s in range(cfg.baselines.seeds)]
    missing = [str(p) for p in seeds if not p.exists()]
    if missing:
        raise CheckpointError(f"{', '.join(missing)}: model missing (baselines.seeds={cfg.baselines.seeds}); "
                              f"make it with: dvc repro")
    return [load_model(p) for p in seeds]


def rate(images_per_s):
    return f"{images_per_s:.1f} img/s" if images_per_s else "every batch resumed, no rate measured"


BENCHMARKS = {"coco": True, "imagenet": True, "parti": False}  # name -> has an FID (PAPER.md §3.2)


def shards(ctx, model, k, spaces, part="", **more):
    """The resume state of evaluating training seed ``k``'s model (``part``: a t2i benchmark)."""
    from deme.evaluation import describe
    from deme.paths import Paths
    from deme.resume import Shards, state_digest

    cfg = ctx.cfg.to_dict()
    fingerprint = {"model": state_digest(model), "seed": cfg["seed"], "sample": cfg["sample"],
                   "schedule": cfg["schedule"], "spaces": describe(spaces) if spaces else None, **more}
    folder = Paths(ctx.cfg.profile).ckpt(f"evaluate-{ctx.args.model}") / f"seed-{k}{part}"
    return Shards(folder, fingerprint, main=ctx.is_main)


def evaluate_t2i(ctx):
    import shutil
    import time

    import numpy as np

    from deme.evaluation import describe, feature_spaces
    from deme.io import write_json
    from deme.metrics.clip import load_clip
    from deme.metrics.fid import Stats, fid_of_features
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.sample import save_grid
    from deme.text2image import bench_seeds, load_components, load_prompt_set, sample_prompts

    cfg, name, paths = ctx.cfg, ctx.args.model, Paths(ctx.cfg.profile)
    models = load(name, cfg, paths)
    comps = load_components(paths.pretrained, ctx.device)
    spaces = feature_spaces(cfg, ctx.device)
    clip = load_clip(cfg, ctx.device)
    headline = next(iter(spaces))
    sets = {bench: load_prompt_set(paths, bench) for bench in BENCHMARKS}
    per_seed, wall, images = [], 0.0, {}
    n_images = 0
    for k, model in enumerate(models):
        scores = {}
        for bench, has_fid in BENCHMARKS.items():
            prompts = sets[bench]["prompts"]
            seeds = bench_seeds(bench, len(prompts), cfg.seed)
            keep = cfg.sample.grid_size if bench == "coco" else cfg.benchmarks.grid_prompts if bench == "parti" else 0
            t0 = time.perf_counter()
            done = shards(ctx, model, k, spaces if has_fid else None, f"-{bench}", prompts=sets[bench].get("sha256"),
                          count=len(prompts), keep=keep, pipeline=cfg.to_dict()["pipeline"], clip=clip.describe())
            res = sample_prompts(model, comps, prompts, seeds, cfg, ctx.device, spaces if has_fid else None, clip,
                                 keep=keep, desc=f"evaluate@{name} {bench}" + (f" seed {k}" if len(models) > 1 else ""),
                                 shards=done)
            wall += time.perf_counter() - t0
            n_images += len(prompts) * done.fresh_fraction()  # a resumed run's rate counts what it sampled
            scores[f"{bench}_clip"] = float(np.mean(res["clip"]))
            if has_fid:
                for mode, feats in res["features"].items():
                    scores[f"{bench}_fid_{mode}"] = fid_of_features(feats, Stats.load(paths.bench_stats(bench, mode)))
                scores[f"{bench}_fid"] = scores[f"{bench}_fid_{headline}"]
            if k == 0 and res["images"] is not None:
                images[bench] = res["images"]
        per_seed.append(scores)
    if not ctx.is_main:
        return
    keys = list(per_seed[0])
    out = {key: float(np.mean([s[key] for s in per_seed])) for key in keys}
    out.update({f"{key}_std": float(np.std([s[key] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
                for key in keys})
    n_models = len(cfg.deme.intervals) if name == "ensemble" else 1
    out.update({"per_seed": per_seed, "training_seeds": len(per_seed),
                "prompts": {b: len(sets[b]["prompts"]) for b in BENCHMARKS},
                "grid_prompts": sets["parti"]["prompts"][:cfg.benchmarks.grid_prompts],
                "prompt_sha256": {b: sets[b].get("sha256") for b in BENCHMARKS},
                "sampler": cfg.sample.scheduler_class, "steps": cfg.sample.steps, "guidance_scale": cfg.pipeline.guidance_scale,
                "sample_precision": cfg.sample.precision, "fid_resolution": cfg.benchmarks.fid_resolution,
                "models": n_models, "parameters_per_model": count_parameters(models[0]) // n_models,
                "images_per_s": n_images / wall if n_images else None, "num_processes": cfg.runtime.num_processes,
                **describe(spaces), **clip.describe()})
    write_json(paths.metrics("evaluate", name), out)
    grid, row = paths.samples(name), paths.samples(f"{name}-prompts")
    save_grid(images["coco"], grid, nrow=int(len(images["coco"]) ** 0.5))
    save_grid(images["parti"], row, nrow=len(images["parti"]))
    # `fid` and `clip` under the same names as every other run (MLflow's compare view lines them up): COCO's
    ctx.run.log_metrics({k: out[k] for k in keys} | {"fid": out["coco_fid"], "clip": out["coco_clip"],
                                                     "images_per_s": out["images_per_s"]})
    ctx.run.log_artifact(grid, "samples")
    ctx.run.log_artifact(row, "samples")
    shown = ", ".join(f"{k} {out[k]:.3f}" for k in keys if k.endswith(("_fid", "_clip")))
    ctx.note(f"{name}: {shown} ({rate(out['images_per_s'])})")
    for p in (paths.metrics("evaluate", name), grid, row):
        ctx.wrote(p)
    shutil.rmtree(paths.ckpt(f"evaluate-{name}"), ignore_errors=True)  # the resume state, now the outputs exist


def body(ctx):
    import shutil
    import time

    from deme.evaluation import describe, feature_spaces, fids, load_references, sample_features
    from deme.io import sample_seeds, write_json
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.sample import save_grid

    import numpy as np

    cfg, name, paths = ctx.cfg, ctx.args.model, Paths(ctx.cfg.profile)
    if cfg.task == "t2i":
        return evaluate_t2i(ctx)
    models = load(name, cfg, paths)
    spaces = feature_spaces(cfg, ctx.device)
    refs, held = load_references(cfg, spaces), load_references(cfg, spaces, heldout=True)
    headline = f"fid_{next(iter(spaces))}"
    seeds = sample_seeds("eval", cfg.sample.num_samples, cfg.seed)
    per_seed, first, wall, sampled = [], None, 0.0, 0.0
    for k, model in enumerate(models):
        t0 = time.perf_counter()
        save_dir = (paths.samples(name).with_suffix("") / f"seed-{k}") if cfg.sample.save_images else None
        done = shards(ctx, model, k, spaces, keep=cfg.sample.grid_size)
        feats, kept = sample_features(model, seeds, cfg, spaces, ctx.device, keep=cfg.sample.grid_size,
                                      desc=f"evaluate@{name}" + (f" seed {k}" if len(models) > 1 else ""),
                                      save_dir=save_dir, shards=done)
        wall += time.perf_counter() - t0
        sampled += len(seeds) * done.fresh_fraction()  # a resumed run's rate counts what it sampled
        per_seed.append({**fids(feats, refs), **(fids(feats, held, "fid_heldout") if held else {})})
        first = kept if first is None else first
    if not ctx.is_main:
        return
    by_mode = {key: [s[key] for s in per_seed] for key in per_seed[0]}
    fid_list = by_mode[headline]
    fid = float(np.mean(fid_list))
    n_models = len(cfg.deme.intervals) if name == "ensemble" else 1
    out = {"fid": fid, "fid_std": float(np.std(fid_list, ddof=1)) if len(fid_list) > 1 else 0.0,
           "fid_seeds": fid_list, **{key: float(np.mean(v)) for key, v in by_mode.items()},
           "training_seeds": len(fid_list), "num_samples": len(seeds), "sampler": cfg.sample.sampler,
           "steps": cfg.sample.steps, "eta": cfg.sample.eta, "sample_precision": cfg.sample.precision,
           "models": n_models, "parameters_per_model": count_parameters(models[0]) // n_models,
           "images_per_s": sampled / wall if sampled else None, "num_processes": cfg.runtime.num_processes,
           **describe(spaces)}
    write_json(paths.metrics("evaluate", name), out)
    grid = paths.samples(name)
    save_grid(first, grid, nrow=int(len(first) ** 0.5))
    ctx.run.log_metrics({"fid": fid, "images_per_s": out["images_per_s"], **{k: out[k] for k in by_mode}})
    ctx.run.log_artifact(grid, "samples")
    spread = f" ± {out['fid_std']:.4f} over {len(fid_list)} training seeds" if len(fid_list) > 1 else ""
    modes = ", ".join(f"{k} {out[k]:.4f}" for k in by_mode)
    ctx.note(f"{name}: FID {fid:.4f}{spread} from {len(seeds)} samples ({modes}; {rate(out['images_per_s'])})")
    ctx.wrote(paths.metrics("evaluate", name))
    ctx.wrote(grid)
    shutil.rmtree(paths.ckpt(f"evaluate-{name}"), ignore_errors=True)  # the resume state, now the outputs exist


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", __doc__, body, add_args=add_args, item=lambda a: a.model,
                       tags=lambda c, a: {"method": a.model, "seed": c.seed},
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "sample", "fid")
                                            + (("pipeline", "clip", "benchmarks") if c.task == "t2i" else ())}))
