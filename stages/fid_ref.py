"""Stage `fid_ref`: FID reference statistics and the data-vs-data floor.

Features of the held-out reference set through clean-fid's model-feature path give the reference
statistics (stats/<profile>/fid_ref_<mode>.npz, one per clean-fid mode). The reference set is `fid.reference`:
the held-out images (tiny) or the training images (CIFAR10 / LSUN convention, PAPER.md §8.3), optionally a
seeded subset of `fid.reference_samples`. The floor is the FID of as many images of the *other* set as the
evaluation generates against those statistics: no model can be expected to beat it at that sample size.
Runs split over processes under `accelerate launch`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def body(ctx):
    import numpy as np

    from deme.data import load_images
    from deme.evaluation import array_features, describe, feature_spaces
    from deme.io import derive_seed, write_json
    from deme.metrics.fid import Stats, fid_of_features
    from deme.paths import Paths

    cfg, paths, f = ctx.cfg, Paths(ctx.cfg.profile), ctx.cfg.fid
    spaces = feature_spaces(cfg, ctx.device)
    sets = {"ref": load_images(paths.ref), "train": load_images(paths.train)}
    ref_images, other = sets[f.reference], sets["train" if f.reference == "ref" else "ref"]
    if f.reference_samples and f.reference_samples < len(ref_images):  # a seeded subset, kept in order
        rng = np.random.default_rng(derive_seed(cfg.seed, "fid_ref"))
        ref_images = ref_images[np.sort(rng.choice(len(ref_images), f.reference_samples, replace=False))]
    ref_feats = array_features(ref_images, spaces, f.batch_size, desc=f"reference ({f.reference})")
    n = min(cfg.sample.num_samples, len(other))
    floor_feats = array_features(other[:n], spaces, f.batch_size, desc="floor")
    if not ctx.is_main:
        return
    out = {"num_ref": len(ref_images), "reference": f.reference, "num_floor": n, **describe(spaces)}
    for mode, space in spaces.items():
        ref = Stats.of(ref_feats[mode])
        ref.save(paths.fid_ref(mode), **space.describe(), reference=f.reference)
        out[f"fid_floor_{mode}"] = fid_of_features(floor_feats[mode], ref)
        ctx.wrote(paths.fid_ref(mode))
    out["fid_floor"] = out[f"fid_floor_{next(iter(spaces))}"]
    write_json(paths.metrics("fid_ref"), out)
    ctx.run.log_metrics({k: v for k, v in out.items() if k.startswith("fid_floor")})
    floor_set = "training" if f.reference == "ref" else "held-out"
    ctx.note(f"data-vs-data floor: FID {out['fid_floor']:.3f} ({n} {floor_set} images vs {len(ref_images)} "
             f"{f.reference} images)")
    ctx.wrote(paths.metrics("fid_ref"))


if __name__ == "__main__":
    sys.exit(run_stage("fid_ref", __doc__, body,
                       params=lambda c, a: {"fid": c.to_dict()["fid"], "sample.num_samples": c.sample.num_samples}))
