"""Stage `clip`: the CLIP model of the CLIP score (docs/paper.md §1.9, §8.3). Text-to-image only: run with --t2i.

`clip.train: true` (tiny_t2i): train a small open_clip model (ViT image tower, CLIP text transformer with
the real BPE vocabulary) contrastively on the training images and their captions, save it in the open_clip
hub layout (open_clip_config.json + open_clip_model.safetensors) in models/<profile>/clip, and check it on
the held-out images: the ranking accuracy of each image's own caption against a wrong caption (another
held-out image's, different from its own; a seeded derangement) and the mean CLIP scores of the matched
and mismatched pairs.
Otherwise (sd14): find open_clip `clip.model` / `clip.pretrained` (default ViT-g-14 / laion2b_s34b_b88k,
BK-SDM's choice) in `clip.local_path` or, offline, in the Hugging Face cache (`clip.cache_dir`, then the
default one); nothing is downloaded, and a missing model fails at once naming what to fetch. Records the
weights file and its sha256 in models/<profile>/clip/clip.json, so DVC reruns the CLIP scores when the model
changes, and scores up to 256 captioned held-out images if data/<profile>/ref.npy has captions.
Writes models/<profile>/clip and metrics/<profile>/clip.json; logs the metrics to MLflow.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402

REAL_HELDOUT = 256  # held-out images scored with a real (large) CLIP model


def heldout_scores(ctx, scorer, images, captions) -> dict:
    """Matched / mismatched CLIP scores and ranking accuracy on held-out images with captions."""
    from deme.io import derive_seed
    from deme.metrics.clip import images_nchw, pair_scores, wrong_captions

    captions = [str(c) for c in captions]
    wrong = wrong_captions(captions, derive_seed(ctx.cfg.seed, "clip", "wrong-captions"))
    matched, mismatched = pair_scores(scorer, images_nchw(images), captions, wrong)
    return {"ranking_accuracy": float((matched > mismatched).mean()), "clip_matched": float(matched.mean()),
            "clip_mismatched": float(mismatched.mean()), "heldout_images": len(captions)}


def train(ctx):
    from deme.data import load_set
    from deme.io import write_json
    from deme.metrics.clip import clip_model_config, load_clip, save_clip, train_clip
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    train_set, ref = load_set(paths.train), load_set(paths.ref)
    for name, s, p in (("training", train_set, paths.train), ("held-out", ref, paths.ref)):
        if "captions" not in s:
            raise StageError(f"{p}: the {name} set has no captions (clip.train needs the captioned shapes); "
                             "rerun: python stages/prepare.py --t2i")
    t0 = time.perf_counter()
    model = train_clip(train_set["images"], [str(c) for c in train_set["captions"]], cfg, cfg.seed, ctx.device,
                       log=ctx.run.log_metrics)
    wall = time.perf_counter() - t0
    save_clip(model, clip_model_config(cfg), paths.clip)
    scorer = load_clip(cfg, ctx.device)  # back from disk, through open_clip's loader, as the evaluation will
    metrics = {**heldout_scores(ctx, scorer, ref["images"], ref["captions"]), "iterations": cfg.clip.iterations,
               **scorer.describe()}
    write_json(paths.metrics("clip"), metrics)
    ctx.run.log_metrics({"wall_s": wall, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    ctx.note(f"trained {cfg.clip.model} in {wall:.1f} s; held-out ranking accuracy "
             f"{metrics['ranking_accuracy']:.3f}, CLIP score matched {metrics['clip_matched']:.2f} vs "
             f"mismatched {metrics['clip_mismatched']:.2f} ({metrics['heldout_images']} images)")
    ctx.wrote(paths.clip)
    ctx.wrote(paths.metrics("clip"))


def resolve(ctx):
    from deme.data import load_set
    from deme.io import atomic_dir, write_json
    from deme.metrics.clip import RECORD_NAME, load_clip
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    scorer = load_clip(cfg, ctx.device)
    info = scorer.describe()
    record = {**info, "weights": os.path.abspath(scorer.weights),
              "preprocess_cfg": dict(scorer.model.visual.preprocess_cfg)}
    metrics = dict(info)
    if paths.ref.exists():
        ref = load_set(paths.ref)
        if "captions" in ref and len(set(map(str, ref["captions"]))) >= 2:
            n = min(REAL_HELDOUT, len(ref["images"]))
            metrics.update(heldout_scores(ctx, scorer, ref["images"][:n], ref["captions"][:n]))
    with atomic_dir(paths.clip) as tmp:
        write_json(tmp / RECORD_NAME, record)
    write_json(paths.metrics("clip"), metrics)
    ctx.run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.note(f"CLIP {info['clip_model']} / {info['clip_pretrained']}: {record['weights']} "
             f"(sha256 {info['clip_sha256'][:16]})")
    if "clip_matched" in metrics:
        ctx.note(f"held-out: CLIP score matched {metrics['clip_matched']:.2f} vs mismatched "
                 f"{metrics['clip_mismatched']:.2f}, ranking accuracy {metrics['ranking_accuracy']:.3f}")
    ctx.wrote(paths.clip)
    ctx.wrote(paths.metrics("clip"))


def body(ctx):
    if ctx.cfg.task != "t2i":
        raise StageError("the clip stage belongs to the text-to-image pipeline: run python stages/clip.py --t2i")
    return train(ctx) if ctx.cfg.clip.train else resolve(ctx)


if __name__ == "__main__":
    sys.exit(run_stage("clip", __doc__, body,
                       params=lambda c, a: {"clip": c.to_dict()["clip"], "seed": c.seed}))
