"""DeMe variants outside the main pipeline: the runs of Table 3 and Fig. 8 (docs/paper.md §3.3, §3.5, §5) and the
extra interval models of the analysis figures (Fig. 2 without projection, Fig. 7's second seed).

A variant is the main config with ``deme`` replaced (N, probabilistic sampling, p, consistency loss,
channel-wise projection) and its own finetuning budget. Its interval models are trained exactly as the
``finetune`` stage trains them (the same objective, seeds and loop), so a variant equal to the main config
reproduces the main interval models; they are merged with the same task arithmetic and a weight search.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from torch import nn

from deme.config import Config, VariantConfig


def variant_config(cfg: Config, run: VariantConfig) -> Config:
    """``cfg`` with the variant's DeMe switches, intervals 1..n and the per-model budget of ``cfg.sweep``."""
    deme = dataclasses.replace(cfg.deme, intervals=list(range(1, run.n + 1)),
                               probabilistic_sampling=run.probabilistic_sampling and run.n > 1,
                               p=cfg.deme.p if run.p is None else run.p, consistency_loss=run.consistency_loss,
                               channel_projection=run.channel_projection)
    finetune = dataclasses.replace(cfg.finetune, iterations=iterations_per_model(cfg, run.n), eval_every=0)
    return dataclasses.replace(cfg, deme=deme, finetune=finetune)


def iterations_per_model(cfg: Config, n: int) -> int:
    """``sweep.budget``: 'total' splits one budget over the N models (compute-matched, docs/paper.md §5 Table 3
    notes: 80K in total at paper scale); 'per_model' gives each model the same iterations (the paper's 20K)."""
    s = cfg.sweep
    if s.budget == "per_model":
        return s.iterations or cfg.finetune.iterations
    total = s.iterations or cfg.finetune.iterations * cfg.deme.n
    return max(1, total // n)


def interval_objective(cfg: Config, i: int, teacher: nn.Module | None):
    """The DeMe objective of interval i under ``cfg.deme`` (docs/paper.md §1.3-1.5; the finetune stage's)."""
    from deme.objectives import EpsObjective
    from deme.schedule import alphas_cumprod, interval_bounds

    d = cfg.deme
    lo, hi = interval_bounds(i, d.n, cfg.schedule.num_train_timesteps)
    use_teacher = d.consistency_loss and d.consistency_weight > 0
    return EpsObjective(alphas_cumprod(cfg.schedule).float(), lo, hi,
                        p=d.p if d.probabilistic_sampling else 0.0, granularity=d.ps_granularity,
                        antithetic=d.antithetic, teacher=teacher if use_teacher else None,
                        consistency_weight=d.consistency_weight)


def train_interval(cfg: Config, i: int, images, device, ckpt_dir: Path, *, seed_tag: Sequence = (),
                   teacher: nn.Module | None = None, log=None, desc: str = "") -> nn.Module:
    """Finetune the pretrained model (+ identity projections if ``deme.channel_projection``) on interval i.
    The seed is the finetune stage's, ``derive_seed(seed, 'finetune', 'interval-i')``, extended by
    ``seed_tag`` for an independent replicate (Fig. 7's noise floor). Resumable: training checkpoints and
    the finished model live in ``ckpt_dir`` (the caller clears it once its outputs are written)."""
    from deme.io import derive_seed
    from deme.models import frozen_teacher, load_pretrained
    from deme.resume import array_id, run_context, state_digest
    from deme.projection import add_channel_projection
    from deme.train import train

    from deme.models import load_model, model_meta, save_model

    d = cfg.deme
    name = f"interval-{i}"
    seed = derive_seed(cfg.seed, "finetune", name, *seed_tag)
    model = load_pretrained(cfg)
    # everything the finished model depends on: settings, pretrained weights, schedule, data, code, thread count
    fingerprint = json.dumps([dataclasses.asdict(cfg.finetune), dataclasses.asdict(d), name, list(seed_tag), seed,
                              state_digest(model), dataclasses.asdict(cfg.schedule), array_id(images), run_context()])
    done = Path(ckpt_dir) / "done"  # the finished model: a rerun after a kill does not train it again
    if (done / "deme.json").exists():
        if model_meta(done).get("fingerprint") == fingerprint:
            return load_model(done)
        print(f"[resume] {done}: finished model made with other settings, inputs, code or threads; training again")
    if d.channel_projection:
        add_channel_projection(model)
    if teacher is None and d.consistency_loss and d.consistency_weight > 0:
        teacher = frozen_teacher(cfg)
    model = train(model, interval_objective(cfg, i, teacher), images, cfg.finetune, seed=seed, device=device,
                  ckpt_dir=ckpt_dir, log=log, desc=desc or f"{name}/{d.n}", fingerprint=fingerprint,
                  channels_last=cfg.runtime.channels_last, compile=cfg.runtime.compile)
    from deme.distributed import current

    if current().is_main:
        save_model(model, done, cfg, fingerprint=fingerprint)
    return model


def fid_at_steps(model: nn.Module, cfg: Config, steps: int, seeds, spaces, refs, device, desc: str) -> float:
    """Headline FID of ``model`` with ``steps`` DDIM steps (Table 3: 100, Fig. 8: sample.steps)."""
    from deme.evaluation import fid_of_model

    c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=steps))
    return fid_of_model(model, seeds, c, spaces, refs, device, desc=desc)


def run_steps(cfg: Config, run: VariantConfig) -> list[int]:
    """The DDIM step counts a run is evaluated with: Table 3's and/or Fig. 8's."""
    return sorted({s for s, on in ((cfg.sweep.table3_steps, run.table3), (cfg.sample.steps, run.fig8)) if on})


