"""Per-batch training objectives. Each is a callable ``objective(model, x0, generator) -> (loss, terms)``
where ``terms`` holds detached scalars logged under the same names for every method."""
from deme.objectives.ant import ANTObjective, nash_weights
from deme.objectives.deme import EpsObjective
from deme.objectives.difftuning import DiffTuningObjective

__all__ = ["EpsObjective", "ANTObjective", "DiffTuningObjective", "nash_weights"]
