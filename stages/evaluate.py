"""Stage `evaluate`: FID of one model, computed while sampling (no image files), and a sample grid.

--model pretrained | ensemble | merged | plain | <baseline>. DDIM (params `sample`: 50 steps, eta 0) from
per-image seeds shared by every model, so all models start from the same noise; FID against the held-out
reference statistics in the profile's feature space. `ensemble` is DeMe before merge: model i serves the
steps whose timestep lies in interval i (PAPER.md §1.7). A single-model method trained with several seeds
(`baselines.seeds`) is evaluated once per seed: the metrics hold the mean, the standard deviation and every
seed's FID. Writes metrics/<profile>/evaluate/<model>.json and samples/<profile>/<model>.png.
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


def body(ctx):
    import time

    from deme.evaluation import feature_space, sample_features
    from deme.io import sample_seeds, write_json
    from deme.metrics.fid import Stats, fid_of_features
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.sample import save_grid

    import numpy as np

    cfg, name, paths = ctx.cfg, ctx.args.model, Paths(ctx.cfg.profile)
    models = load(name, cfg, paths)
    space, ref = feature_space(cfg, ctx.device), Stats.load(paths.fid_ref)
    seeds = sample_seeds("eval", cfg.sample.num_samples, cfg.seed)
    fids, first, wall = [], None, 0.0
    for k, model in enumerate(models):
        t0 = time.perf_counter()
        feats, kept = sample_features(model, seeds, cfg, space, ctx.device, keep=cfg.sample.grid_size,
                                      desc=f"evaluate@{name}" + (f" seed {k}" if len(models) > 1 else ""))
        wall += time.perf_counter() - t0
        fids.append(fid_of_features(feats, ref))
        first = kept if first is None else first
    fid = float(np.mean(fids))
    n_models = len(cfg.deme.intervals) if name == "ensemble" else 1
    out = {"fid": fid, "fid_std": float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0, "fid_seeds": fids,
           "training_seeds": len(fids), "num_samples": len(seeds), "sampler": cfg.sample.sampler,
           "steps": cfg.sample.steps, "eta": cfg.sample.eta, "models": n_models,
           "parameters_per_model": count_parameters(models[0]) // n_models,
           "images_per_s": len(seeds) * len(models) / wall, **space.describe()}
    write_json(paths.metrics("evaluate", name), out)
    grid = paths.samples(name)
    save_grid(first, grid, nrow=int(len(first) ** 0.5))
    ctx.run.log_metrics({"fid": fid, "images_per_s": out["images_per_s"]})
    ctx.run.log_artifact(grid, "samples")
    spread = f" ± {out['fid_std']:.4f} over {len(fids)} training seeds" if len(fids) > 1 else ""
    ctx.note(f"{name}: FID {fid:.4f}{spread} from {len(seeds)} samples ({out['images_per_s']:.1f} img/s)")
    ctx.wrote(paths.metrics("evaluate", name))
    ctx.wrote(grid)


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", __doc__, body, add_args=add_args, item=lambda a: a.model,
                       tags=lambda c, a: {"method": a.model, "seed": c.seed},
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "sample", "fid")}))
