"""Stage `evaluate`: FID of one model, computed while sampling (no image files), and a sample grid.

--model pretrained | ensemble | merged | plain | <baseline>. DDIM (params `sample`: 50 steps, eta 0) from
per-image seeds shared by every model, so all models start from the same noise; FID against the held-out
reference statistics in the profile's feature space. `ensemble` is DeMe before merge: model i serves the
steps whose timestep lies in interval i (docs/paper.md §1.7). A single-model method trained with several seeds
(`baselines.seeds`) is evaluated once per seed: the metrics hold the mean, the standard deviation and every
seed's FID. A single-model method is first moved along its task vector, theta + w tau, with w from the merge's
search (`merge.scale_search`; proxy FID against the search reference, text-to-image: the COCO proxy prompts
against their own images), so no row lacks the search DeMe's weights get. Writes
metrics/<profile>/evaluate/<model>.json and samples/<profile>/<model>.png.

Text-to-image (`--t2i`, docs/paper.md §3.2): the zero-shot benchmarks of Table 2, one image per prompt from
per-prompt seeds shared by every model, classifier-free guidance t2i.pipeline.guidance_scale with the sampler of
`sample.sampler` (PNDM-50 on sd14): COCO (FID against the val2014 statistics at benchmarks.fid_resolution,
plus CLIP score), ImageNet (template x class names; FID and CLIP), PartiPrompts (CLIP only). CLIP score =
100 x cosine of the normalised open_clip embeddings (docs/paper.md §8.3). The ensemble's interval model serves
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

from deme.methods import SINGLE_MODEL_METHODS  # noqa: E402

MODELS = ("pretrained", "ensemble", "merged", *SINGLE_MODEL_METHODS)


def add_args(ap):
    ap.add_argument("--model", required=True, choices=MODELS, help="which model to evaluate")


def load(name, cfg, paths):
    """The models to evaluate, one per training seed (one for the pretrained model)."""
    from deme.models import CheckpointError, load_model, load_pretrained
    from deme.sample import Ensemble

    if name == "pretrained":
        return [load_pretrained(cfg)]
    if name in ("ensemble", "merged"):
        folders = [[paths.interval(i, s) for i in cfg.deme.intervals] if name == "ensemble" else [paths.merged(s)]
                   for s in range(cfg.deme.seeds)]
    else:
        from deme.methods import method_seeds

        folders = [[paths.method(name) / f"seed-{s}"] for s in range(method_seeds(cfg, name))]
    missing = [str(p) for group in folders for p in group if not p.exists()]
    if missing:
        raise CheckpointError(f"{', '.join(missing)}: model missing (deme.seeds={cfg.deme.seeds}, baselines.seeds="
                              f"{cfg.baselines.seeds}); make it with: dvc repro")
    if name == "ensemble":
        return [Ensemble([load_model(p) for p in group], cfg.schedule.num_train_timesteps) for group in folders]
    return [load_model(group[0]) for group in folders]


def scale_search(ctx, name, models, spaces):
    """A single-model method gets the merge's search on its one task vector, theta + w tau (the same proxy
    samples, search reference and search settings as DeMe's N weights), so a scale found by search is not
    credited to decoupling. Returns the scaled models and, per seed, (w, proxy FID)."""
    from deme.evaluation import fid_of_model, load_references
    from deme.io import sample_seeds
    from deme.merge import Scorer, merged_model, search, task_vector
    from deme.models import load_pretrained
    from deme.paths import Paths
    from deme.text2image import proxy_fid_scorer

    cfg = ctx.cfg
    base = load_pretrained(cfg)
    head = {m: spaces[m] for m in list(spaces)[:1]}
    if cfg.task == "image":
        refs = load_references(cfg, head, search=True)
        seeds = sample_seeds("search", cfg.merge.proxy_samples, cfg.seed)
    out, found = [], []
    for k, model in enumerate(models):
        vector = [task_vector(model.state_dict(), base.state_dict())]
        desc = f"{name} seed {k} scale candidate"
        if cfg.task == "t2i":
            proxy_fid = proxy_fid_scorer(cfg, Paths(cfg.profile), head, ctx.device, desc)
        else:
            proxy_fid = lambda m: fid_of_model(m, seeds, cfg, head, refs, ctx.device, desc=desc)  # noqa: E731
        scorer = Scorer(lambda w: proxy_fid(merged_model(base, vector, w)))
        best = search(scorer, 1, cfg.merge)
        ctx.note(f"{name} seed {k}: searched scale w = {best[0]:.3f} (proxy FID {scorer.cache[best]:.4f}; "
                 f"w = 1: {scorer.cache.get((1.0,), float('nan')):.4f})")
        out.append(merged_model(base, vector, best))
        found.append((best[0], scorer.cache[best]))
    return out, found


def rate(images_per_s):
    return f"{images_per_s:.1f} img/s" if images_per_s else "every batch resumed, no rate measured"


BENCHMARKS = {"coco": True, "imagenet": True, "parti": False}  # name -> has an FID (docs/paper.md §3.2)


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
    from deme.io import atomic_write_npz, write_json
    from deme.metrics.clip import load_clip
    from deme.stats import estimate, mean_estimate
    from deme.metrics.fid import Stats, fid_of_features
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.resume import state_digest
    from deme.sample import save_grid
    from deme.text2image import bench_seeds, load_components, load_prompt_set, sample_prompts

    cfg, name, paths = ctx.cfg, ctx.args.model, Paths(ctx.cfg.profile)
    models = load(name, cfg, paths)
    comps = load_components(paths.pretrained, ctx.device)
    spaces = feature_spaces(cfg, ctx.device)
    scales = None
    if name in SINGLE_MODEL_METHODS and cfg.merge.scale_search:
        models, scales = scale_search(ctx, name, models, spaces)
    clip = load_clip(cfg, ctx.device)
    headline = next(iter(spaces))
    sets = {bench: load_prompt_set(paths, bench) for bench in BENCHMARKS}
    per_seed, wall, images = [], 0.0, {}
    n_images, bench_feats, clips = 0, {b: [] for b, has_fid in BENCHMARKS.items() if has_fid}, {b: [] for b in BENCHMARKS}
    frozen = [state_digest(comps.vae), state_digest(comps.text_encoder)]  # they shape every image too
    for k, model in enumerate(models):
        scores = {}
        for bench, has_fid in BENCHMARKS.items():
            prompts = sets[bench]["prompts"]
            seeds = bench_seeds(bench, len(prompts), cfg.seed)
            keep = cfg.sample.grid_size if bench == "coco" else cfg.benchmarks.grid_prompts if bench == "parti" else 0
            t0 = time.perf_counter()
            done = shards(ctx, model, k, spaces if has_fid else None, f"-{bench}", prompts=sets[bench].get("sha256"),
                          count=len(prompts), keep=keep, pipeline=cfg.to_dict()["pipeline"], clip=clip.describe(),
                          frozen=frozen)
            res = sample_prompts(model, comps, prompts, seeds, cfg, ctx.device, spaces if has_fid else None, clip,
                                 keep=keep, desc=f"evaluate@{name} {bench}" + (f" seed {k}" if len(models) > 1 else ""),
                                 shards=done)
            wall += time.perf_counter() - t0
            n_images += len(prompts) * done.fresh_fraction()  # a resumed run's rate counts what it sampled
            scores[f"{bench}_clip"] = float(np.mean(res["clip"]))
            clips[bench].append(np.asarray(res["clip"], np.float64))
            if has_fid:
                bench_feats[bench].append(np.asarray(res["features"][headline], np.float32))
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
    # 95 % intervals over training seeds and prompts (deme/stats.py): FID per benchmark, CLIP score per benchmark
    for bench, feats in bench_feats.items():
        est = estimate(feats, Stats.load(paths.bench_stats(bench, headline)), reps=cfg.fid.bootstrap, seed=cfg.seed)
        out.update({f"{bench}_fid_lo": est.lo, f"{bench}_fid_hi": est.hi, f"{bench}_fid_se_eval": est.se_eval,
                    f"{bench}_fid_se_seed": est.se_seed})
    for bench, values in clips.items():
        est = mean_estimate(values, reps=cfg.fid.bootstrap, seed=cfg.seed)
        out.update({f"{bench}_clip_lo": est.lo, f"{bench}_clip_hi": est.hi})
    atomic_write_npz(paths.features(name), **{f"{bench}_seed_{k}": f for bench, fs in bench_feats.items()
                                              for k, f in enumerate(fs)})
    n_models = len(cfg.deme.intervals) if name == "ensemble" else 1
    out.update({"per_seed": per_seed, "training_seeds": len(per_seed),
                "prompts": {b: len(sets[b]["prompts"]) for b in BENCHMARKS},
                "grid_prompts": sets["parti"]["prompts"][:cfg.benchmarks.grid_prompts],
                "prompt_sha256": {b: sets[b].get("sha256") for b in BENCHMARKS},
                "sampler": cfg.sample.scheduler_class, "steps": cfg.sample.steps, "guidance_scale": cfg.pipeline.guidance_scale,
                "sample_precision": cfg.sample.precision, "fid_resolution": cfg.benchmarks.fid_resolution,
                "models": n_models, "parameters_per_model": count_parameters(models[0]) // n_models,
                "num_processes": cfg.runtime.num_processes, **describe(spaces), **clip.describe(),
                **({"scale": [w for w, _ in scales], "scale_proxy_fid": [f for _, f in scales]} if scales else {})})
    images_per_s = n_images / wall if n_images else None  # a clock reading: MLflow and the log only
    write_json(paths.metrics("evaluate", name), out)
    grid, row = paths.samples(name), paths.samples(f"{name}-prompts")
    save_grid(images["coco"], grid, nrow=int(len(images["coco"]) ** 0.5))
    save_grid(images["parti"], row, nrow=len(images["parti"]))
    # `fid` and `clip` under the same names as every other run (MLflow's compare view lines them up): COCO's
    ctx.run.log_metrics({k: out[k] for k in keys} | {"fid": out["coco_fid"], "clip": out["coco_clip"],
                                                     "images_per_s": images_per_s})
    ctx.run.log_image(grid, "samples")
    ctx.run.log_image(row, "prompts")
    shown = ", ".join(f"{k} {out[k]:.3f}" for k in keys if k.endswith(("_fid", "_clip")))
    ctx.note(f"{name}: {shown} ({rate(images_per_s)})")
    for p in (paths.metrics("evaluate", name), paths.features(name), grid, row):
        ctx.wrote(p)
    shutil.rmtree(paths.ckpt(f"evaluate-{name}"), ignore_errors=True)  # the resume state, now the outputs exist


def body(ctx):
    import shutil
    import time

    from deme.evaluation import describe, feature_spaces, fids, load_references, sample_features
    from deme.io import atomic_write_npz, sample_seeds, write_json
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.sample import save_grid
    from deme.stats import estimate, kid

    import numpy as np

    cfg, name, paths = ctx.cfg, ctx.args.model, Paths(ctx.cfg.profile)
    if cfg.task == "t2i":
        return evaluate_t2i(ctx)
    models = load(name, cfg, paths)
    spaces = feature_spaces(cfg, ctx.device)
    refs, held = load_references(cfg, spaces), load_references(cfg, spaces, heldout=True)
    head = next(iter(spaces))
    scales = None
    if name in SINGLE_MODEL_METHODS and cfg.merge.scale_search:
        models, scales = scale_search(ctx, name, models, spaces)
    seeds = sample_seeds("eval", cfg.sample.num_samples, cfg.seed)
    per_seed, head_feats, first, wall, sampled = [], [], None, 0.0, 0.0
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
        head_feats.append(np.asarray(feats[head], np.float32))
        first = kept if first is None else first
    if not ctx.is_main:
        return
    by_mode = {key: [s[key] for s in per_seed] for key in per_seed[0]}
    fid_list = by_mode[f"fid_{head}"]
    # the interval over training seeds and evaluation samples (deme/stats.py); KID from the same features
    est = estimate(head_feats, refs[head], reps=cfg.fid.bootstrap, seed=cfg.seed)
    ref_feats = np.load(paths.ref_features(head)) if paths.ref_features(head).exists() else None
    kids = ([kid(f, ref_feats, cfg.fid.kid_subsets, cfg.fid.kid_subset_size, cfg.seed) for f in head_feats]
            if ref_feats is not None else [])
    n_models = len(cfg.deme.intervals) if name == "ensemble" else 1
    out = {"fid": est.value, "fid_lo": est.lo, "fid_hi": est.hi, "fid_se_eval": est.se_eval,
           "fid_se_seed": est.se_seed, "fid_std": float(np.std(fid_list, ddof=1)) if len(fid_list) > 1 else 0.0,
           "fid_seeds": fid_list, **{key: float(np.mean(v)) for key, v in by_mode.items()},
           **({"kid": float(np.mean([m for m, _ in kids])), "kid_std": float(np.mean([s for _, s in kids])),
               "kid_seeds": [m for m, _ in kids]} if kids else {}),
           **({"scale": [w for w, _ in scales], "scale_proxy_fid": [f for _, f in scales]} if scales else {}),
           "training_seeds": len(fid_list), "num_samples": len(seeds), "bootstrap": cfg.fid.bootstrap,
           "sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "eta": cfg.sample.eta,
           "sample_precision": cfg.sample.precision, "models": n_models,
           "parameters_per_model": count_parameters(models[0]) // n_models,
           "num_processes": cfg.runtime.num_processes, **describe(spaces)}
    images_per_s = sampled / wall if sampled else None  # a clock reading: MLflow and the log only
    write_json(paths.metrics("evaluate", name), out)
    atomic_write_npz(paths.features(name), first_seed=np.asarray(seeds.start), mode=np.asarray(head),
                     **{f"seed_{k}": f for k, f in enumerate(head_feats)})
    grid = paths.samples(name)
    save_grid(first, grid, nrow=int(len(first) ** 0.5))
    ctx.run.log_metrics({"fid": est.value, "fid_lo": est.lo, "fid_hi": est.hi,
                         "images_per_s": images_per_s, **{k: out[k] for k in by_mode},
                         **({"kid": out["kid"]} if kids else {})})
    ctx.run.log_image(grid, "samples")
    spread = f" over {len(fid_list)} training seeds" if len(fid_list) > 1 else ""
    modes = ", ".join(f"{k} {out[k]:.4f}" for k in by_mode)
    kid_txt = f"; KID {out['kid']:.5f} ± {out['kid_std']:.5f}" if kids else ""
    ctx.note(f"{name}: FID {est.text(3)} (95 % interval{spread}, {len(seeds)} samples; noise mostly from "
             f"{est.dominant()}){kid_txt} ({modes}; {rate(images_per_s)})")
    for p in (paths.metrics("evaluate", name), paths.features(name), grid):
        ctx.wrote(p)
    shutil.rmtree(paths.ckpt(f"evaluate-{name}"), ignore_errors=True)  # the resume state, now the outputs exist


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", __doc__, body, add_args=add_args, item=lambda a: a.model,
                       tags=lambda c, a: {"method": a.model, "seed": c.seed},
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "sample", "fid")
                                            + (("pipeline", "clip", "benchmarks") if c.task == "t2i" else ())}))
