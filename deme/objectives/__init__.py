"""Per-batch training objectives. Each is a callable ``objective(model, x0, generator) -> (loss, terms)``
where ``terms`` holds detached scalars logged under the same names for every method."""
from deme.objectives.ant import ANTObjective, nash_weights
from deme.objectives.deme import EpsObjective
from deme.objectives.difftuning import DiffTuningObjective

# Methods that finetune one model on all timesteps at the matched budget (the plain control first).
SINGLE_MODEL_METHODS = ("plain", "min_snr", "p2", "snr_plus_one", "trunc_snr", "ant_uw", "ant_nash", "difftuning")



def method_seeds(cfg, name: str) -> int:
    """Training seeds of a single-model method: the plain control has DeMe's (the claims compare the two),
    the other baselines `baselines.seeds`."""
    return cfg.deme.seeds if name == "plain" else cfg.baselines.seeds


__all__ = ["SINGLE_MODEL_METHODS", "method_seeds", "EpsObjective", "ANTObjective", "DiffTuningObjective", "nash_weights"]
