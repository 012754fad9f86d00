"""Stage `fid_ref`: FID reference statistics and the data-vs-data floor.

Features of the held-out reference set through clean-fid's model-feature path give the reference
statistics (stats/<profile>/fid_ref_<mode>.npz, one per clean-fid mode). The reference set is `fid.reference`:
the held-out images (tiny), the training images (CIFAR10 / LSUN convention, docs/paper.md §8.3; optionally a
seeded subset of `fid.reference_samples`), or clean-fid's cached built-in statistics (`fid.builtin`, e.g.
cifar10/train). With a training-set or built-in reference, the held-out set gets statistics of its own
(stats/<profile>/fid_heldout_<mode>.npz) and the evaluation reports FID against both. The floor is the FID of as many images of the *other* set as the
evaluation generates against those statistics: no model can be expected to beat it at that sample size.
Runs split over processes under `accelerate launch`. Resumable: finished feature batches are kept in
.ckpt/<profile>/fid_ref/ until the outputs are written (deme/resume.py).

Text-to-image (`--t2i`, docs/paper.md §3.2, §8.3): one reference per FID benchmark from the prepare stage's
images at benchmarks.fid_resolution (COCO: all val2014 images; ImageNet: the val images; the tiny stand-ins:
held-out shapes), stats/<profile>/fid_<bench>_<mode>.npz; the floor is as many training images as the
benchmark has prompts, when the training images are at that resolution. The merge search scores against
stats/<profile>/fid_coco_search_<mode>.npz: the coco_proxy prompts' images, which the COCO reference leaves out.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


BENCH_FID = ("coco", "imagenet")  # PartiPrompts is CLIP only (docs/paper.md §3.2)
SEARCH = "coco_search"  # the merge search's COCO reference, disjoint from the evaluation's


def shards(ctx, spaces, label, source, images):
    """The resume state of one feature pass: finished batches of ``images`` (read from ``source``)."""
    from deme.evaluation import describe
    from deme.paths import Paths
    from deme.resume import Shards, file_id

    fingerprint = {"source": file_id(source), "count": len(images), "spaces": describe(spaces),
                   "batch_size": ctx.cfg.fid.batch_size, "seed": ctx.cfg.seed,
                   "subset": (ctx.cfg.fid.reference_samples, ctx.cfg.benchmarks.reference_samples
                              if ctx.cfg.task == "t2i" else None)}
    return Shards(Paths(ctx.cfg.profile).ckpt("fid_ref") / label, fingerprint, main=ctx.is_main)


def bench_refs(ctx):
    import json
    import shutil

    import numpy as np

    from deme.data import load_images
    from deme.evaluation import array_features, describe, feature_spaces
    from deme.io import derive_seed, write_json
    from deme.metrics.fid import Stats, fid_of_features
    from deme.paths import Paths

    cfg, paths, b = ctx.cfg, Paths(ctx.cfg.profile), ctx.cfg.benchmarks
    spaces = feature_spaces(cfg, ctx.device)
    train = load_images(paths.train)
    out = {"benchmarks": list(BENCH_FID), **describe(spaces)}
    for bench in (*BENCH_FID, SEARCH):
        images = load_images(paths.bench_ref(bench))
        if bench == SEARCH:  # the merge search's reference: the proxy prompts' images, all of them
            feats = array_features(images, spaces, cfg.fid.batch_size, desc="merge search reference",
                                   shards=shards(ctx, spaces, bench, paths.bench_ref(bench), images))
            if ctx.is_main:
                out[f"{bench}_num_ref"] = len(images)
                for mode, space in spaces.items():
                    Stats.of(feats[mode]).save(paths.bench_stats(bench, mode), **space.describe(),
                                               reference="the coco_proxy prompts' images (merge search)")
                    ctx.wrote(paths.bench_stats(bench, mode))
            continue
        if b.reference_samples and b.reference_samples < len(images):
            rng = np.random.default_rng(derive_seed(cfg.seed, "fid_ref", bench))
            images = images[np.sort(rng.choice(len(images), b.reference_samples, replace=False))]
        feats = array_features(images, spaces, cfg.fid.batch_size, desc=f"{bench} reference",
                               shards=shards(ctx, spaces, bench, paths.bench_ref(bench), images))
        n = len(json.loads(paths.prompts(bench).read_text())["prompts"])
        floor = (array_features(train[:n], spaces, cfg.fid.batch_size, desc=f"{bench} floor",
                                shards=shards(ctx, spaces, f"{bench}-floor", paths.train, train[:n]))
                 if train.shape[1] == b.fid_resolution else None)
        if not ctx.is_main:
            continue
        out[f"{bench}_num_ref"] = len(images)
        for mode, space in spaces.items():
            stats = Stats.of(feats[mode])
            stats.save(paths.bench_stats(bench, mode), **space.describe(), reference=f"{bench} reference images")
            ctx.wrote(paths.bench_stats(bench, mode))
            if floor is not None:
                out[f"{bench}_fid_floor_{mode}"] = fid_of_features(floor[mode][:n], stats)
        if floor is not None:
            out[f"{bench}_fid_floor"] = out[f"{bench}_fid_floor_{next(iter(spaces))}"]
            ctx.note(f"{bench}: {len(images)} reference images; floor FID {out[f'{bench}_fid_floor']:.3f} "
                     f"({min(n, len(train))} training images)")
    if ctx.is_main:
        write_json(paths.metrics("fid_ref"), out)
        ctx.run.log_metrics({k: v for k, v in out.items() if "floor" in k})
        ctx.wrote(paths.metrics("fid_ref"))
        shutil.rmtree(paths.ckpt("fid_ref"), ignore_errors=True)


def body(ctx):
    import shutil

    import numpy as np

    from deme.data import load_images
    from deme.evaluation import array_features, describe, feature_spaces
    from deme.io import atomic_write_npy, derive_seed, write_json
    from deme.metrics.fid import Stats, builtin_stats, fid_of_features
    from deme.paths import Paths

    cfg, paths, f = ctx.cfg, Paths(ctx.cfg.profile), ctx.cfg.fid
    if cfg.task == "t2i":
        return bench_refs(ctx)
    spaces = feature_spaces(cfg, ctx.device)
    heldout, train = load_images(paths.ref), load_images(paths.train)
    if f.reference == "builtin":  # clean-fid's cached statistics, per mode (docs/paper.md §8.3)
        dataset, split = f.builtin.split("/")
        refs = {m: builtin_stats(dataset, split, cfg.data.resolution, m) for m in spaces}
        num_ref, ref_label = "?", f"clean-fid built-in {f.builtin}"
    else:
        ref_images = heldout if f.reference == "ref" else train
        if f.reference_samples and f.reference_samples < len(ref_images):  # a seeded subset, kept in order
            rng = np.random.default_rng(derive_seed(cfg.seed, "fid_ref"))
            ref_images = ref_images[np.sort(rng.choice(len(ref_images), f.reference_samples, replace=False))]
        feats = array_features(ref_images, spaces, f.batch_size, desc=f"reference ({f.reference})",
                               shards=shards(ctx, spaces, "reference", paths.ref if f.reference == "ref" else paths.train,
                                             ref_images))
        refs = {m: Stats.of(x) for m, x in feats.items()}
        num_ref, ref_label = len(ref_images), {"ref": "held-out images", "train": "training images"}[f.reference]
    # a held-out reference beside a training-set one, where the data has a held-out set (docs/paper.md §8.3)
    held = (array_features(heldout, spaces, f.batch_size, desc="held-out reference",
                           shards=shards(ctx, spaces, "heldout", paths.ref, heldout))
            if f.reference != "ref" else None)
    # the search reference: images of the set the evaluation's reference does not contain (the merge and scale
    # searches must not be tuned on the images they are evaluated against); its first images give the floor
    other = train if f.reference == "ref" else heldout
    n = min(cfg.sample.num_samples, len(other))
    n_search = min(len(other), max(n, num_ref if isinstance(num_ref, int) else len(heldout)))
    search_feats = (array_features(other[:n_search], spaces, f.batch_size, desc="search reference",
                                   shards=shards(ctx, spaces, "search", paths.train, other[:n_search]))
                    if held is None else held)
    if not ctx.is_main:
        return
    out = {"num_ref": num_ref, "reference": f.reference, "reference_set": ref_label, "num_floor": n,
           "num_search": len(next(iter(search_feats.values()))), "num_heldout": len(heldout) if held else 0,
           **describe(spaces)}
    rng = np.random.default_rng(derive_seed(cfg.seed, "kid_features"))
    for mode, space in spaces.items():
        refs[mode].save(paths.fid_ref(mode), **space.describe(), reference=ref_label)
        ctx.wrote(paths.fid_ref(mode))
        search = "held-out images" if held is not None else f"{len(search_feats[mode])} {'training' if f.reference == 'ref' else 'held-out'} images"
        Stats.of(search_feats[mode]).save(paths.fid_search(mode), **space.describe(), reference=search)
        ctx.wrote(paths.fid_search(mode))
        if f.reference != "builtin":  # KID needs the reference features themselves (built-in stats have none)
            x = feats[mode]
            keep = np.sort(rng.choice(len(x), min(len(x), 10_000), replace=False))
            atomic_write_npy(paths.ref_features(mode), np.asarray(x[keep], np.float32))
            ctx.wrote(paths.ref_features(mode))
        out[f"fid_floor_{mode}"] = fid_of_features(search_feats[mode][:n], refs[mode])
        if held:
            Stats.of(held[mode]).save(paths.fid_heldout(mode), **space.describe(), reference="held-out images")
            ctx.wrote(paths.fid_heldout(mode))
    out["fid_floor"] = out[f"fid_floor_{next(iter(spaces))}"]
    write_json(paths.metrics("fid_ref"), out)
    ctx.run.log_metrics({k: v for k, v in out.items() if k.startswith("fid_floor")})
    floor_set = "training" if f.reference == "ref" else "held-out"
    ctx.note(f"data-vs-data floor: FID {out['fid_floor']:.3f} ({n} {floor_set} images vs {num_ref} {ref_label})")
    ctx.wrote(paths.metrics("fid_ref"))
    shutil.rmtree(paths.ckpt("fid_ref"), ignore_errors=True)  # the resume state, once the outputs are written


if __name__ == "__main__":
    sys.exit(run_stage("fid_ref", __doc__, body,
                       params=lambda c, a: {"fid": c.to_dict()["fid"], "sample.num_samples": c.sample.num_samples,
                                            **({"benchmarks": c.to_dict()["benchmarks"]} if c.task == "t2i" else {})}))
