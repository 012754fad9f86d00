"""Stage `analyze@<name>`: the raw data of one of the paper's analysis figures (docs/paper.md §4), then the figure.

Writes analysis/<profile>/<name>.npz (the data, a DVC output) and figures/<profile>/<name>/ (PNG + PDF drawn
from that npz alone: `--plot-only` redraws them without recomputing). Every loss is the eps-MSE on one fixed
evaluation set: `analysis.samples` training images (seeded choice) with fixed noise.

  gradsim      Fig. 1a: cosine similarity of the pretrained model's eps-MSE gradients at
               `analysis.gradsim_timesteps` evenly spaced timesteps, same images and noise for every t;
               random-projection sketch to `analysis.sketch_dim` dimensions (0 = exact)
  activations  Fig. 2: channel vs spatial change of every block's output between the pretrained model and
               the interval model `analysis.activation_interval` retrained without channel-wise projection
  landscape    Fig. 4: the pretrained model's loss on a filter-normalised random plane, for the full range
               and each interval
  plane        Fig. 6a: the full-range loss on the plane of two task vectors (all pairs, or I_1 and I_N),
               with theta, theta_a, theta_b and the merged model marked
  taskvec      Fig. 6b and 7: per-module task-vector statistics per interval, the N x N cosine matrix
               (overall and per module) and the seed noise floor; with `deme.seeds` >= 2 the cosines and
               norms of every training seed and the floor over every pair of seeds, otherwise the
               intervals `analysis.floor_intervals` retrained with another seed
  sequence     the reviewers' sequence view: x0 predictions at the end of each interval for the pretrained,
               interval, ensemble and merged models from the same noise

Resumable: the models an analysis trains itself resume from their checkpoints, and the gradient groups
(gradsim) and loss-plane points (landscape, plane) already computed are kept in .ckpt/<profile>/analysis-<name>/
until the npz is written (deme/resume.py).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402

ANALYSES = ("gradsim", "activations", "landscape", "plane", "taskvec", "sequence")
FIGURES = {"gradsim": ("fig1a",), "activations": ("fig2",), "landscape": ("fig4",), "plane": ("fig6a",),
           "taskvec": ("fig6b", "fig7"), "sequence": ("fig_sequence",)}


def add_args(ap):
    ap.add_argument("--what", required=True, choices=ANALYSES, help="which analysis")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figures from the saved npz only")


def eval_set(cfg, paths):
    """The fixed evaluation set: `analysis.samples` training images (seeded choice) and their noise."""
    import numpy as np
    import torch

    from deme.data import load_images
    from deme.io import derive_seed
    from deme.train import to_model_range

    images = load_images(paths.train)
    n = min(cfg.analysis.samples, len(images))
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "analysis", "images"))
    idx = np.sort(torch.randperm(len(images), generator=g)[:n].numpy())
    x0 = to_model_range(torch.from_numpy(np.ascontiguousarray(images[idx])))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "analysis", "noise")))
    return x0, noise


def interval_models(cfg, paths, seed: int = 0):
    """The interval models of one training seed (the analyses use the first)."""
    from deme.models import load_model

    missing = [str(paths.interval(i, seed)) for i in cfg.deme.intervals if not paths.interval(i, seed).exists()]
    if missing:
        raise StageError(f"{', '.join(missing)}: interval model missing; make it with: dvc repro finetune")
    return {f"I{i}": load_model(paths.interval(i, seed)) for i in cfg.deme.intervals}


def base_state(cfg):
    from deme.models import load_pretrained
    from deme.projection import add_channel_projection

    base = load_pretrained(cfg)
    if cfg.deme.channel_projection:
        add_channel_projection(base)
    return base


def merge_weights(paths):
    from deme.models import model_meta

    if not paths.merged(0).exists():
        raise StageError(f"{paths.merged(0)}: merged model missing; make it with: dvc repro merge")
    return model_meta(paths.merged(0))["weights"]


def shards(ctx, what, *models, **more):
    """The resume state of one analysis: finished pieces, valid for these models' weights and settings."""
    from deme.paths import Paths
    from deme.resume import Shards, content_id, state_digest

    settings = ctx.cfg.to_dict()
    fingerprint = {"analysis": settings["analysis"], "seed": ctx.cfg.seed, "schedule": settings["schedule"],
                   "sample": settings["sample"], "finetune": settings["finetune"], "deme": settings["deme"],
                   "data": content_id(Paths(ctx.cfg.profile).train), "models": [state_digest(m) for m in models],
                   **more}
    return Shards(Paths(ctx.cfg.profile).ckpt(f"analysis-{what}"), fingerprint, main=ctx.is_main)


@dataclass
class Inputs:
    """What every analysis starts from: the config, paths, T, N, the cumulative alphas, the analysis's own
    seed and the fixed evaluation set (images x0 and their noise)."""

    ctx: object
    what: str
    cfg: object
    paths: object
    T: int
    N: int
    ab: object
    seed: int
    x0: object
    noise: object

    @classmethod
    def of(cls, ctx, what):
        from deme.io import derive_seed
        from deme.paths import Paths
        from deme.schedule import alphas_cumprod

        cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
        return cls(ctx, what, cfg, paths, cfg.schedule.num_train_timesteps, cfg.deme.n,
                   alphas_cumprod(cfg.schedule).float(), derive_seed(cfg.seed, "analysis", what), *eval_set(cfg, paths))


def gradsim(z):
    import numpy as np

    from deme.analysis.gradsim import compute_gradsim
    from deme.models import load_pretrained
    from deme.report.claims import gradient_agreement

    a = z.cfg.analysis
    ts = np.unique(np.linspace(0, z.T - 1, min(a.gradsim_timesteps, z.T)).round().astype(int))
    model = load_pretrained(z.cfg)
    out = compute_gradsim(model, z.x0, z.noise, ts, z.ab, micro_batch=a.batch_size, sketch_dim=a.sketch_dim,
                          seed=z.seed, progress=True, shards=shards(z.ctx, z.what, model))
    adj, far = gradient_agreement(out["S"], out["timesteps"])
    return out, {"cos_adjacent": adj, "cos_distant": far}


def activations(z):
    import dataclasses

    import numpy as np
    import torch

    from deme.analysis.activations import compute_activations
    from deme.data import load_images
    from deme.models import load_pretrained
    from deme.schedule import interval_bounds
    from deme.sweep import train_interval

    cfg, a = z.cfg, z.cfg.analysis
    i = a.activation_interval or z.N
    nocp = dataclasses.replace(cfg, deme=dataclasses.replace(cfg.deme, channel_projection=False))
    post = train_interval(nocp, i, load_images(z.paths.train), z.ctx.device, z.paths.ckpt(extra_models(cfg, z.what)[0]),
                          desc=f"interval {i} without CP (Fig. 2)")
    lo, hi = interval_bounds(i, z.N, z.T)
    t = torch.randint(lo, hi, (len(z.x0),), generator=torch.Generator().manual_seed(z.seed))
    out = compute_activations(load_pretrained(cfg), post, z.x0, z.noise, t, z.ab, micro_batch=a.batch_size,
                              seed=z.seed)
    out["interval"] = np.asarray([lo, hi])
    return out, {"delta_channel_median": float(np.median(out["da"])),
                 "delta_spatial_median": float(np.median(out["ds"]))}


def landscape(z):
    from deme.analysis.landscape import compute_landscape
    from deme.models import load_pretrained
    from deme.schedule import interval_bounds

    a = z.cfg.analysis
    ranges = [(0, z.T)] + [interval_bounds(i, z.N, z.T) for i in z.cfg.deme.intervals]
    model = load_pretrained(z.cfg)
    out = compute_landscape(model, z.x0, z.noise, ranges, z.ab, grid=a.landscape_grid, span=a.landscape_span,
                            t_draws=a.t_draws, seed=z.seed, micro_batch=a.batch_size, progress=True,
                            shards=shards(z.ctx, z.what, model, ranges=ranges))
    return out, {f"origin_loss_{lo}_{hi}": float(v) for (lo, hi), v in zip(ranges, out["origin_loss"])}


def plane(z):
    from deme.analysis.landscape import range_losses
    from deme.analysis.taskvec import compute_planes

    a = z.cfg.analysis
    base = base_state(z.cfg)
    models = interval_models(z.cfg, z.paths)
    loss_fn, _ = range_losses(z.x0, z.noise, [(0, z.T)], z.ab, t_draws=a.t_draws, seed=z.seed,
                              micro_batch=a.batch_size)
    pairs = None if a.plane_pairs == "all" else [(0, z.N - 1)]
    theta = {k: v.detach().clone() for k, v in base.state_dict().items()}
    weights = merge_weights(z.paths)
    out = compute_planes(base, theta, {k: m.state_dict() for k, m in models.items()},
                         lambda m: float(loss_fn(m)[0]), pairs=pairs, merge_weights=weights,
                         grid=a.plane_grid, margin=a.plane_margin, progress=True,
                         shards=shards(z.ctx, z.what, base, *models.values(), weights=weights))
    return out, {"loss_theta": float(out["point_loss"][0, 0])}


def taskvec(z):
    import numpy as np

    from deme.analysis.taskvec import compute_cosines, compute_layer_stats, compute_seed_geometry, seed_pairs
    from deme.data import load_images
    from deme.schedule import interval_bounds
    from deme.sweep import train_interval

    cfg, N = z.cfg, z.N
    base = base_state(cfg).state_dict()
    models = {k: m.state_dict() for k, m in interval_models(cfg, z.paths).items()}
    floor, geometry = {}, {}
    if cfg.deme.seeds >= 2:  # every seed's geometry; the seed floor: every pair of seeds of each interval
        by_seed = [models] + [{k: m.state_dict() for k, m in interval_models(cfg, z.paths, seed=s).items()}
                              for s in range(1, cfg.deme.seeds)]
        floor, geometry = seed_pairs(by_seed), compute_seed_geometry(base, by_seed)
    else:  # the same interval trained again with another seed (arXiv 2410.06664, Fig. 7)
        images = load_images(z.paths.train)
        for i in cfg.analysis.floor_intervals:
            twin = train_interval(cfg, i, images, z.ctx.device, z.paths.ckpt(f"analysis-seed2-{i}"),
                                  seed_tag=("seed", 2), desc=f"interval {i}, second seed (Fig. 7 floor)")
            floor[f"I{i}"] = (models[f"I{i}"], twin.state_dict())
    bounds = [interval_bounds(i, N, z.T) for i in cfg.deme.intervals]
    out = {**compute_layer_stats(base, models, bounds, z.T), **compute_cosines(base, models, floor), **geometry}
    out["norms"] = np.sqrt((out["l2"] ** 2).sum(1))
    off = out["cos"][~np.eye(N, dtype=bool)] if N > 1 else np.zeros(1)
    return out, {"cos_offdiag_max_abs": float(np.abs(off).max()),
                 **({"cos_seed_floor": float(np.mean(out["floor"]))} if len(out["floor"]) else {})}


def sequence(z):
    from deme.analysis.sequence import compute_sequence
    from deme.io import sample_seeds
    from deme.merge import merged_model, task_vector
    from deme.models import load_pretrained
    from deme.sample import Ensemble, initial_noise

    cfg = z.cfg
    models = interval_models(cfg, z.paths)
    base = base_state(cfg)
    vectors = [task_vector(m.state_dict(), base.state_dict()) for m in models.values()]
    named = {"pretrained": load_pretrained(cfg), **models, "ensemble": Ensemble(list(models.values()), z.T),
             "merged": merged_model(base, vectors, merge_weights(z.paths))}
    z0 = initial_noise(sample_seeds("analysis", cfg.analysis.sequence_samples, cfg.seed),
                       (3, cfg.data.resolution, cfg.data.resolution))
    return compute_sequence(named, z0, cfg.schedule, steps=cfg.sample.steps, n_intervals=z.N), {}


COMPUTE = {"gradsim": gradsim, "activations": activations, "landscape": landscape, "plane": plane,
           "taskvec": taskvec, "sequence": sequence}


def compute(ctx, what):
    """The npz content of one analysis and a few headline numbers for MLflow."""
    if what not in COMPUTE:
        raise StageError(f"unknown analysis {what!r}")
    return COMPUTE[what](Inputs.of(ctx, what))


def extra_models(cfg, what):
    """The .ckpt/ labels of the interval models an analysis trains itself (Fig. 2 without CP, Fig. 7's twins)."""
    if what == "activations":
        return [f"analysis-nocp-{cfg.analysis.activation_interval or cfg.deme.n}"]
    if what == "taskvec" and cfg.deme.seeds < 2:
        return [f"analysis-seed2-{i}" for i in cfg.analysis.floor_intervals]
    return []


def plot(what, npz, folder):
    from deme.analysis import figures

    return [getattr(figures, f)(npz, folder / f"{f}.png") for f in FIGURES[what]]


def body(ctx):
    import io
    import shutil

    import numpy as np

    from deme.io import atomic_dir, atomic_write_bytes
    from deme.paths import Paths

    cfg, what = ctx.cfg, ctx.args.what
    if cfg.task != "image":
        raise StageError("the analysis stages run on image profiles (UNet2DModel); text-to-image is not wired yet")
    paths = Paths(cfg.profile)
    npz, folder = paths.analysis(what), paths.figures(what)
    if not ctx.args.plot_only:
        data, headline = compute(ctx, what)
        if not ctx.is_main:
            return
        buf = io.BytesIO()
        np.savez(buf, **data)
        atomic_write_bytes(npz, buf.getvalue())
        ctx.run.log_metrics(headline)
        for k, v in headline.items():
            ctx.note(f"{what}: {k} = {v:.4f}")
    elif not npz.exists():
        raise StageError(f"{npz}: no saved data; run without --plot-only first")
    with atomic_dir(folder) as tmp:
        pngs = plot(what, npz, tmp)
        for f in sorted(tmp.iterdir()):
            ctx.run.log_artifact(f, "figures")
    if not ctx.args.plot_only:
        for ck in extra_models(cfg, what) + [f"analysis-{what}"]:  # the resume state, once the data is written
            shutil.rmtree(paths.ckpt(ck), ignore_errors=True)
        ctx.wrote(npz)
    for p in pngs:
        ctx.wrote(folder / p.name)


if __name__ == "__main__":
    sys.exit(run_stage("analyze", __doc__, body, add_args=add_args, item=lambda a: a.what,
                       tags=lambda c, a: {"analysis": a.what},
                       params=lambda c, a: {"analysis": c.to_dict()["analysis"], "seed": c.seed}))
