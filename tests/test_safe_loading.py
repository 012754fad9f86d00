"""Safe loading (issue 8, part 4): the suite never unpickles arbitrary objects from a file it did not write.

Every payload here is a pickle whose loading runs ``os.system("touch <tmp>/pwned")``. Each test feeds it to
one of the suite's readers and checks that the reader refuses it with an error naming the file and that
the marker file does not exist afterwards, i.e. no code ran. Each test also has a control showing that the
same file *does* run the command when read the unsafe way (plain pickle, ``torch.load(weights_only=False)``,
``np.load(allow_pickle=True)``), so the refusal is the reader's doing and the test can fail.

- (a) CIFAR-10 python batches: deme/data/readers.py's restricted unpickler (a DataError naming the file).
- (b) training checkpoints: optimizer.pt / scaler.pt of a resumable checkpoint (deme/train.py
  ``_load_checkpoint``, ``torch.load(weights_only=True)``).
- (c) .npy / .npz with object arrays: load_images, load_set's labels, FID statistics (Stats.load, clean-fid's
  built-in statistics), the claims' and the analysis figures' npz readers (``allow_pickle=False``).
- (d) model weights: load_model / fetch_checkpoint on a folder whose weights are a pickled .bin, the
  Inception weights file and the CLIP weights file.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deme.config import config_from_mapping


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


def _ran(marker: Path) -> bool:
    return marker.exists()


def _may_fail(fn, *args, **kwargs) -> None:
    """A control run: what the payload leaves behind is what counts, not whether the reader then fails."""
    try:
        fn(*args, **kwargs)
    except Exception:
        pass


def test_the_payload_is_live(marker):
    """The control of every test below: plain pickle runs it."""
    pickle.loads(pickle.dumps(Payload(marker), protocol=2))
    assert _ran(marker)


# ---------------------------------------------------------------------------------------------- (a) CIFAR-10

def _cifar_batch(n: int = 3) -> bytes:
    """An official-looking CIFAR-10 python batch (the real files are Python 2 pickles, protocol 2)."""
    data = np.arange(n * 3072, dtype=np.int64).astype(np.uint8).reshape(n, 3072)
    return pickle.dumps({b"batch_label": b"x", b"labels": list(range(n)), b"data": data,
                         b"filenames": [b"f%d.png" % i for i in range(n)]}, protocol=2)


def _cifar_dir(tmp_path: Path, first: bytes) -> Path:
    from deme.data.readers import CIFAR_TEST, CIFAR_TRAIN

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / CIFAR_TRAIN[0]).write_bytes(first)
    for name in (*CIFAR_TRAIN[1:], CIFAR_TEST):
        (d / name).write_bytes(_cifar_batch())
    return d


def test_a_legitimate_cifar_batch_loads(tmp_path):
    """The restricted unpickler is not refusing everything: the real files' contents pass."""
    from deme.data.readers import _load_cifar_batch

    p = tmp_path / "data_batch_1"
    p.write_bytes(_cifar_batch())
    images = _load_cifar_batch(p)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("where", ["whole-file", "inside-the-dict", "inside-a-list"])
def test_malicious_cifar_batch_is_refused(tmp_path, marker, monkeypatch, where):
    from deme.data.readers import DataError, _RestrictedUnpickler, prepare

    evil = Payload(marker)
    obj = {"whole-file": evil, "inside-the-dict": {b"labels": [0], b"data": evil},
           "inside-a-list": {b"labels": [0, evil], b"data": np.zeros((1, 3072), np.uint8)}}[where]
    d = _cifar_dir(tmp_path, pickle.dumps(obj, protocol=2))
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as e:
        prepare("auto", d.parent, out, resolution=8, progress=False)  # format detection, as the stage runs it
    msg = str(e.value)
    assert str(d / "data_batch_1") in msg and "refusing to unpickle" in msg and "system" in msg, msg
    assert "\n" not in msg
    assert not _ran(marker)
    assert not out.exists()  # refused before anything was written
    # control: the same reader with an unrestricted find_class runs the command
    monkeypatch.setattr(_RestrictedUnpickler, "find_class", pickle.Unpickler.find_class)
    _may_fail(prepare, "cifar_python", d, out, resolution=8, progress=False)
    assert _ran(marker)


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("builtins", "exec"), ("os", "system"),
                                          ("subprocess", "Popen"), ("numpy", "load"), ("pickle", "loads")])
def test_every_other_global_is_refused(tmp_path, module, name):
    """Hand-written pickle opcodes: GLOBAL <module> <name>, then a call. Refused at the GLOBAL."""
    from deme.data.readers import DataError, _load_cifar_batch

    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00'x' \x85R.")
    with pytest.raises(DataError, match=f"{p}: refusing to unpickle {module}.{name}"):
        _load_cifar_batch(p)


# ---------------------------------------------------------------------------------------------- (b) checkpoints

class _Scaler:
    def __init__(self):
        self.state = None

    def load_state_dict(self, state):
        self.state = state


def _training_state():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, EMAModel(model.parameters()), opt


def _checkpoint(tmp_path: Path) -> Path:
    from deme.train import _save_checkpoint

    model, ema, opt = _training_state()
    path = tmp_path / "ckpt"
    _save_checkpoint(path, 7, "fp", model, ema, opt)
    torch.save({"scale": 1024.0, "growth_factor": 2.0}, path / "scaler.pt")  # what an fp16 run adds
    return path


def test_a_legitimate_checkpoint_resumes(tmp_path):
    from deme.train import _load_checkpoint

    path = _checkpoint(tmp_path)
    model, ema, opt = _training_state()
    scaler = _Scaler()
    assert _load_checkpoint(path, "fp", model, ema, opt, scaler=scaler) == 7
    assert scaler.state == {"scale": 1024.0, "growth_factor": 2.0}


def _evil_torch_file(path: Path, marker: Path, fmt: str) -> None:
    if fmt == "torch-zip":
        torch.save({"state": Payload(marker), "param_groups": []}, path)
    else:  # a bare pickle, as torch's legacy format reader sees it
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))


@pytest.mark.parametrize("fmt", ["torch-zip", "bare-pickle"])
@pytest.mark.parametrize("name", ["optimizer.pt", "scaler.pt"])
def test_malicious_checkpoint_file_is_refused_on_resume(tmp_path, marker, monkeypatch, name, fmt):
    from deme.train import _load_checkpoint

    path = _checkpoint(tmp_path)
    _evil_torch_file(path / name, marker, fmt)
    model, ema, opt = _training_state()
    with pytest.raises((RuntimeError, OSError, ValueError)) as e:
        _load_checkpoint(path, "fp", model, ema, opt, scaler=_Scaler())
    assert str(path) in str(e.value) and "Weights only load failed" in str(e.value)
    assert not _ran(marker)
    # control: the same resume with an unrestricted torch.load runs the command
    unsafe = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unsafe(*a, **{**k, "weights_only": False}))
    _may_fail(_load_checkpoint, path, "fp", model, ema, opt, scaler=_Scaler())
    assert _ran(marker)


def test_refused_checkpoint_error_is_one_line_for_the_stage_cli(tmp_path, marker):
    from deme.models import CheckpointError
    from deme.train import _load_checkpoint

    path = _checkpoint(tmp_path)
    _evil_torch_file(path / "optimizer.pt", marker, "torch-zip")
    model, ema, opt = _training_state()
    with pytest.raises(Exception) as e:
        _load_checkpoint(path, "fp", model, ema, opt)
    assert not _ran(marker)
    assert isinstance(e.value, (CheckpointError, ValueError)), type(e.value)  # what run_stage reports in one line
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- (c) numpy files

def _object_array(marker: Path) -> np.ndarray:
    a = np.empty(1, dtype=object)
    a[0] = Payload(marker)
    return a


def _unsafe_npz_read(path: Path) -> None:
    with np.load(path, allow_pickle=True) as z:
        [z[k] for k in z.files]


def test_object_npy_is_refused_by_load_images(tmp_path, marker):
    from deme.data import load_images

    p = tmp_path / "train.npy"
    np.save(p, _object_array(marker), allow_pickle=True)
    with pytest.raises(ValueError, match=f"{p}: corrupt dataset file"):
        load_images(p)
    assert not _ran(marker)
    np.load(p, allow_pickle=True)  # control
    assert _ran(marker)


def test_object_labels_npz_is_refused_by_load_set(tmp_path, marker):
    from deme.data import load_set, meta_path, save_images

    p = tmp_path / "train.npy"
    save_images(p, np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(meta_path(p), shape=np.zeros(2), captions=_object_array(marker))
    with pytest.raises(ValueError, match=f"{meta_path(p)}: corrupt label file"):
        load_set(p)
    assert not _ran(marker)
    _unsafe_npz_read(meta_path(p))
    assert _ran(marker)


def _evil_stats(path: Path, marker: Path) -> None:
    np.savez(path, mu=_object_array(marker), sigma=np.eye(1), count=np.asarray(5))


def test_object_fid_stats_are_refused(tmp_path, marker, monkeypatch):
    from deme.metrics import fid

    p = tmp_path / "ref_stats.npz"
    _evil_stats(p, marker)
    with pytest.raises(ValueError, match=f"{p}: corrupt FID statistics"):
        fid.Stats.load(p)
    # clean-fid's downloaded statistics, a file from the network
    monkeypatch.setattr(fid, "builtin_stats_path", lambda *a: p)
    with pytest.raises(ValueError, match=f"{p}: corrupt clean-fid statistics"):
        fid.builtin_stats("cifar10", "train", 32, "clean")
    assert not _ran(marker)
    _unsafe_npz_read(p)
    assert _ran(marker)


def test_object_npz_is_refused_by_report_and_figure_readers(tmp_path, marker):
    from deme.analysis.figures import _load
    from deme.report.claims import _npz

    p = tmp_path / "gradsim.npz"
    _evil_stats(p, marker)
    assert _npz(p) is None  # the claims table treats it as missing evidence
    with pytest.raises(ValueError, match="allow_pickle=False"):
        _load(p)
    assert not _ran(marker)
    _unsafe_npz_read(p)
    assert _ran(marker)


# ---------------------------------------------------------------------------------------------- (d) weights

def _unet_dir(tmp_path: Path, name: str, safetensors: bool) -> Path:
    from conftest import make_tiny_unet

    path = tmp_path / name
    make_tiny_unet().save_pretrained(path, safe_serialization=safetensors)
    return path


BIN = "diffusion_pytorch_model.bin"


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "channel-projection"])
def test_model_dir_with_malicious_bin_is_refused(tmp_path, marker, projection):
    from deme.models import load_model

    path = _unet_dir(tmp_path, "model", safetensors=False)
    _evil_torch_file(path / BIN, marker, "torch-zip")
    if projection:  # deme.json as save_model writes it: load_model reads the safetensors file itself
        (path / "deme.json").write_text(json.dumps({"channel_projection": True}))
    with pytest.raises(OSError) as e:  # CheckpointError is an OSError (FileNotFoundError)
        load_model(path)
    assert str(path) in str(e.value)
    assert not _ran(marker)
    torch.load(path / BIN, weights_only=False)  # control
    assert _ran(marker)


def test_safetensors_are_read_and_a_stray_bin_is_never_touched(tmp_path, marker):
    from deme.models import load_model

    path = _unet_dir(tmp_path, "model", safetensors=True)
    _evil_torch_file(path / BIN, marker, "torch-zip")
    model = load_model(path)
    assert type(model).__name__ == "UNet2DModel"
    assert not _ran(marker)


def test_model_dir_with_only_a_pickled_bin_is_not_loaded(tmp_path):
    from deme.models import CheckpointError, load_model

    path = _unet_dir(tmp_path, "model", safetensors=False)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)


def test_hub_checkpoint_with_malicious_bin_is_refused(tmp_path, marker):
    """model.local_path: the user's download, a file the suite did not write."""
    from deme.models import CheckpointError, fetch_checkpoint

    path = _unet_dir(tmp_path, "ddpm-cifar10-32", safetensors=False)
    _evil_torch_file(path / BIN, marker, "torch-zip")
    cfg = config_from_mapping({"profile": "cifar10", "model": {"local_path": str(path)}})
    with pytest.raises(CheckpointError, match=f"{path}: unreadable checkpoint"):
        fetch_checkpoint(cfg)
    assert not _ran(marker)


@pytest.mark.parametrize("mode", ["legacy_pytorch", "clean"])
def test_malicious_inception_weights_are_refused(tmp_path, marker, mode):
    """fid.inception_weights: a .pth state dict (legacy_pytorch) or a TorchScript archive (the others)."""
    from deme.metrics.inception import inception_space

    p = tmp_path / "inception.pth"
    _evil_torch_file(p, marker, "torch-zip")
    with pytest.raises(Exception) as e:
        inception_space(mode, "cpu", weights=p)
    assert not _ran(marker), type(e.value)
    if mode == "legacy_pytorch":  # torch's refusal, reported in one line naming the file
        assert str(p) in str(e.value) and "UnpicklingError" in str(e.value) and "\n" not in str(e.value)
    else:
        assert str(p) in str(e.value) and "not a TorchScript" in str(e.value)


def test_malicious_clip_weights_are_refused(tmp_path, marker):
    """clip.local_path: open_clip's loader with weights_only=True."""
    from deme.metrics.clip import load_clip

    p = tmp_path / "open_clip_pytorch_model.bin"
    buf = io.BytesIO()
    torch.save({"state_dict": Payload(marker)}, buf)
    p.write_bytes(buf.getvalue())
    cfg = config_from_mapping({"t2i": {"profile": "micro_t2i", "clip": {"train": False, "local_path": str(p)}}},
                              "t2i")
    with pytest.raises(ValueError, match=f"{p}: not loadable as open_clip"):
        load_clip(cfg, "cpu")
    assert not _ran(marker)


def test_outputs_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the renamed output has the umask's mode."""
    import os
    import stat

    from deme.io import _UMASK, atomic_dir, atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o666 & ~_UMASK
    assert stat.S_IMODE(os.stat(tmp_path / "model").st_mode) == 0o777 & ~_UMASK
    assert _UMASK == os.umask(_UMASK)  # read without changing it
