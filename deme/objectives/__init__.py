"""Per-batch training objectives. Each is a callable ``objective(model, x0, generator) -> (loss, terms)``
where ``terms`` holds detached scalars logged under the same names for every method (which method uses which:
deme/methods.py)."""
from deme.objectives.ant import ANTObjective, nash_weights
from deme.objectives.deme import EpsObjective
from deme.objectives.difftuning import DiffTuningObjective


def for_method(cfg, name: str, buffer=None, merge_weights=None):
    """The per-batch loss of single-model method ``name`` (deme/methods.py), chosen by its family. ``buffer``:
    Diff-Tuning's retention images, uint8 [n, H, W, 3], for its buffer variant; ``merge_weights``: the N
    searched merge weights the piecewise control turns into its loss weight."""
    import torch

    from deme.methods import BY_NAME
    from deme.models import frozen_teacher
    from deme.schedule import alphas_cumprod
    from deme.train import to_model_range
    from deme.weighting import epsilon_weights, piecewise_weights

    family = BY_NAME[name].family
    ab, T, b = alphas_cumprod(cfg.schedule).float(), cfg.schedule.num_train_timesteps, cfg.baselines
    if family == "plain":
        return EpsObjective(ab, 0, T, antithetic=cfg.deme.antithetic)
    if family == "weighting":
        h = getattr(b, name)
        w = epsilon_weights(name, alphas_cumprod(cfg.schedule), normalize=h.normalize, **h.hparams())
        return EpsObjective(ab, 0, T, antithetic=cfg.deme.antithetic, weights=w.float())
    if family == "piecewise":
        if merge_weights is None or len(merge_weights) != cfg.deme.n:
            raise ValueError(f"{name} needs the merge's {cfg.deme.n} searched weights, got {merge_weights}")
        w = piecewise_weights(merge_weights, T, normalize=getattr(b, name).normalize)
        return EpsObjective(ab, 0, T, antithetic=cfg.deme.antithetic, weights=w.float())
    if name == "ant_uw":
        return ANTObjective(ab, b.ant_uw.num_tasks, "uw", uw_lr=b.ant_uw.uw_lr)
    if name == "ant_nash":
        # "every 25 steps" counts optimizer steps; the objective counts micro-batches
        return ANTObjective(ab, b.ant_nash.num_tasks, "nash",
                            update_every=b.ant_nash.update_every * cfg.finetune.grad_accum)
    d = b.difftuning
    if d.variant == "kd":
        return DiffTuningObjective(ab, variant="kd", teacher=frozen_teacher(cfg), kd_weight=d.kd_weight)
    return DiffTuningObjective(ab, variant="buffer", buffer=to_model_range(torch.from_numpy(buffer.copy())))


__all__ = ["EpsObjective", "ANTObjective", "DiffTuningObjective", "nash_weights", "for_method"]
