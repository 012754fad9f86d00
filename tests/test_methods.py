"""The method registry (deme/methods.py) is the one list of single-model methods: what cannot import it (the
config sections, the presets, the weighting schemes, dvc.yaml's foreach lists) is checked against it here."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from deme import weighting
from deme.config import BaselinesConfig, config_from_mapping
from deme.methods import AFTER_MERGE, BASELINES, BY_NAME, METHODS, SINGLE_MODEL_METHODS
from deme.objectives import for_method
from deme.profiles import PROFILES
from deme.report.evidence import BASELINE_LABELS
from deme.report.tables import TABLE1_ROWS, TABLE2_ROWS

REPO = Path(__file__).resolve().parents[1]


def _foreach(stage: str) -> list[str]:
    each = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["foreach"]
    return list(each)


def test_names_are_unique_and_the_control_comes_first():
    assert len(set(SINGLE_MODEL_METHODS)) == len(METHODS) and SINGLE_MODEL_METHODS[0] == "plain"
    assert {m.family for m in METHODS} == {"plain", "weighting", "ant", "difftuning", "piecewise"}


def test_config_sections_and_presets_have_one_section_per_baseline():
    fields = [f.name for f in dataclasses.fields(BaselinesConfig) if f.name != "seeds"]
    assert fields == list(BASELINES)
    for name, preset in PROFILES.items():
        assert list(preset["baselines"]) == ["seeds", *BASELINES], name


def test_the_weighting_schemes_are_the_weighting_methods():
    assert weighting.SCHEMES == ("uniform", *(m.name for m in METHODS if m.family == "weighting"))


def test_dvc_yaml_runs_and_evaluates_every_method():
    own_stage = {"plain": "finetune_plain", "difftuning": "finetune_difftuning",
                 **{m: f"finetune_{m}" for m in AFTER_MERGE}}
    assert _foreach("finetune_baseline") == [m for m in SINGLE_MODEL_METHODS if m not in own_stage]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all(s in stages for s in own_stage.values())
    # text-to-image: Diff-Tuning in its KD form needs no buffer stage; each baseline depends on its own section
    assert "t2i_finetune_plain" in stages
    assert _foreach("t2i_finetune_baseline") == [m for m in SINGLE_MODEL_METHODS if m not in ("plain", *AFTER_MERGE)]
    assert stages["t2i_finetune_baseline"]["do"]["params"][-2:] == ["t2i.baselines.${item}", "t2i.pipeline.caption_dropout"]
    assert not any(p == "t2i.baselines" for s in stages.values() for p in s.get("params", s.get("do", {}).get("params", [])))
    for m in AFTER_MERGE:  # a method trained on the merge's weights depends on them, in both pipelines
        for stage, prof in ((f"finetune_{m}", "${profile}"), (f"t2i_finetune_{m}", "${t2i.profile}")):
            assert f"metrics/{prof}/merge.json" in stages[stage]["deps"], stage
            assert f"--method {m}" in stages[stage]["cmd"], stage
    for stage, pre in (("evaluate", ""), ("t2i_evaluate", "t2i.")):
        assert _foreach(stage) == ["pretrained", "ensemble", "merged", *SINGLE_MODEL_METHODS]
        # only a single-model row runs the scale search, so only it depends on the merge settings
        items = stages[stage]["foreach"]
        assert {k for k, v in items.items() if v["search"] == f"{pre}merge"} == set(SINGLE_MODEL_METHODS)
        assert "${item.search}" in stages[stage]["do"]["params"]


def test_dvc_plots_overlay_lists_every_single_model_method():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    overlays = {k: v for p in plots if isinstance(p, dict) for k, v in p.items()}
    for name, prof in (("finetune_loss_eps", "${profile}"), ("t2i_finetune_loss_eps", "${t2i.profile}")):
        assert overlays[name]["y"] == {f"plots/{prof}/finetune-{m}.csv": "loss_eps" for m in SINGLE_MODEL_METHODS}


def test_the_report_has_one_row_and_one_claim_per_method():
    for rows in (TABLE1_ROWS, TABLE2_ROWS):
        keys = [k for k, _, _ in rows]
        assert sorted(k for k in keys if k in BY_NAME) == sorted(SINGLE_MODEL_METHODS)
        assert all(label.startswith(BY_NAME[k].label) for k, label, _ in rows if k in BY_NAME)
    assert list(BASELINE_LABELS) == [m for m in BASELINES if m not in AFTER_MERGE]


@pytest.mark.parametrize("name", SINGLE_MODEL_METHODS)
def test_every_method_builds_its_objective(name):
    cfg = config_from_mapping({"profile": "micro"})
    buffer = np.zeros((cfg.baselines.difftuning.buffer_size, 16, 16, 3), np.uint8)
    searched = [0.5 * i for i in range(cfg.deme.n)] if name in AFTER_MERGE else None
    obj = for_method(cfg, name, buffer, searched)
    family = BY_NAME[name].family
    want = {"plain": "EpsObjective", "weighting": "EpsObjective", "ant": "ANTObjective",
            "difftuning": "DiffTuningObjective", "piecewise": "EpsObjective"}[family]
    assert type(obj).__name__ == want
    assert (getattr(obj, "weights", None) is not None) == (family in ("weighting", "piecewise"))


def test_the_piecewise_control_weights_each_interval_by_its_merge_weight():
    cfg = config_from_mapping({"profile": "micro"})
    T, n = cfg.schedule.num_train_timesteps, cfg.deme.n
    searched = [0.25 + i for i in range(n)]
    w = for_method(cfg, "piecewise", merge_weights=searched).weights
    for i in range(n):  # I_i = [(i-1)T/N, iT/N)
        assert set(w[i * T // n:(i + 1) * T // n].tolist()) == {searched[i]}
    with pytest.raises(ValueError, match="searched weights"):
        for_method(cfg, "piecewise")
    with pytest.raises(ValueError, match="searched weights"):
        for_method(cfg, "piecewise", merge_weights=searched[:-1])
