"""Per-batch training objectives. Each is a callable ``objective(model, x0, generator) -> (loss, terms)``
where ``terms`` holds detached scalars logged under the same names for every method."""
from deme.objectives.deme import EpsObjective

__all__ = ["EpsObjective"]
