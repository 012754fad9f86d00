"""Stage `fid_ref`: FID reference statistics and the data-vs-data floor.

Features of the held-out reference set through clean-fid's model-feature path give the reference
statistics (stats/<profile>/fid_ref.npz). The floor is the FID of as many *training* images as the
evaluation generates against those statistics: no model can be expected to beat it at that sample size.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def body(ctx):
    from deme.data import load_images
    from deme.evaluation import feature_space
    from deme.io import write_json
    from deme.metrics.fid import Stats, array_batches, features, fid_of_features
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    space = feature_space(cfg, ctx.device)
    bs = cfg.fid.batch_size
    ref_images = load_images(paths.ref)
    ref = Stats.of(features(array_batches(ref_images, bs), len(ref_images), space, bs, desc="reference"))
    ref.save(paths.fid_ref, **space.describe())
    n = min(cfg.sample.num_samples, cfg.data.num_train)
    train_images = load_images(paths.train)[:n]
    floor = fid_of_features(features(array_batches(train_images, bs), n, space, bs, desc="floor"), ref)
    out = {"fid_floor": floor, "num_ref": len(ref_images), "num_floor": n, **space.describe()}
    write_json(paths.metrics("fid_ref"), out)
    ctx.run.log_metrics({"fid_floor": floor})
    ctx.note(f"data-vs-data floor: FID {floor:.3f} ({n} training images vs {len(ref_images)} held-out)")
    ctx.wrote(paths.fid_ref)
    ctx.wrote(paths.metrics("fid_ref"))


if __name__ == "__main__":
    sys.exit(run_stage("fid_ref", __doc__, body,
                       params=lambda c, a: {"fid": c.to_dict()["fid"], "sample.num_samples": c.sample.num_samples}))
