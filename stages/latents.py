"""Stage `latents` (text-to-image): encode the training images once with the pipeline's frozen VAE.

Finetuning then reads latents/<profile>/latents.npy (float16 [n, C, h, w], the VAE posterior mean times the
VAE's scaling factor: 0.18215 for SD v1.4, docs/paper.md §1.6) and tokens.npy (int32 [n, L], each image's caption
tokenized by the pipeline's CLIP tokenizer), so no training step runs the VAE or the tokenizer. The text
encoder stays in the loop (frozen, cheap next to the UNet). empty.npy holds the empty prompt's tokens (the
unconditional branch). Written memory-mapped, batch by batch, into a temporary folder renamed at the end.
Resumable: every encoded chunk of `LATENT_CHUNK` batches is kept in .ckpt/<profile>/latents/ until the folder
is written (deme/resume.py).

  python stages/latents.py --t2i
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402

LATENT_CHUNK = 64  # batches per resume piece


def body(ctx):
    import shutil

    import numpy as np

    from deme.data import load_set
    from deme.io import atomic_dir, write_json
    from deme.paths import Paths
    from deme.resume import Shards, batch_key, file_id, state_digest
    from deme.text2image import encode_dataset, latent_shape, load_components

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    if cfg.task != "t2i":
        raise StageError("the latents stage is for text-to-image profiles: run it with --t2i")
    comps = load_components(paths.pretrained, ctx.device)
    data = load_set(paths.train)
    images, captions = data["images"], data.get("captions")
    if captions is None or len(captions) != len(images):
        raise StageError(f"{paths.train}: the training images have no captions (data.kind {cfg.data.kind!r}); "
                         f"rerun: dvc repro t2i_prepare")
    shape = latent_shape(cfg, comps)
    with atomic_dir(paths.latents) as tmp:
        out = np.lib.format.open_memmap(Path(tmp) / "latents.npy", mode="w+", dtype=np.float16,
                                        shape=(len(images), *shape))
        bs = cfg.sample.batch_size
        shards = Shards(paths.ckpt("latents"), {"vae": state_digest(comps.vae), "data": file_id(paths.train),
                                                "batch_size": bs, "shape": list(shape)}, memo=False)
        chunks = [(lo, min(lo + LATENT_CHUNK * bs, len(images))) for lo in range(0, len(images), LATENT_CHUNK * bs)]
        for lo, hi in chunks:
            piece = shards.get(batch_key(lo, hi))
            if piece is None:
                encode_dataset(comps, images[lo:hi], bs, ctx.device, out=out[lo:hi],
                               desc=f"VAE latents {lo}-{hi} of {len(images)}")
                shards.put(batch_key(lo, hi), {"latents": out[lo:hi]})
            else:
                out[lo:hi] = piece["latents"]
        shards.note(len(chunks), "chunks")
        out.flush()
        stats = {"latent_mean": float(np.mean(out[:2000])), "latent_std": float(np.std(out[:2000].astype(np.float32)))}
        del out
        tokens = np.concatenate([comps.tokens(captions[i:i + 4096]).numpy().astype(np.int32)
                                 for i in range(0, len(captions), 4096)])
        np.save(Path(tmp) / "tokens.npy", tokens)
        np.save(Path(tmp) / "empty.npy", comps.tokens([""])[0].numpy().astype(np.int32))
        meta = {"count": len(images), "shape": list(shape), "scaling_factor": comps.scaling_factor,
                "max_length": comps.max_length, **stats}
        write_json(Path(tmp) / "meta.json", meta)
    ctx.note(f"{len(images)} latents {tuple(shape)}: mean {stats['latent_mean']:.3f}, std {stats['latent_std']:.3f} "
             f"(scaling factor {comps.scaling_factor:.4f})")
    ctx.run.log_metrics(stats)
    ctx.wrote(paths.latents)
    shutil.rmtree(paths.ckpt("latents"), ignore_errors=True)  # the resume state, now the latents exist


if __name__ == "__main__":
    sys.exit(run_stage("latents", __doc__, body, params=lambda c, a: {"profile": c.profile}))
