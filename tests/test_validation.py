"""The `validate` stage (deme/validation.py): the whole params file is checked before any other stage runs,
a bad value is one line naming the key, and under `dvc exp run` the rejected file is put back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deme import codedeps, validation

REPO = Path(__file__).resolve().parents[1]


def test_the_repository_params_file_is_valid():
    validation.check(REPO / "params.yaml")


def test_every_stage_waits_for_validation():
    import yaml

    for f in codedeps.DVC_FILES:
        for name, body in yaml.safe_load((REPO / f).read_text())["stages"].items():
            deps = (body.get("do") or body)["deps"]
            assert (name == "validate") != (codedeps.MARKER in deps), f"{f}: {name}"
    assert "params.yaml:" in (REPO / "dvc.yaml").read_text().split("prepare:")[0]  # validate reads all of it


def test_a_bad_value_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("profile: micro\ndeme:\n  p: 1.5\n")
    assert validation.main(str(params), marker="ok") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "deme.p" in err
    assert not (tmp_path / "ok").exists() and params.read_text() == "profile: micro\ndeme:\n  p: 1.5\n"
    params.write_text("profile: micro\nt2i:\n  profile: micro_t2i\n  sample:\n    steps: abc\n")
    assert validation.main(str(params), marker="ok") == 2
    assert "t2i.sample.steps" in capsys.readouterr().err
    params.write_text("profile: micro\n")
    assert validation.main(str(params), marker="ok") == 0 and (tmp_path / "ok").read_text() == validation.MARKER_TEXT


def test_under_dvc_exp_run_a_rejected_file_goes_back_to_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = "profile: micro  # the baseline, byte for byte\nfinetune:\n  iterations: 7\n  lr: 0.001\n"
    (tmp_path / "params.yaml").write_text(good)
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=a@b", "-c", "user.name=a", "add", "-A"],
                ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "base"]):
        subprocess.run(cmd, check=True, cwd=tmp_path)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    bad = good.replace("iterations: 7", "iterations: -5").replace("lr: 0.001", "lr: 0.002")  # -S, an edit
    (tmp_path / "params.yaml").write_text(bad)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", rev)
    assert validation.main("params.yaml", marker="ok") == 2
    err = capsys.readouterr().err
    assert "finetune.iterations" in err and "baseline" in err and err.count("\n") == 1
    assert (tmp_path / "params.yaml").read_text() == good.replace("lr: 0.001", "lr: 0.002")  # the edit stays
    assert (tmp_path / validation.REJECTED).read_text() == bad
    (tmp_path / "params.yaml").write_text(good + "deme:\n  pp: 0.3\n")  # a key the baseline lacks: dropped
    assert validation.main("params.yaml", marker="ok") == 2
    assert "did you mean" in capsys.readouterr().err and (tmp_path / "params.yaml").read_text() == good


def test_stage_script_exit_status(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: nope\n")
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "validate.py")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: params.yaml: profile: unknown image profile")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- one line, naming it


def test_values_that_size_memory_are_checked_against_the_machine(tmp_path):
    import pytest

    from deme.config import ConfigError

    (tmp_path / "p.yaml").write_text("profile: tiny\ndata:\n  num_train: 100000000\n")
    with pytest.raises(ConfigError) as e:
        validation.check(tmp_path / "p.yaml")
    assert e.value.key == "data.num_train" and "GiB" in str(e.value) and "\n" not in str(e.value)


def test_a_device_or_a_huge_file_as_params_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (2 << 20))
    for path, words in (("/dev/zero", "not a regular file"), (str(huge), "at most")):
        proc = subprocess.run([sys.executable, str(REPO / "stages" / "prepare.py"), "--params", path], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr and path in proc.stderr


def test_corrupt_json_and_mismatched_weights_name_the_file(tmp_path):
    import pytest

    from conftest import make_tiny_unet
    from deme.io import read_json
    from deme.models import CheckpointError, load_model
    from deme.report.tables import _read

    bad = tmp_path / "merged.json"
    bad.write_text('{"fid":\n')
    for reader in (read_json, _read):
        with pytest.raises(ValueError, match=str(bad)):
            reader(bad)
    model = make_tiny_unet()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(tmp_path / "m" / "config.json")):
        load_model(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # weights that do not fit the model its config.json describes
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["layers_per_block"] = cfg.get("layers_per_block", 1) + 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value) and str(tmp_path / "m") in str(e.value)
