"""The single-model methods, declared once: the plain control and the baselines of Tables 1 and 2 (docs/paper.md
§2), each finetuning one copy of the pretrained model on all timesteps at the matched budget.

Everything that lists methods derives from :data:`METHODS`: the finetune stage's ``--method`` choices, each
method's objective (deme.objectives.for_method, by family), the evaluated rows, the report's table rows,
labels and claims. This module is data only, so the stages that list methods do not depend on the losses. What cannot
import it is checked against it by tests/test_methods.py: the ``baselines.*`` config sections and presets,
``weighting.SCHEMES`` and the ``foreach`` lists of dvc.yaml. Adding a loss weighting means its formula in
deme/weighting.py, one line here, its config section (config.py, profiles.py) and the dvc.yaml lists. A method
of :data:`AFTER_MERGE` reads the merge stage's output, so it has its own finetune stage in dvc.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # params section baselines.<name>, stage item, metrics and model folder name
    label: str  # the row label of Tables 1 and 2
    short: str  # in the claims ("DeMe merged beats <short> ...") and on charts
    family: str  # plain | weighting (deme/weighting.py) | ant (ANT-UW / ANT-NashMTL) | difftuning | piecewise
    in_paper: bool  # the paper's Tables 1 and 2 have the row (the plain control is ours)


METHODS = (
    Method("plain", "Plain finetuning (control)", "Plain", "plain", False),
    Method("min_snr", "Min-SNR-γ", "Min-SNR-γ", "weighting", True),
    Method("p2", "P2 weighting", "P2", "weighting", True),
    Method("snr_plus_one", "SNR+1", "SNR+1", "weighting", True),
    Method("trunc_snr", "Trun-SNR", "Trun-SNR", "weighting", True),
    Method("ant_uw", "ANT-UW", "ANT-UW", "ant", True),
    Method("ant_nash", "ANT-NashMTL", "ANT-NashMTL", "ant", True),
    Method("difftuning", "Diff-Tuning", "Diff-Tuning", "difftuning", False),
    # ours (docs/paper.md §1.10): one model trained with the piecewise-constant loss weight w(t) = w_i on I_i, the
    # weights DeMe's merge search found for the same training seed; it reads the merge's output
    Method("piecewise", "Piecewise reweighting with DeMe's searched weights (control)", "Piecewise w(t)",
           "piecewise", False),
)
BY_NAME = {m.name: m for m in METHODS}
SINGLE_MODEL_METHODS = tuple(BY_NAME)  # the plain control first
BASELINES = tuple(m.name for m in METHODS if m.family != "plain")  # each has a `baselines.<name>` section
CONTROLS = ("plain", "piecewise")  # ours, trained with DeMe's seeds
AFTER_MERGE = tuple(m.name for m in METHODS if m.family == "piecewise")  # trained on the merge's searched weights


def method_seeds(cfg, name: str) -> int:
    """Training seeds of a single-model method: the two controls have DeMe's (the claims compare them with DeMe
    seed for seed; the piecewise control of seed s uses seed s's merge weights), the other baselines
    `baselines.seeds`."""
    return cfg.deme.seeds if name in CONTROLS else cfg.baselines.seeds
