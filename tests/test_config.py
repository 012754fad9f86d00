"""Configuration: presets, params.yaml loading, one-line errors naming the key, the profiles CLI."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from deme.config import (Config, ConfigError, DeMeConfig, TrainConfig, config_from_mapping, load_config,
                         read_params)
from deme.profiles import PROFILES, dump_yaml, main, preset

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- presets

# sections a preset leaves to the dataclass defaults because its task never reads them
OTHER_TASK = {"image": {"task", "pipeline", "clip", "benchmarks"}, "t2i": {"model.unet"}}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_preset_validates_and_round_trips(name):
    task = PROFILES[name].get("task", "image")
    cfg = (config_from_mapping({"profile": name}) if task == "image"
           else config_from_mapping({"t2i": {"profile": name}}, "t2i"))
    assert isinstance(cfg, Config)
    assert cfg.profile == name and cfg.task == task
    # the preset is complete for its task: every field it uses comes from it, none from dataclass defaults
    full = cfg.to_dict()
    for key in OTHER_TASK[task]:
        section, _, sub = key.partition(".")
        (full[section].pop(sub) if sub else full.pop(section))
    assert full == preset(name)


def test_each_pipeline_takes_only_its_own_profiles():
    with pytest.raises(ConfigError, match="unknown image profile 'sd14'"):
        config_from_mapping({"profile": "sd14"})
    with pytest.raises(ConfigError, match="^t2i.profile: unknown t2i profile 'tiny'"):
        config_from_mapping({"t2i": {"profile": "tiny"}}, "t2i")
    with pytest.raises(ConfigError, match="^t2i: section missing"):
        config_from_mapping({"profile": "tiny"}, "t2i")
    with pytest.raises(ConfigError, match="^t2i.pipeline.guidance_scale: "):
        config_from_mapping({"t2i": {"profile": "tiny_t2i", "pipeline": {"guidance_scale": "high"}}}, "t2i")
    with pytest.raises(ConfigError, match="^t2i.sample.sampler: unknown sampler 'fast'"):
        config_from_mapping({"t2i": {"profile": "tiny_t2i", "sample": {"sampler": "fast"}}}, "t2i")
    cfg = config_from_mapping({"t2i": {"profile": "tiny_t2i", "sample": {"sampler": "DPMSolverMultistepScheduler"}}}, "t2i")
    assert cfg.sample.scheduler_class == "DPMSolverMultistepScheduler"
    for key, value in (("steps", 0), ("eta", 2.0), ("precision", "fp8"), ("batch_size", 0)):
        with pytest.raises(ConfigError, match=f"^t2i.sample.{key}: "):
            config_from_mapping({"t2i": {"profile": "tiny_t2i", "sample": {key: value}}}, "t2i")
    with pytest.raises(ConfigError, match="^sample.sampler: image profiles sample with 'ddim'"):
        config_from_mapping({"profile": "tiny", "sample": {"sampler": "pndm"}})


def test_micro_is_smaller_than_tiny():
    tiny, micro = config_from_mapping({"profile": "tiny"}), config_from_mapping({"profile": "micro"})
    assert micro.deme.intervals == [1, 2] and tiny.deme.intervals == [1, 2, 3, 4]
    assert micro.finetune.iterations < tiny.finetune.iterations
    assert micro.model.unet.block_out_channels == [8, 16]


def test_preset_is_a_deep_copy():
    p = preset("tiny")
    p["deme"]["intervals"].append(5)
    p["finetune"]["lr"] = 0.5
    assert PROFILES["tiny"]["deme"]["intervals"] == [1, 2, 3, 4]
    assert preset("tiny")["finetune"]["lr"] == 2e-4


def test_overrides_merge_into_the_preset():
    cfg = config_from_mapping({"profile": "micro", "finetune": {"lr": 1e-5}, "deme": {"p": 0.3}})
    assert cfg.finetune.lr == 1e-5
    assert cfg.deme.p == 0.3
    assert cfg.finetune.iterations == PROFILES["micro"]["finetune"]["iterations"]  # untouched sibling key
    assert cfg.deme.intervals == [1, 2]


def test_default_profile_is_tiny():
    full = config_from_mapping({}).to_dict()
    assert {k: v for k, v in full.items() if k not in OTHER_TASK["image"]} == preset("tiny")
    assert config_from_mapping({"t2i": {}}, "t2i").profile == "tiny_t2i"


def test_repository_params_yaml_loads_without_modification():
    path = REPO / "params.yaml"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = load_config(path)
    assert cfg.profile in PROFILES
    assert cfg.schedule.num_train_timesteps % cfg.deme.n == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


# ----------------------------------------------------------------------------------------- errors

def _error(raw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        config_from_mapping(raw)
    msg = str(e.value)
    assert "\n" not in msg, "ConfigError must be one line"
    return e.value


def test_unknown_key_names_dotted_key_and_suggests():
    e = _error({"finetune": {"lrr": 1e-4}})
    assert e.key == "finetune.lrr"
    assert str(e).startswith("finetune.lrr:")
    assert "did you mean 'lr'" in str(e)


def test_unknown_top_level_and_nested_keys():
    assert _error({"bogus": 1}).key == "bogus"
    e = _error({"model": {"unet": {"block_out_chanels": [8]}}})
    assert e.key == "model.unet.block_out_chanels" and "block_out_channels" in str(e)


@pytest.mark.parametrize("raw, key, words", [
    ({"finetune": {"lr": "abc"}}, "finetune.lr", "number"),
    ({"deme": {"intervals": "x"}}, "deme.intervals", "list"),
    ({"deme": {"consistency_loss": "yes"}}, "deme.consistency_loss", "true or false"),
    ({"deme": {"intervals": [1, 2.5]}}, "deme.intervals[1]", "integer"),
    ({"finetune": {"batch_size": True}}, "finetune.batch_size", "integer"),
    ({"finetune": {"batch_size": 8.5}}, "finetune.batch_size", "integer"),
    ({"sample": {"sampler": 3}}, "sample.sampler", "string"),
    ({"deme": [1, 2]}, "deme", "mapping"),
])
def test_wrong_type_names_key(raw, key, words):
    e = _error(raw)
    assert e.key == key
    assert str(e).startswith(f"{key}:")
    assert words in str(e)


@pytest.mark.parametrize("raw, key, words", [
    ({"deme": {"p": 1.5}}, "deme.p", "[0, 1]"),
    ({"deme": {"p": -0.1}}, "deme.p", "[0, 1]"),
    ({"finetune": {"batch_size": 0}}, "finetune.batch_size", ">= 1"),
    ({"deme": {"intervals": [1, 2, 3]}}, "deme.intervals", "divide"),
    ({"deme": {"intervals": [2, 3]}}, "deme.intervals", "1..N"),
    ({"deme": {"intervals": []}}, "deme.intervals", "1..N"),
    ({"deme": {"ps_granularity": "epoch"}}, "deme.ps_granularity", "batch, sample"),
    ({"finetune": {"lr": 0.0}}, "finetune.lr", "(0, 1)"),
    ({"finetune": {"precision": "fp8"}}, "finetune.precision", "fp32, fp16, bf16"),
    ({"merge": {"bounds": [1.0, 0.0]}}, "merge.bounds", "low <= high"),
    ({"model": {"unet": {"norm_num_groups": 5}}}, "model.unet.norm_num_groups", "divide"),
    ({"seed": -1}, "seed", "2^31"),
    ({"schedule": {"beta_start": 0.5, "beta_end": 0.1}}, "schedule.beta_start", "beta_start < beta_end"),
])
def test_out_of_range_names_key(raw, key, words):
    e = _error(raw)
    assert e.key == key
    assert words in str(e)


def test_unknown_profile_lists_allowed_profiles():
    e = _error({"profile": "huge"})
    assert e.key == "profile"
    for name, p in PROFILES.items():
        assert (name in str(e)) == (p.get("task", "image") == "image")
    assert _error({"profile": 3}).key == "profile"


def test_numeric_strings_accepted_for_floats():
    cfg = config_from_mapping({"finetune": {"lr": "1e-4", "eps": "1e-8"}, "deme": {"p": "0.25"}})
    assert cfg.finetune.lr == 1e-4 and isinstance(cfg.finetune.lr, float)
    assert cfg.finetune.eps == 1e-8
    assert cfg.deme.p == 0.25


def test_yaml_exponent_without_dot_is_accepted(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: micro\nfinetune:\n  lr: 1e-4\n")
    assert isinstance(yaml.safe_load(p.read_text())["finetune"]["lr"], str)  # PyYAML's YAML 1.1 quirk
    assert load_config(p).finetune.lr == 1e-4


def test_integral_float_accepted_for_int():
    assert config_from_mapping({"finetune": {"batch_size": 32.0}}).finetune.batch_size == 32


def test_dataclass_validate_directly():
    with pytest.raises(ConfigError, match=r"^x\.p:"):
        DeMeConfig(p=2.0).validate("x")
    TrainConfig().validate("t")  # defaults are valid


def test_empty_section_keeps_the_preset(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: tiny\nfinetune:\n  # lr: 1e-4\n")
    assert read_params(p)["finetune"] is None
    assert load_config(p).finetune == config_from_mapping({"profile": "tiny"}).finetune


def test_infinite_weight_decay_is_rejected():
    _error({"finetune": {"weight_decay": "inf"}})


# ----------------------------------------------------------------------------------------- read_params

def test_read_params_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as e:
        read_params(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("profile: tiny\ndeme: [1, 2\n", "not valid YAML"),
    ("- profile\n- tiny\n", "mapping"),
    ("just a string\n", "mapping"),
])
def test_read_params_bad_files_name_the_path(tmp_path, text, words):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_params(p)
    assert str(p) in str(e.value)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_error_reports_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: tiny\nseed: 0\ndeme: {p: 0.3\n")
    with pytest.raises(ConfigError, match=r"at line \d+, column \d+"):
        read_params(p)


def test_load_config_reports_key_of_bad_value_in_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: tiny\ndeme:\n  p: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == "deme.p"


# ----------------------------------------------------------------------------------------- profiles CLI

def test_profiles_use_writes_loadable_params(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    assert main(["use", "micro", "--params", str(p)]) == 0
    assert load_config(p) == config_from_mapping({"profile": "micro"})
    assert not (tmp_path / "params.yaml.bak").exists()
    assert "micro" in capsys.readouterr().out


def test_profiles_use_of_a_t2i_profile_writes_its_section_and_keeps_the_rest(tmp_path):
    p = tmp_path / "params.yaml"
    main(["use", "micro", "--params", str(p)])
    main(["use", "micro_t2i", "--params", str(p)])
    assert load_config(p).profile == "micro"
    assert load_config(p, "t2i") == config_from_mapping({"t2i": {"profile": "micro_t2i"}}, "t2i")
    main(["use", "tiny", "--params", str(p)])
    assert load_config(p).profile == "tiny" and load_config(p, "t2i").profile == "micro_t2i"


def test_profiles_use_from_a_subfolder_writes_the_repository_params(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "deme").mkdir()
    monkeypatch.chdir(tmp_path / "deme")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert main(["use", "micro"]) == 0
    assert not (tmp_path / "deme" / "params.yaml").exists() and load_config(tmp_path / "params.yaml").profile == "micro"


def test_profiles_use_keeps_backup(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: tiny\nseed: 7\n")
    main(["use", "micro", "--params", str(p)])
    assert (tmp_path / "params.yaml.bak").read_text() == "profile: tiny\nseed: 7\n"
    assert load_config(p).profile == "micro"


def test_profiles_show_and_list(capsys):
    assert main(["show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == preset("tiny")
    assert "betas: [0.95, 0.999]" in out  # lists of scalars in flow style
    main(["list"])
    assert capsys.readouterr().out.split() == list(PROFILES)


def test_dump_yaml_round_trips_every_preset():
    for name in PROFILES:
        assert yaml.safe_load(dump_yaml(preset(name))) == preset(name)


def test_profiles_cli_rejects_unknown_profile(tmp_path):
    with pytest.raises(SystemExit):
        main(["use", "huge", "--params", str(tmp_path / "p.yaml")])
    assert not (tmp_path / "p.yaml").exists()


def test_params_are_read_as_yaml_1_2_like_dvc(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with YAML 1.2 (unquoted `fp32`, `1e-4`): both must load as meant."""
    p = tmp_path / "params.yaml"
    p.write_text("profile: micro\nfinetune:\n  lr: 1e-4\n  precision: fp16\ndata:\n  path: no\n")
    cfg = load_config(p)
    assert cfg.finetune.lr == 1e-4 and cfg.finetune.precision == "fp16" and cfg.data.path == "no"


def test_profiles_use_writes_the_presets_and_keeps_the_other_pipeline_as_written(tmp_path):
    """`use` of one pipeline's profile keeps the other section's values and its one-line sweep runs; using
    both default profiles gives the repository's params.yaml byte for byte (it is the presets, no override)."""
    p = tmp_path / "params.yaml"
    main(["use", "tiny", "--params", str(p)])
    main(["use", "tiny_t2i", "--params", str(p)])
    assert yaml.safe_load(p.read_text()) == {**preset("tiny"), "t2i": preset("tiny_t2i")}
    assert "    n4_p050: {n: 4, probabilistic_sampling: true" in p.read_text()
    main(["use", "tiny", "--params", str(p)])
    assert p.read_text() == (REPO / "params.yaml").read_text()
