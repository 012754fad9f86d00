"""Per-batch training objectives. Each is a callable ``objective(model, x0, generator) -> (loss, terms)``
where ``terms`` holds detached scalars logged under the same names for every method."""
from deme.objectives.ant import ANTObjective, nash_weights
from deme.objectives.deme import EpsObjective
from deme.objectives.difftuning import DiffTuningObjective

# Methods that finetune one model on all timesteps at the matched budget (the plain control first).
SINGLE_MODEL_METHODS = ("plain", "min_snr", "p2", "snr_plus_one", "trunc_snr", "ant_uw", "ant_nash", "difftuning")

__all__ = ["SINGLE_MODEL_METHODS", "EpsObjective", "ANTObjective", "DiffTuningObjective", "nash_weights"]
