"""Stage `evaluate`: FID of one model, computed while sampling (no image files), and a sample grid.

--model pretrained | plain | ensemble | merged. DDIM (params `sample`: 50 steps, eta 0) from per-image
seeds shared by every model, so all models start from the same noise; FID against the held-out reference
statistics in the profile's feature space. `ensemble` is DeMe before merge: model i serves the steps whose
timestep lies in interval i (PAPER.md §1.7). Writes metrics/<profile>/evaluate/<model>.json and
samples/<profile>/<model>.png.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402

MODELS = ("pretrained", "plain", "ensemble", "merged")


def add_args(ap):
    ap.add_argument("--model", required=True, choices=MODELS, help="which model to evaluate")


def load(name, cfg, paths):
    from deme.models import load_model, load_pretrained
    from deme.sample import Ensemble

    if name == "pretrained":
        return load_pretrained(cfg)
    if name == "ensemble":
        return Ensemble([load_model(paths.interval(i)) for i in cfg.deme.intervals],
                        cfg.schedule.num_train_timesteps)
    return load_model(getattr(paths, name))


def body(ctx):
    import time

    from deme.evaluation import feature_space, sample_features
    from deme.io import sample_seeds, write_json
    from deme.metrics.fid import Stats, fid_of_features
    from deme.models import count_parameters
    from deme.paths import Paths
    from deme.sample import save_grid

    cfg, name, paths = ctx.cfg, ctx.args.model, Paths(ctx.cfg.profile)
    model = load(name, cfg, paths)
    space, ref = feature_space(cfg, ctx.device), Stats.load(paths.fid_ref)
    seeds = sample_seeds("eval", cfg.sample.num_samples, cfg.seed)
    t0 = time.perf_counter()
    feats, first = sample_features(model, seeds, cfg, space, ctx.device, desc=f"evaluate@{name}",
                                   keep=cfg.sample.grid_size)
    wall = time.perf_counter() - t0
    fid = fid_of_features(feats, ref)
    n_models = len(cfg.deme.intervals) if name == "ensemble" else 1
    out = {"fid": fid, "num_samples": len(seeds), "sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
           "eta": cfg.sample.eta, "models": n_models,
           "parameters_per_model": count_parameters(model) // n_models,
           "images_per_s": len(seeds) / wall, **space.describe()}
    write_json(paths.metrics("evaluate", name), out)
    grid = paths.samples(name)
    save_grid(first, grid, nrow=int(len(first) ** 0.5))
    ctx.run.log_metrics({"fid": fid, "images_per_s": out["images_per_s"]})
    ctx.run.log_artifact(grid, "samples")
    ctx.note(f"{name}: FID {fid:.4f} from {len(seeds)} samples ({out['images_per_s']:.1f} img/s)")
    ctx.wrote(paths.metrics("evaluate", name))
    ctx.wrote(grid)


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", __doc__, body, add_args=add_args, item=lambda a: a.model,
                       tags=lambda c, a: {"method": a.model, "seed": c.seed},
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "sample", "fid")}))
