"""Stage `prepare`: the training and reference images in the suite's format (data/<profile>/).

- `data.kind: shapes` (tiny profiles): generate 16x16 RGB images of coloured shapes with attribute labels
  and captions; the held-out reference set is drawn with another seed. Deterministic from params `seed`.
- Real kinds (cifar10, lsun_church, lsun_bedroom; docs/paper.md §8.2): read the dataset the user has at
  `data.path` (CIFAR10 python batches, the parquet files of tglcourse/lsun_church_train, an image folder, or
  an LSUN lmdb export; `data.format: auto` detects which), resize the shorter side to `data.resolution`
  and crop (docs/paper.md §1.6), and write train.npy / ref.npy plus manifest.json with sha256 checksums and
  every skipped file. Corrupt images are skipped and listed, or fatal with `data.on_corrupt: fail`.
- `data.kind: laion` (sd14; docs/paper.md §8.2): captioned image-text pairs, e.g. BK-SDM's preprocessed 212k
  LAION-Aesthetics 6.5+ folder: images plus metadata.csv (file_name,text), metadata.jsonl or <image>.txt,
  or parquet with a text column. Captions go to {train,ref}.meta.npz; a missing or non-UTF-8 caption is
  skipped with its image and listed (or fatal, naming the file and line).

With --t2i (text-to-image profiles tiny_t2i, micro_t2i, sd14) the stage also writes the zero-shot
benchmarks of docs/paper.md §3.2 from `benchmarks.*`: the prompt sets prompts/{coco,coco_proxy,imagenet,parti}.json
(COCO: the first coco_count captions of BK-SDM's metadata.csv, coco_proxy: the next coco_proxy_count,
for the merge search; ImageNet: imagenet_template x class names x imagenet_per_class; PartiPrompts: all or
parti_count) and the FID references bench/{coco,coco_search,imagenet}.npy at fid_resolution (COCO: val2014
resized, PIL bicubic, without the proxy prompts' images, which are the merge search's reference
coco_search; ImageNet: val, shorter side resized and center-cropped). The files are checked
before the training data is read: a missing one is one line naming benchmarks.<key> and what to fetch, a
bad one names the file and line. Shapes profiles write their own stand-ins into bench_src/ (held-out
captioned shapes, shape x colour class names, compositional rephrasings) and read them back the same way.

Outputs: data/<profile>/{train,ref}.npy (uint8 [n, H, W, 3]), their .meta.npz labels/captions, with --t2i
prompts/*.json, bench/*.npy and bench/manifest.json; a sample grid; metrics/<profile>/data.json (image
counts, and with --t2i the prompts per set, reference images per benchmark and skipped items). Everything
under data/<profile>/ is replaced at once: a failure leaves the previous data untouched.
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


# How to get each dataset on a connected machine (README, Paper-scale profiles; docs/paper.md §8.2).
FETCH = {
    "cifar10": "fetch it with: curl -LO https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz && "
               "mkdir -p datasets/cifar10 && tar xzf cifar-10-python.tar.gz -C datasets/cifar10",
    "lsun_church": "fetch it with: huggingface-cli download tglcourse/lsun_church_train --repo-type dataset "
                   "--local-dir datasets/lsun_church_train",
    "lsun_bedroom": "put the LSUN bedroom_train_lmdb export (pip install lmdb) or a folder of its images there "
                    "(https://github.com/fyu/lsun: python download.py -c bedroom)",
    "laion": "put BK-SDM's preprocessed LAION-Aesthetics V2 6.5+ set there (212,776 images + metadata.csv with "
             "file_name,text; github.com/Nota-NetsPresso/BK-SDM: bash scripts/get_laion_data.sh preprocessed_212k)",
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
                           num_ref=d.num_ref, ref_path=d.ref_path, seed=ctx.cfg.seed, on_corrupt=d.on_corrupt,
                           captions=d.kind == "laion")
    except DataError as e:
        raise StageError(str(e)) from None
    if manifest.get("skipped"):
        ctx.note(f"skipped {len(manifest['skipped'])} unreadable images (listed in data/{ctx.cfg.profile}/manifest.json)")
    return {k: manifest[k] for k in ("num_train", "num_ref") if k in manifest} | {
        "skipped": len(manifest.get("skipped", [])), "format": fmt}


def benchmarks_first(ctx, out, final):
    """t2i, before the (long) training-data read: locate the benchmark files (shapes: write the stand-ins)
    and validate them into prompt sets (docs/paper.md §3.2). Nothing is written outside ``out``."""
    from deme.data.prompts import benchmark_sources, build_prompt_sets
    from deme.data.readers import DataError

    cfg = ctx.cfg
    if cfg.data.kind not in ("shapes", "laion"):
        raise StageError(f"data.kind={cfg.data.kind}: text-to-image profiles need captions (shapes or laion)")
    try:
        src = benchmark_sources(cfg, out, final)
        return src, build_prompt_sets(cfg, src)
    except DataError as e:
        raise StageError(str(e)) from None


def benchmarks_last(ctx, out, final, src, sets):
    """t2i, after train/ref: the prompt-set JSONs and the FID reference arrays; returns their counts."""
    from deme.data.prompts import write_benchmarks
    from deme.data.readers import DataError

    try:
        counts = write_benchmarks(ctx.cfg, sets, src, out, final)
    except DataError as e:
        raise StageError(str(e)) from None
    skipped = counts["prompts_skipped_coco"] + sum(v for k, v in counts.items() if k.startswith("bench_skipped_"))
    if skipped:
        ctx.note(f"skipped {skipped} benchmark rows/images (listed in data/{ctx.cfg.profile}/prompts/coco.json "
                 f"and bench/manifest.json)")
    return counts


def body(ctx):
    from deme.data import load_images
    from deme.io import atomic_dir, write_json
    from deme.paths import Paths
    from deme.sample import save_grid

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    final = paths.train.parent
    with atomic_dir(final) as tmp:  # a failure leaves the previous data/<profile> untouched
        tmp = Path(tmp)
        bench = benchmarks_first(ctx, tmp, final) if cfg.task == "t2i" else None
        counts = (shapes if cfg.data.kind == "shapes" else real)(ctx, tmp)
        if bench is not None:
            counts.update(benchmarks_last(ctx, tmp, final, *bench))
    ctx.wrote(final, f"{counts['num_train']} training + {counts['num_ref']} reference images")
    if cfg.task == "t2i":
        sets = ", ".join(f"{k}: {counts[f'prompts_{k}']}" for k in ("coco", "coco_proxy", "imagenet", "parti"))
        ctx.wrote(paths.prompts("coco").parent, f"{sets} prompts")
        ctx.wrote(paths.bench_ref("coco").parent, f"FID references: coco {counts['bench_coco']} (the merge search's: "
                                                  f"{counts['bench_coco_search']}), imagenet {counts['bench_imagenet']} "
                                                  f"at {cfg.benchmarks.fid_resolution}px")
    grid = paths.samples("data")
    save_grid(load_images(paths.train)[:64], grid, nrow=8, scale=max(1, 64 // cfg.data.resolution))
    ctx.wrote(grid)
    ctx.run.log_image(grid, "samples")
    ctx.run.log_metrics({k: v for k, v in counts.items() if isinstance(v, int)})
    write_json(paths.metrics("data"), counts)
    ctx.wrote(paths.metrics("data"))


if __name__ == "__main__":
    sys.exit(run_stage("prepare", __doc__, body, params=lambda c, a: {"seed": c.seed, "data": c.to_dict()["data"]}))
