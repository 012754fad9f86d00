"""Stage `data`: generate the tiny profile's dataset (PAPER.md §8.4, embedded default).

Writes data/<profile>/train.npz and data/<profile>/ref.npz (a disjoint held-out reference set drawn with
another seed), uint8 16x16 RGB images of coloured shapes with attribute labels and captions, plus a
sample grid and counts in metrics/<profile>/data.json. Deterministic from params `seed`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def body(ctx):
    import numpy as np

    from deme.data import save_set
    from deme.data.shapes import SHAPES, generate_shapes
    from deme.io import derive_seed, write_json
    from deme.paths import Paths
    from deme.sample import save_grid

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    d = cfg.data
    train = generate_shapes(d.num_train, derive_seed(cfg.seed, "data", "train"), d.resolution)
    ref = generate_shapes(d.num_ref, derive_seed(cfg.seed, "data", "ref"), d.resolution)
    save_set(paths.train, train)
    save_set(paths.ref, ref)
    ctx.wrote(paths.train, f"{len(train)} images")
    ctx.wrote(paths.ref, f"{len(ref)} held-out images")
    grid = paths.samples("data")
    save_grid(train.images[:64], grid, nrow=8)
    ctx.wrote(grid)
    ctx.run.log_artifact(grid, "samples")
    counts = {f"train_{name}": int(np.sum(train.shape == i)) for i, name in enumerate(SHAPES)}
    write_json(paths.metrics("data"), {"num_train": len(train), "num_ref": len(ref), **counts})
    ctx.wrote(paths.metrics("data"))


if __name__ == "__main__":
    sys.exit(run_stage("data", __doc__, body, params=lambda c, a: {"seed": c.seed, "data": c.to_dict()["data"]}))
