"""Real-dataset readers of the `prepare` stage (deme.data.readers), on tiny fake datasets built here.

Covers the four input layouts (CIFAR-10 python pickles, parquet in the HF export layout, image folders,
LSUN lmdb when the lmdb module is installed), the docs/paper.md §1.6 transform (shorter side to the resolution,
bilinear, then a random or center crop, no flip), subsets and reference-set sources, corrupt images, the
restricted unpickler, and the output files (exact .npy header count, sha256 in the manifest).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from deme.data import readers
from deme.data.readers import DataError, detect_format, prepare, transform_image


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def write_cifar(root, n=20, seed=0):
    """data_batch_1..5 + test_batch as Python-3 protocol-2 pickles; returns {name: uint8 [n, 3072]}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batches[name] = data
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(), b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return batches


def hwc(data):
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def png_bytes(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def gradient(h, w):
    """R = 2x, G = 2y (sides up to 128): positions can be read back from the pixels."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (2 * np.arange(w))[None, :]
    img[..., 1] = (2 * np.arange(h))[:, None]
    return img


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_npy(path, n, r):
    """Loadable with mmap, exact count in the header, and no bytes past the data."""
    a = np.load(path, mmap_mode="r")
    assert a.shape == (n, r, r, 3) and a.dtype == np.uint8
    assert a.offset + n * r * r * 3 == os.path.getsize(path)
    return np.asarray(a)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 python format
# ----------------------------------------------------------------------------------------------------

def test_cifar_identity_at_32_with_test_batch_as_reference(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "out"
    m = prepare("cifar_python", tmp_path / "cifar-10-batches-py", out, resolution=32, progress=False)
    train = check_npy(out / "train.npy", 100, 32)
    ref = check_npy(out / "ref.npy", 20, 32)
    expected = np.concatenate([hwc(batches[f"data_batch_{i}"]) for i in range(1, 6)])
    assert np.array_equal(train, expected)
    assert np.array_equal(ref, hwc(batches["test_batch"]))
    assert m["num_train"] == 100 and m["num_ref"] == 20 and m["ref_source"] == "held-out split"
    assert m["sha256"] == {"train.npy": sha(out / "train.npy"), "ref.npy": sha(out / "ref.npy")}
    assert m["skipped"] == [] and m["format"] == "cifar_python" and m["resolution"] == 32
    assert json.loads((out / "manifest.json").read_text()) == m
    # the parent of cifar-10-batches-py works too
    m2 = prepare("cifar_python", tmp_path, tmp_path / "out2", resolution=32, progress=False)
    assert m2["sha256"] == m["sha256"]


def test_cifar_num_train_subset_is_seeded_and_in_source_order(tmp_path):
    batches = write_cifar(tmp_path / "c")
    source = np.concatenate([hwc(batches[f"data_batch_{i}"]) for i in range(1, 6)])

    def subset(seed, out):
        prepare("cifar_python", tmp_path / "c", tmp_path / out, resolution=32, num_train=30, num_ref=5,
                seed=seed, progress=False)
        arr = check_npy(tmp_path / out / "train.npy", 30, 32)
        # which source images were taken (random pixels: every image is unique)
        idx = [int(np.flatnonzero((source == img).all(axis=(1, 2, 3)))[0]) for img in arr]
        ref = check_npy(tmp_path / out / "ref.npy", 5, 32)
        assert all((hwc(batches["test_batch"]) == r).all(axis=(1, 2, 3)).any() for r in ref)
        return idx

    a, b, c = subset(1, "a"), subset(1, "b"), subset(2, "c")
    assert a == b and a != c
    assert a == sorted(a) and len(set(a)) == 30
    with pytest.raises(DataError, match="only 100"):
        prepare("cifar_python", tmp_path / "c", tmp_path / "d", resolution=32, num_train=101, progress=False)


def test_cifar_resized_to_another_resolution(tmp_path):
    write_cifar(tmp_path / "c", n=2)
    m = prepare("cifar_python", tmp_path / "c", tmp_path / "o", resolution=16, progress=False)
    check_npy(tmp_path / "o" / "train.npy", 10, 16)
    assert m["num_ref"] == 2


def test_cifar_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path / "c", n=2)
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*missing"):
        prepare("cifar_python", tmp_path / "c", tmp_path / "o", resolution=32, progress=False)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARKER}",))


EVIL_MARKER = ""


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    global EVIL_MARKER
    write_cifar(tmp_path / "c", n=2)
    marker = tmp_path / "pwned"
    EVIL_MARKER = str(marker)
    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_2.*refusing to unpickle .*system"):
        prepare("cifar_python", tmp_path / "c", tmp_path / "o", resolution=32, progress=False)
    assert not marker.exists()
    # sanity: the payload does run with plain pickle (so the test can fail)
    pickle.loads(pickle.dumps(Evil(), protocol=2))
    assert marker.exists()


def test_cifar_batch_with_wrong_content_is_named(tmp_path):
    write_cifar(tmp_path / "c", n=2)
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8)}, f, protocol=2)
    with pytest.raises(DataError, match="test_batch.*3072"):
        prepare("cifar_python", tmp_path / "c", tmp_path / "o", resolution=32, progress=False)
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch.*not a readable"):
        prepare("cifar_python", tmp_path / "c", tmp_path / "o", resolution=32, progress=False)


# ----------------------------------------------------------------------------------------------------
# parquet (HF datasets export layout)
# ----------------------------------------------------------------------------------------------------

def write_parquet(path, images, struct=True, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [im if isinstance(im, bytes) else png_bytes(im) for im in images]
    if struct:
        col = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
                       type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        col = pa.array(blobs, type=pa.binary())
    table = pa.table({"image": col, "label": pa.array(list(range(len(blobs))), pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_hf_layout_resized_cropped_with_test_file_as_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 4)  # several row batches per file
    train_imgs = [noise(30, 40, i) for i in range(7)] + [noise(30, 40, 7)]  # 40 wide, 30 high
    test_imgs = [noise(30, 40, 100 + i) for i in range(3)]
    root = tmp_path / "lsun" / "data"
    write_parquet(root / "train-00000-of-00002.parquet", train_imgs[:5], row_group_size=3)
    write_parquet(root / "train-00001-of-00002.parquet", train_imgs[5:])
    write_parquet(root / "test-00000-of-00001.parquet", test_imgs)
    assert detect_format(tmp_path / "lsun") == "parquet"
    out = tmp_path / "out"
    m = prepare("parquet", tmp_path / "lsun", out, resolution=16, seed=5, progress=False)
    train, ref = check_npy(out / "train.npy", 8, 16), check_npy(out / "ref.npy", 3, 16)
    for i, img in enumerate(train_imgs):  # random crop with the (seed, source index) RNG
        assert np.array_equal(train[i], transform_image(img, 16, "random", seed=5, index=i))
    for i, img in enumerate(test_imgs):  # reference images are center-cropped
        assert np.array_equal(ref[i], transform_image(img, 16, "center"))
    assert m["ref_source"] == "held-out split" and m["num_train"] == 8 and m["num_ref"] == 3
    assert m["sha256"]["train.npy"] == sha(out / "train.npy")


def test_parquet_plain_binary_column_and_corrupt_row(tmp_path):
    imgs = [noise(20, 20, 0), b"\x00garbage", noise(20, 20, 2)]
    write_parquet(tmp_path / "p" / "train.parquet", imgs, struct=False)
    write_parquet(tmp_path / "p" / "valid.parquet", [noise(20, 20, 3)], struct=False)
    m = prepare("parquet", tmp_path / "p", tmp_path / "o", resolution=20, progress=False)
    train = check_npy(tmp_path / "o" / "train.npy", 2, 20)
    assert np.array_equal(train[0], imgs[0]) and np.array_equal(train[1], imgs[2])
    assert [s["item"] for s in m["skipped"]] == [f"{tmp_path / 'p' / 'train.parquet'}:1"]
    with pytest.raises(DataError, match=r"train\.parquet:1"):
        prepare("parquet", tmp_path / "p", tmp_path / "o2", resolution=20, on_corrupt="fail", progress=False)


def test_parquet_without_image_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet.*no image column.*pixels"):
        prepare("parquet", tmp_path / "train.parquet", tmp_path / "o", resolution=8, num_ref=1,
                progress=False)


# ----------------------------------------------------------------------------------------------------
# image folder, corrupt images
# ----------------------------------------------------------------------------------------------------

def make_folder(root):
    """4 good images (PNG + JPEG, nested, an upper-case extension), a random-bytes .jpg, a truncated PNG."""
    (root / "sub").mkdir(parents=True)
    Image.fromarray(noise(24, 24, 0)).save(root / "a.png")
    Image.fromarray(noise(24, 30, 1)).save(root / "b.JPG", quality=95)
    Image.fromarray(noise(30, 24, 2)).convert("L").save(root / "sub" / "c.png")  # grey -> RGB
    Image.fromarray(noise(24, 24, 3)).save(root / "sub" / "d.jpeg")
    (root / "bad.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    whole = png_bytes(noise(40, 40, 4))
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image")
    return ["a.png", "b.JPG", "sub/c.png", "sub/d.jpeg"]


def test_image_folder_skips_and_lists_corrupt_images(tmp_path, capsys):
    good = make_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    # num_ref = every training image: the two corrupt ones are met twice but listed once
    m = prepare("image_folder", tmp_path / "imgs", out, resolution=16, crop="center", num_ref=6,
                progress=False)
    train = check_npy(out / "train.npy", 4, 16)  # the header holds the exact count
    assert np.array_equal(check_npy(out / "ref.npy", 4, 16), train)  # both center-cropped here
    skipped = sorted(s["item"] for s in m["skipped"])
    assert skipped == [str(tmp_path / "imgs" / "bad.jpg"), str(tmp_path / "imgs" / "cut.png")]
    assert all(s["error"] for s in m["skipped"])
    err = capsys.readouterr().err
    assert "bad.jpg" in err and "cut.png" in err
    for arr, name in zip(train, good):
        assert np.array_equal(arr, transform_image(Image.open(tmp_path / "imgs" / name), 16, "center"))
    assert m["num_train"] == 4 and m["ref_source"] == "random training images"
    assert m["sha256"] == {"train.npy": sha(out / "train.npy"), "ref.npy": sha(out / "ref.npy")}


def test_image_folder_fail_mode_names_the_corrupt_file(tmp_path):
    make_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.jpg.*on_corrupt=skip"):
        prepare("image_folder", tmp_path / "imgs", out, resolution=16, num_ref=2, on_corrupt="fail",
                progress=False)
    assert not (out / "train.npy").exists() and not (out / "manifest.json").exists()


def test_many_skips_are_summarised_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(readers, "MAX_WARNINGS", 2)
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(noise(8, 8, 0)).save(root / "ok.png")
    for i in range(5):
        (root / f"x{i}.png").write_bytes(b"junk")
    write_cifar(tmp_path / "c", n=1)
    m = prepare("image_folder", root, tmp_path / "o", resolution=8, ref_path=tmp_path / "c", progress=False)
    err = capsys.readouterr().err
    assert len(m["skipped"]) == 5 and err.count("skipping") == 2 and "5 images skipped" in err
    check_npy(tmp_path / "o" / "train.npy", 1, 8)


def test_reference_from_random_training_images_and_ref_path(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    imgs = [noise(32, 32, i) for i in range(12)]
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(root / f"{i:02d}.png")
    m = prepare("image_folder", root, tmp_path / "o", resolution=32, num_ref=4, seed=3, progress=False)
    ref = check_npy(tmp_path / "o" / "ref.npy", 4, 32)
    idx = [next(i for i, im in enumerate(imgs) if np.array_equal(im, r)) for r in ref]
    assert m["ref_source"] == "random training images" and idx == sorted(idx) and len(set(idx)) == 4
    m2 = prepare("image_folder", root, tmp_path / "o2", resolution=32, num_ref=4, seed=3, progress=False)
    assert m2["sha256"] == m["sha256"]
    # no held-out split and num_ref == 0: nothing to build the reference from
    with pytest.raises(DataError, match="no held-out split.*num_ref"):
        prepare("image_folder", root, tmp_path / "o3", resolution=32, progress=False)
    # ref_path wins over everything, and may be another format
    write_cifar(tmp_path / "c", n=2)
    m4 = prepare("image_folder", root, tmp_path / "o4", resolution=32, ref_path=tmp_path / "c",
                 progress=False)
    assert m4["ref_source"] == "ref_path" and m4["ref_format"] == "cifar_python" and m4["num_ref"] == 12


def test_all_images_corrupt_is_an_error(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1"):
        prepare("image_folder", tmp_path / "i", tmp_path / "o", resolution=8, num_ref=1, progress=False)
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no images found"):
        prepare("image_folder", tmp_path / "e", tmp_path / "o", resolution=8, num_ref=1, progress=False)


# ----------------------------------------------------------------------------------------------------
# transform (docs/paper.md §1.6)
# ----------------------------------------------------------------------------------------------------

def test_shorter_side_resize_and_center_crop_geometry():
    # 96 wide x 48 high -> shorter side 48 -> 16 (scale 1/3) -> 32 x 16 -> center crop x in [8, 24)
    out = transform_image(Image.fromarray(gradient(48, 96)), 16, "center")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    c = np.arange(16)
    # resized pixel j covers source pixels around 3j + 1; R = 2x, G = 4y (linear: bilinear keeps it
    # exactly, away from the image border; the crop is away from it on the long side)
    exp_r = 2 * (3 * (c + 8) + 1)
    assert np.abs(out[8, :, 0].astype(int) - exp_r).max() <= 1
    exp_g = 2 * (3 * c + 1)
    assert np.abs(out[2:-2, 8, 1].astype(int) - exp_g[2:-2]).max() <= 1
    # portrait: same on the other axis
    tall = transform_image(Image.fromarray(gradient(96, 48)), 16, "center")
    assert np.abs(tall[:, 8, 1].astype(int) - 2 * (3 * (c + 8) + 1)).max() <= 1
    # no resize when the shorter side already matches; a square input is the identity
    sq = noise(16, 16, 0)
    assert np.array_equal(transform_image(Image.fromarray(sq), 16, "random", seed=9), sq)
    assert np.array_equal(transform_image(sq, 16), sq)


def test_random_crop_is_deterministic_per_seed_and_index_and_not_flipped():
    img = Image.fromarray(gradient(20, 120))  # -> 96 x 16: 81 possible offsets
    resized = np.asarray(img.resize((96, 16), Image.BILINEAR))
    a = transform_image(img, 16, "random", seed=0, index=7)
    assert np.array_equal(a, transform_image(img, 16, "random", seed=0, index=7))
    crops = {transform_image(img, 16, "random", seed=s, index=7).tobytes() for s in range(6)}
    assert len(crops) > 1  # another seed, another crop
    crops = {transform_image(img, 16, "random", seed=0, index=i).tobytes() for i in range(6)}
    assert len(crops) > 1  # another image, another crop
    # a window of the resized image, left to right (no flip)
    offsets = [x for x in range(96 - 16 + 1) if np.array_equal(resized[:, x:x + 16], a)]
    assert len(offsets) == 1
    assert (np.diff(a[8, :, 0].astype(int)) > 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop"):
        transform_image(noise(8, 8, 0), 4, "middle")
    with pytest.raises(DataError, match="crop"):
        prepare("image_folder", ".", "/nonexistent", resolution=8, crop="middle")
    with pytest.raises(DataError, match="format"):
        prepare("tfrecord", ".", "/nonexistent", resolution=8)


# ----------------------------------------------------------------------------------------------------
# format detection, lmdb
# ----------------------------------------------------------------------------------------------------

def test_detect_format(tmp_path):
    write_cifar(tmp_path / "cifar", n=1)
    assert detect_format(tmp_path / "cifar") == "cifar_python"
    assert detect_format(tmp_path) == "image_folder"  # cifar-10-batches-py is not directly there
    (tmp_path / "pq" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "pq" / "data" / "train-0.parquet", [noise(4, 4, 0)])
    assert detect_format(tmp_path / "pq") == "parquet"
    assert detect_format(tmp_path / "pq" / "data" / "train-0.parquet") == "parquet"
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "data.mdb").write_bytes(b"")
    assert detect_format(tmp_path / "lm") == "lmdb"
    assert detect_format(tmp_path / "lm" / "data.mdb") == "lmdb"
    (tmp_path / "imgs").mkdir()
    Image.fromarray(noise(4, 4, 0)).save(tmp_path / "imgs" / "a.png")
    assert detect_format(tmp_path / "imgs") == "image_folder"
    with pytest.raises(DataError, match=r"nowhere.*not found.*put the dataset there"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"a\.png: is a file"):
        detect_format(tmp_path / "imgs" / "a.png")
    with pytest.raises(DataError, match="nowhere.*not found"):
        prepare("image_folder", tmp_path / "nowhere", tmp_path / "o", resolution=8, num_ref=1)


def test_lmdb_missing_module_says_pip_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lmdb(name, *a, **k):
        if name == "lmdb":
            raise ImportError("No module named 'lmdb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lmdb)
    (tmp_path / "data.mdb").write_bytes(b"")
    with pytest.raises(DataError, match="pip install lmdb"):
        prepare("lmdb", tmp_path, tmp_path / "o", resolution=8, num_ref=1, progress=False)


def test_lmdb_lsun_export(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    imgs = [noise(24, 32, i) for i in range(4)]
    env = lmdb.open(str(tmp_path / "church_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, im in enumerate(imgs):
            txn.put(f"{i:040x}".encode(), png_bytes(im, "WEBP") if i != 2 else b"broken")
    env.close()
    assert detect_format(tmp_path / "church_lmdb") == "lmdb"
    m = prepare("lmdb", tmp_path / "church_lmdb", tmp_path / "o", resolution=16, num_ref=2, progress=False)
    check_npy(tmp_path / "o" / "train.npy", 3, 16)
    assert m["skipped"][0]["item"] == f"{2:040x}"


class FakeLmdb:
    """Just the py-lmdb API the reader uses (open, Environment.stat/begin, Transaction.cursor), so the
    reader's own logic is tested where the lmdb module is not installed."""

    Error = Exception

    def __init__(self, records):
        self.records, self.opened = records, []

    def open(self, path, **kw):
        self.opened.append((path, kw))
        return self

    def stat(self):
        return {"entries": len(self.records)}

    def begin(self, write=False):
        import contextlib
        return contextlib.nullcontext(self)

    def cursor(self):
        return iter(sorted(self.records.items()))


def test_lmdb_reader_logic_with_a_fake_module(tmp_path, monkeypatch):
    import sys

    imgs = [noise(24, 32, i) for i in range(4)]
    records = {f"{i:040x}".encode(): png_bytes(im) for i, im in enumerate(imgs)}
    records[f"{2:040x}".encode()] = b"broken"
    fake = FakeLmdb(records)
    monkeypatch.setitem(sys.modules, "lmdb", fake)
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"")
    m = prepare("auto", tmp_path / "db", tmp_path / "o", resolution=16, num_ref=3, seed=1, progress=False)
    train = check_npy(tmp_path / "o" / "train.npy", 3, 16)
    for row, i in zip(train, (0, 1, 3)):
        assert np.array_equal(row, transform_image(imgs[i], 16, "random", seed=1, index=i))
    assert m["format"] == "lmdb" and m["skipped"][0]["item"] == f"{2:040x}"
    assert fake.opened[0][1]["readonly"] is True and fake.opened[0][1]["subdir"] is True
