"""Stage `buffer`: Diff-Tuning's retention buffer, sampled once from the pretrained model (docs/paper.md §6.2).

`baselines.difftuning.buffer_size` images by DDIM (`buffer_steps` steps, eta 0) from per-image seeds of
their own range (disjoint from evaluation and search seeds). Written as a dataset file
(buffers/<profile>/difftuning.npy) with a sample grid; the buffer is fixed, not refreshed during training.
Resumable: finished batches are kept in .ckpt/<profile>/buffer/ until the buffer is written (deme/resume.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def body(ctx):
    import dataclasses
    import shutil

    import torch

    from deme.data import save_images
    from deme.distributed import current, gather_batches, my_batches
    from deme.evaluation import image_shape
    from deme.io import sample_seeds
    from deme.models import load_pretrained
    from deme.paths import Paths
    from deme.resume import Shards, batch_key, state_digest
    from deme.sample import generate, save_grid

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    d = cfg.baselines.difftuning
    model = load_pretrained(cfg)
    seeds = sample_seeds("buffer", d.buffer_size, cfg.seed)
    sample = dataclasses.replace(cfg.sample, eta=0.0)
    mine = my_batches(len(seeds), sample.batch_size, current())  # split over processes, gathered in order
    shards = Shards(paths.ckpt("buffer"), {"model": state_digest(model), "seeds": [seeds.start, seeds.stop],
                                           "sample": dataclasses.asdict(sample), "steps": d.buffer_steps,
                                           "schedule": dataclasses.asdict(cfg.schedule)}, main=ctx.is_main)
    todo = [r for r in mine if not shards.has(batch_key(*r))]
    fresh = generate(model, seeds, cfg.schedule, sample, image_shape(cfg), ctx.device, desc="retention buffer",
                     steps=d.buffer_steps, batches=todo)
    for lo, hi in todo:
        shards.put(batch_key(lo, hi), {"images": next(fresh)})
    shards.note(len(mine), "batches")
    batches = gather_batches([torch.from_numpy(shards.get(batch_key(*r))["images"]) for r in mine], current())
    if not ctx.is_main:
        return
    images = torch.cat(batches).permute(0, 2, 3, 1).numpy()
    paths.buffer.parent.mkdir(parents=True, exist_ok=True)
    save_images(paths.buffer, images)
    grid = paths.samples("buffer")
    save_grid(images[:64], grid, nrow=8)
    ctx.run.log_image(grid, "samples")
    ctx.wrote(paths.buffer, f"{len(images)} images, DDIM-{d.buffer_steps}")
    ctx.wrote(grid)
    shutil.rmtree(paths.ckpt("buffer"), ignore_errors=True)  # the resume state, now the buffer exists


if __name__ == "__main__":
    sys.exit(run_stage("buffer", __doc__, body, tags=lambda c, a: {"method": "difftuning"},
                       params=lambda c, a: {"baselines.difftuning": c.to_dict()["baselines"]["difftuning"],
                                            "schedule": c.to_dict()["schedule"]}))
