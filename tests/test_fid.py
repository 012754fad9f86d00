"""FID: statistics, Fréchet distance, the clean-fid feature path with the tiny FeatNet, stats files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deme.data.shapes import generate_shapes
from deme.metrics.featnet import FeatNet
from deme.metrics.fid import (FeatureSpace, Stats, array_batches, features, fid_of_features,
                              frechet_distance)


def _feats(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return rng.normal(size=(n, d)) @ mix


def test_stats_of_matches_numpy():
    f = _feats()
    s = Stats.of(f)
    assert s.count == 600
    assert np.allclose(s.mu, f.mean(0))
    assert np.allclose(s.sigma, np.cov(f, rowvar=False))
    assert s.sigma.shape == (16, 16)


def test_fid_of_a_set_against_itself_is_zero():
    s = Stats.of(_feats())
    assert abs(frechet_distance(s, s)) < 1e-6


def test_mean_shift_gives_squared_norm():
    f = _feats()
    shift = np.linspace(-1, 1, 16) * 0.7
    a, b = Stats.of(f), Stats.of(f + shift)
    d = frechet_distance(a, b)
    assert d > 0
    assert d == pytest.approx(float(shift @ shift), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(d, rel=1e-6)


def test_fid_closed_form_for_diagonal_gaussians():
    s1 = np.array([1.0, 4.0, 0.25])
    s2 = np.array([2.0, 1.0, 0.25])
    a = Stats(np.zeros(3), np.diag(s1), 100)
    b = Stats(np.array([1.0, 0.0, -2.0]), np.diag(s2), 100)
    expected = 1.0 + 4.0 + float(np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_grows_with_distribution_shift():
    f = _feats(seed=1)
    ref = Stats.of(f)
    small = frechet_distance(Stats.of(f * 1.1), ref)
    large = frechet_distance(Stats.of(f * 2.0), ref)
    assert 0 < small < large


# ----------------------------------------------------------------------------------------- features

@pytest.fixture(scope="module")
def space():
    """A random FeatNet whose features are rescaled to unit size, so FID values are O(1)."""
    torch.manual_seed(0)
    net = FeatNet(width=4, feature_dim=8).eval()
    imgs = generate_shapes(256, seed=100).images
    with torch.no_grad():
        scale = net(torch.as_tensor(imgs).permute(0, 3, 1, 2).float()).std(0).mean()
        net.body[-1].weight /= scale
        net.body[-1].bias /= scale
    return FeatureSpace(net, "featnet", "0" * 64)


@pytest.fixture(scope="module")
def shapes_a():
    return generate_shapes(256, seed=1).images


def _features(images, space, bs=64):
    return features(array_batches(images, bs), len(images), space, bs)


def test_features_equal_direct_network_output(space, shapes_a):
    feats = _features(shapes_a[:100], space, bs=32)  # 100 = 3 * 32 + 4: the last batch is padded
    assert feats.shape == (100, 8)
    with torch.no_grad():
        direct = space.net(torch.as_tensor(shapes_a[:100]).permute(0, 3, 1, 2).float()).numpy()
    assert np.allclose(feats, direct, atol=1e-5)


def test_features_raise_when_stream_is_short(space, shapes_a):
    with pytest.raises(RuntimeError, match="ended before 100"):
        features(array_batches(shapes_a[:50], 25), 100, space, 25, desc="gen")


def test_array_batches_layout():
    imgs = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    batches = list(array_batches(imgs, 2))
    assert [b.shape for b in batches] == [(2, 3, 2, 2), (2, 3, 2, 2), (1, 3, 2, 2)]
    assert batches[0].dtype == torch.uint8
    assert torch.equal(batches[2][0], torch.as_tensor(imgs[4]).permute(2, 0, 1))


def test_end_to_end_fid_self_is_zero_and_shifts_are_large(space, shapes_a):
    ref = Stats.of(_features(shapes_a, space))
    assert abs(fid_of_features(_features(shapes_a, space), ref)) < 1e-3
    independent = fid_of_features(_features(generate_shapes(256, seed=2).images, space), ref)
    inverted = fid_of_features(_features(255 - shapes_a, space), ref)
    brighter = fid_of_features(_features(np.clip(shapes_a.astype(int) + 60, 0, 255).astype(np.uint8), space),
                               ref)
    assert independent > 1e-3
    assert inverted > 10 * independent
    assert brighter > 2 * independent


def test_feature_space_describe(space):
    assert space.describe() == {"feature_net": "featnet", "feature_net_sha256": "0" * 64, "fid_mode": "clean"}


# ----------------------------------------------------------------------------------------- stats files

def test_stats_save_load_round_trip(tmp_path):
    s = Stats.of(_feats(n=100, d=5))
    path = tmp_path / "sub" / "fid_ref.npz"
    s.save(path, feature_net="featnet", images=100)
    t = Stats.load(path)
    assert np.array_equal(t.mu, s.mu) and np.array_equal(t.sigma, s.sigma)
    assert t.count == 100 and isinstance(t.count, int)
    with np.load(path) as z:
        assert str(z["feature_net"]) == "featnet"
    assert frechet_distance(s, t) == pytest.approx(0.0, abs=1e-9)


def test_stats_load_corrupt_file_names_path(tmp_path):
    good = tmp_path / "good.npz"
    Stats.of(_feats(n=50, d=4)).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a numpy file at all")
    for bad in (truncated, garbage):
        with pytest.raises(ValueError) as e:
            Stats.load(bad)
        assert str(bad) in str(e.value)
        assert "corrupt" in str(e.value)


def test_stats_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro fid_ref"):
        Stats.load(tmp_path / "nope.npz")


def test_stats_load_file_without_keys(tmp_path):
    p = tmp_path / "other.npz"
    np.savez(p, something=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        Stats.load(p)


# ----------------------------------------------------------------------------------------- several spaces, built-ins

def test_array_features_equal_clean_fids_get_model_features(space, shapes_a):
    """deme.evaluation's per-batch path (one sampled batch, several feature spaces) computes exactly what
    clean-fid's get_model_features computes, with an identity and with a real clean-fid resizer."""
    from cleanfid.resize import make_resizer

    from deme.evaluation import array_features

    resized = FeatureSpace(space.net, "featnet-resized", "0" * 64, resize=make_resizer("PIL", False, "bicubic", (24, 24)))
    images = shapes_a[:70]  # 70 = 2 * 32 + 6
    ours = array_features(images, {"a": space, "b": resized}, 32, desc="test")
    assert np.array_equal(ours["a"], _features(images, space, bs=32))
    assert np.array_equal(ours["b"], _features(images, resized, bs=32))
    assert not np.allclose(ours["a"], ours["b"])  # the resize mattered


def test_builtin_stats_from_clean_fids_cache_or_a_clear_error(tmp_path, monkeypatch):
    import cleanfid

    from deme.metrics.fid import builtin_stats, builtin_stats_path

    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    path = builtin_stats_path("cifar10", "train", 32, "legacy_pytorch")
    assert path == tmp_path / "cleanfid" / "stats" / "cifar10_legacy_pytorch_train_32.npz"
    with pytest.raises(FileNotFoundError) as e:
        builtin_stats("cifar10", "train", 32, "legacy_pytorch")
    assert str(path) in str(e.value) and "clean-fid/stats/cifar10_legacy_pytorch_train_32.npz" in str(e.value)
    path.parent.mkdir(parents=True)
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(path, mu=mu, sigma=sigma)
    s = builtin_stats("cifar10", "train", 32, "legacy_pytorch")
    assert np.array_equal(s.mu, mu) and np.array_equal(s.sigma, sigma)
