"""Stage `prepare`: the training and reference images in the suite's format (data/<profile>/).

- `data.kind: shapes` (tiny profiles): generate 16x16 RGB images of coloured shapes with attribute labels
  and captions; the held-out reference set is drawn with another seed. Deterministic from params `seed`.
- Real kinds (cifar10, lsun_church, lsun_bedroom; PAPER.md §8.2): read the dataset the user has at
  `data.path` (CIFAR10 python batches, the parquet files of tglcourse/lsun_church_train, an image folder, or
  an LSUN lmdb export; `data.format: auto` detects which), resize the shorter side to `data.resolution`
  and crop (PAPER.md §1.6), and write train.npy / ref.npy plus manifest.json with sha256 checksums and
  every skipped file. Corrupt images are skipped and listed, or fatal with `data.on_corrupt: fail`.

Outputs: data/<profile>/{train,ref}.npy (uint8 [n, H, W, 3]), a sample grid, metrics/<profile>/data.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402


def shapes(ctx, out):
    import numpy as np

    from deme.data import save_set
    from deme.data.shapes import SHAPES, generate_shapes
    from deme.io import derive_seed

    cfg, d = ctx.cfg, ctx.cfg.data
    train = generate_shapes(d.num_train, derive_seed(cfg.seed, "data", "train"), d.resolution)
    ref = generate_shapes(d.num_ref, derive_seed(cfg.seed, "data", "ref"), d.resolution)
    save_set(out / "train.npy", train)
    save_set(out / "ref.npy", ref)
    return {"num_train": len(train), "num_ref": len(ref),
            **{f"train_{name}": int(np.sum(train.shape == i)) for i, name in enumerate(SHAPES)}}


# How to get each dataset on a connected machine (README, Paper-scale profiles; PAPER.md §8.2).
FETCH = {
    "cifar10": "fetch it with: curl -LO https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz && "
               "mkdir -p datasets/cifar10 && tar xzf cifar-10-python.tar.gz -C datasets/cifar10",
    "lsun_church": "fetch it with: huggingface-cli download tglcourse/lsun_church_train --repo-type dataset "
                   "--local-dir datasets/lsun_church_train",
    "lsun_bedroom": "put the LSUN bedroom_train_lmdb export (pip install lmdb) or a folder of its images there "
                    "(https://github.com/fyu/lsun: python download.py -c bedroom)",
}


def real(ctx, out):
    from deme.data.readers import DataError, detect_format, prepare

    d = ctx.cfg.data
    if not d.path:
        raise StageError(f"data.path: set it to where the {d.kind} dataset lives (see README, Paper-scale profiles)")
    if not Path(d.path).exists():
        raise StageError(f"data.path={d.path}: not found; {FETCH.get(d.kind, 'see README, Paper-scale profiles')}")
    try:
        fmt = detect_format(d.path) if d.format == "auto" else d.format
        manifest = prepare(fmt, d.path, out, resolution=d.resolution, crop=d.crop, num_train=d.num_train,
                           num_ref=d.num_ref, ref_path=d.ref_path, seed=ctx.cfg.seed, on_corrupt=d.on_corrupt)
    except DataError as e:
        raise StageError(str(e)) from None
    if manifest.get("skipped"):
        ctx.note(f"skipped {len(manifest['skipped'])} unreadable images (listed in data/{ctx.cfg.profile}/manifest.json)")
    return {k: manifest[k] for k in ("num_train", "num_ref") if k in manifest} | {
        "skipped": len(manifest.get("skipped", [])), "format": fmt}


def body(ctx):
    from deme.data import load_images
    from deme.io import atomic_dir, write_json
    from deme.paths import Paths
    from deme.sample import save_grid

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    with atomic_dir(paths.train.parent) as tmp:  # a failure leaves the previous data/<profile> untouched
        counts = (shapes if cfg.data.kind == "shapes" else real)(ctx, Path(tmp))
    ctx.wrote(paths.train.parent, f"{counts['num_train']} training + {counts['num_ref']} reference images")
    grid = paths.samples("data")
    save_grid(load_images(paths.train)[:64], grid, nrow=8, scale=max(1, 64 // cfg.data.resolution))
    ctx.wrote(grid)
    ctx.run.log_artifact(grid, "samples")
    ctx.run.log_metrics({k: v for k, v in counts.items() if isinstance(v, int)})
    write_json(paths.metrics("data"), counts)
    ctx.wrote(paths.metrics("data"))


if __name__ == "__main__":
    sys.exit(run_stage("prepare", __doc__, body, params=lambda c, a: {"seed": c.seed, "data": c.to_dict()["data"]}))
