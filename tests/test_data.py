"""The shapes dataset generator and the dataset file format (save_set / load_set)."""
from __future__ import annotations

import numpy as np
import pytest

from deme.data import load_images, load_set, save_set
from deme.data.shapes import BACKGROUNDS, COLORS, NUM_CLASSES, SHAPES, SIZES, caption, generate_shapes


@pytest.fixture(scope="module")
def small_set():
    return generate_shapes(40, seed=3)


def test_shapes_are_uint8_images_with_labels(small_set):
    s = small_set
    assert s.images.shape == (40, 16, 16, 3) and s.images.dtype == np.uint8
    assert len(s) == 40 and len(s.captions) == 40
    for arr, n in ((s.shape, len(SHAPES)), (s.color, len(COLORS)), (s.background, len(BACKGROUNDS)),
                   (s.size, len(SIZES))):
        assert arr.shape == (40,) and arr.min() >= 0 and arr.max() < n
    assert ((s.labels >= 0) & (s.labels < NUM_CLASSES)).all()
    assert np.array_equal(s.labels, s.shape * len(COLORS) + s.color)
    assert s.images.std() > 10  # not blank


def test_other_resolution():
    s = generate_shapes(5, seed=0, resolution=8)
    assert s.images.shape == (5, 8, 8, 3)


def test_deterministic_for_a_seed(small_set):
    again = generate_shapes(40, seed=3)
    assert np.array_equal(again.images, small_set.images)
    assert again.captions == small_set.captions
    assert np.array_equal(again.color, small_set.color)


def test_chunking_does_not_change_images(small_set):
    assert np.array_equal(generate_shapes(40, seed=3, chunk=7).images, small_set.images)


def test_different_seeds_differ(small_set):
    other = generate_shapes(40, seed=4)
    assert not np.array_equal(other.images, small_set.images)
    assert other.captions != small_set.captions


def test_captions_name_shape_colour_background_size(small_set):
    s = small_set
    for i, c in enumerate(s.captions):
        assert SHAPES[s.shape[i]] in c
        assert list(COLORS)[s.color[i]] in c
        assert list(BACKGROUNDS)[s.background[i]] in c
        assert c.startswith(f"a {SIZES[s.size[i]]} ")
    assert caption(0, 0, 0, 0) == "a small red circle on a black background"


def test_foreground_colour_is_present(small_set):
    """The shape is drawn in its colour: some pixel is close to the (jittered) colour."""
    s = small_set
    for i in range(10):
        rgb = np.asarray(list(COLORS.values())[s.color[i]], float)
        dist = np.abs(s.images[i].astype(float)[..., None, :] - rgb[None, None, None, :] * np.array(
            [0.85, 1.0, 1.1])[:, None]).sum(-1).min()
        assert dist < 60


def test_save_load_round_trip(tmp_path, small_set):
    p = tmp_path / "deep" / "train.npy"
    p.parent.mkdir()
    save_set(p, small_set)
    out = load_set(p)
    assert np.array_equal(out["images"], small_set.images) and out["images"].dtype == np.uint8
    assert isinstance(out["images"], np.memmap), "images are read memory-mapped"
    for k in ("shape", "color", "background", "size"):
        assert np.array_equal(out[k], getattr(small_set, k))
    assert list(out["captions"]) == small_set.captions
    assert np.array_equal(load_images(p), small_set.images)
    names = sorted(f.name for f in p.parent.iterdir())
    assert names == ["train.meta.npz", "train.npy"], f"temporary files left behind: {names}"


def test_truncated_file_raises_value_error_naming_path(tmp_path, small_set):
    p = tmp_path / "train.npy"
    save_set(p, small_set)
    data = p.read_bytes()
    for cut in (0, 10, 100, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.npy"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError) as e:
            load_set(bad)
        assert str(bad) in str(e.value)
        assert "dvc repro prepare" in str(e.value)


def test_garbage_file_raises_value_error(tmp_path):
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="x.npy"):
        load_set(bad)


def test_wrong_content_raises_value_error(tmp_path):
    p = tmp_path / "wrong.npy"
    np.save(p, np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_set(p)
    q = tmp_path / "gray.npy"
    np.save(q, np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="gray.npy"):
        load_set(q)


def test_corrupted_label_file_raises_value_error_naming_path(tmp_path, small_set):
    p = tmp_path / "train.npy"
    save_set(p, small_set)
    meta = tmp_path / "train.meta.npz"
    data = meta.read_bytes()
    problems = []
    for pos in (200, len(data) // 4, len(data) // 2):
        rot = bytearray(data)
        for j in range(16):
            rot[pos + j] ^= 0xFF
        meta.write_bytes(bytes(rot))
        try:
            load_set(p)
            problems.append(f"{pos}: loaded without error")
        except ValueError as e:
            if str(meta) not in str(e):
                problems.append(f"{pos}: ValueError without the path: {e}")
        except Exception as e:  # noqa: BLE001 - the bug: any other exception type
            problems.append(f"{pos}: {type(e).__module__}.{type(e).__name__}: {e}")
    assert not problems, problems


def test_missing_file_names_dvc_repro(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_set(tmp_path / "nope.npy")
    assert "dvc repro" in str(e.value)
    assert "nope.npy" in str(e.value)
