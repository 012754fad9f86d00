"""Captioned datasets in deme.data.readers (``data.kind: laion``, docs/paper.md §8.2): an image folder with
metadata.csv / metadata.jsonl / sidecar .txt captions, or parquet with a text column. The captions of the
kept images reach train.meta.npz / ref.meta.npz (key ``captions``, read by deme.data.load_set) in image
order; bad captions and bad metadata rows are skipped and listed, or fatal naming the file and line.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from deme.data import load_set
from deme.data.readers import (CaptionError, DataError, has_surrogates, prepare, read_lines,
                                 transform_image)


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_laion(root, *, bad_utf8=True, missing_row=True, corrupt=True):
    """Six images 0..5.png with captions in metadata.csv (BK-SDM layout). Problems (each optional):
    line 4 (image 2) has bad UTF-8 in its caption, a row names 'gone.png' (not there), 4.png is corrupt."""
    root.mkdir(parents=True)
    lines = [b"file_name,text"]
    for i in range(6):
        if i == 4 and corrupt:
            (root / "4.png").write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(noise(20, 24, i)).save(root / f"{i}.png")
        text = f"a photo number {i}, with a comma".encode()
        if i == 2 and bad_utf8:
            text = b"caf\xe9 au lait"  # latin-1, not UTF-8
        lines.append(b"%d.png,\"%s\"" % (i, text))
    if missing_row:
        lines.insert(3, b"gone.png,a picture that is not there")  # line 4
    (root / "metadata.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")
    return root


def line_of(root, needle: bytes) -> int:
    return next(i for i, l in enumerate((root / "metadata.csv").read_bytes().split(b"\n"), 1) if needle in l)


def captions_of(path):
    return [str(c) for c in load_set(path)["captions"]]


def test_folder_metadata_csv_skip_mode_keeps_images_and_captions_aligned(tmp_path, capsys):
    root = make_laion(tmp_path / "laion")
    out = tmp_path / "out"
    m = prepare("image_folder", root, out, resolution=16, crop="center", num_ref=6, captions=True, progress=False)
    # kept: 0, 1, 3, 5 (2: bad caption, 4: corrupt image); the reference draws all six again
    train = load_set(out / "train.npy")
    assert train["images"].shape == (4, 16, 16, 3)
    assert captions_of(out / "train.npy") == [f"a photo number {i}, with a comma" for i in (0, 1, 3, 5)]
    assert captions_of(out / "ref.npy") == captions_of(out / "train.npy")
    skipped = {s["item"]: s["error"] for s in m["skipped"]}
    bad_line, gone_line = line_of(root, b"caf"), line_of(root, b"gone.png")
    assert set(skipped) == {str(root / "2.png"), str(root / "4.png"), f"{root / 'metadata.csv'}:{gone_line}"}
    assert f"metadata.csv line {bad_line}: not valid UTF-8 (byte 0xe9" in skipped[str(root / "2.png")]
    assert "CaptionError" in skipped[str(root / "2.png")]
    assert f"line {gone_line}: image 'gone.png' not found" in skipped[f"{root / 'metadata.csv'}:{gone_line}"]
    assert m["captions"] == {"train.meta.npz": 4, "ref.meta.npz": 4}
    assert set(m["sha256"]) == {"train.npy", "ref.npy", "train.meta.npz", "ref.meta.npz"}
    assert "gone.png" in capsys.readouterr().err
    # a training image's pixels and its caption belong together
    assert np.array_equal(train["images"][2], transform_image(Image.open(root / "3.png"), 16, "center"))


@pytest.mark.parametrize("problem, match", [
    ("missing_row", r"metadata\.csv line 4: image 'gone\.png' not found.*on_corrupt=skip"),
    ("bad_utf8", r"metadata\.csv line 4: not valid UTF-8 \(byte 0xe9 at column 11\).*fix the caption"),
    ("corrupt", r"4\.png: cannot read image"),
])
def test_folder_fail_mode_names_file_and_line(tmp_path, problem, match):
    flags = {"bad_utf8": False, "missing_row": False, "corrupt": False, problem: True}
    root = make_laion(tmp_path / "laion", **flags)
    if problem == "bad_utf8":  # 2.png is on line 4 without the extra row
        assert line_of(root, b"caf") == 4
    with pytest.raises(DataError, match=match):
        prepare("image_folder", root, tmp_path / "o", resolution=16, num_ref=2, captions=True,
                on_corrupt="fail", progress=False)
    assert not (tmp_path / "o" / "train.meta.npz").exists()


def test_missing_and_empty_captions_and_sidecars(tmp_path):
    root = tmp_path / "side"
    root.mkdir()
    for i in range(4):
        Image.fromarray(noise(8, 8, i)).save(root / f"{i}.jpg")
    (root / "0.txt").write_text("a sidecar caption\n")
    (root / "1.jpg.txt").write_text("the other sidecar naming\n")
    (root / "2.txt").write_text("   \n")  # empty
    # 3.jpg: no caption at all
    m = prepare("image_folder", root, tmp_path / "o", resolution=8, num_ref=2, captions=True, progress=False)
    assert captions_of(tmp_path / "o" / "train.npy") == ["a sidecar caption", "the other sidecar naming"]
    errors = {s["item"].rsplit("/", 1)[-1]: s["error"] for s in m["skipped"]}
    assert "empty caption" in errors["2.jpg"] and "no caption" in errors["3.jpg"]
    (root / "2.txt").write_text("fixed\n")
    (root / "3.txt").write_bytes(b"ok line\nbad \xff line\n")
    with pytest.raises(DataError, match=r"3\.txt line 2: not valid UTF-8 \(byte 0xff at column 5\)"):
        prepare("image_folder", root, tmp_path / "o2", resolution=8, num_ref=2, captions=True,
                on_corrupt="fail", progress=False)


def test_metadata_jsonl_and_header_errors(tmp_path):
    root = tmp_path / "j"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(noise(8, 8, i)).save(root / "sub" / f"{i}.png")
    rows = [json.dumps({"file_name": f"sub/{i}.png", "text": f"caption {i}"}) for i in range(3)]
    rows.insert(1, "{not json")
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    m = prepare("image_folder", root, tmp_path / "o", resolution=8, num_ref=3, captions=True, progress=False)
    assert captions_of(tmp_path / "o" / "train.npy") == ["caption 0", "caption 1", "caption 2"]
    assert [s["item"] for s in m["skipped"]] == [f"{root / 'metadata.jsonl'}:2"]
    # a metadata.csv without the columns is one clear error; no captions at all too
    bad = tmp_path / "h"
    bad.mkdir()
    Image.fromarray(noise(8, 8, 0)).save(bad / "a.png")
    (bad / "metadata.csv").write_text("image,caption_text\na.png,x\n")
    with pytest.raises(DataError, match=r"metadata\.csv line 1: header .* lacks 'file_name'"):
        prepare("image_folder", bad, tmp_path / "o2", resolution=8, num_ref=1, captions=True, progress=False)
    (bad / "metadata.csv").unlink()
    with pytest.raises(DataError, match="no captions found"):
        prepare("image_folder", bad, tmp_path / "o2", resolution=8, num_ref=1, captions=True, progress=False)
    # without captions=True the same folder is a plain image folder (no meta file)
    prepare("image_folder", bad, tmp_path / "o3", resolution=8, num_ref=1, progress=False)
    assert not (tmp_path / "o3" / "train.meta.npz").exists()


def test_duplicate_rows_and_captions_with_newlines(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for i in range(2):
        Image.fromarray(noise(8, 8, i)).save(root / f"{i}.png")
    (root / "metadata.csv").write_text('file_name,text\n0.png,"two\nlines"\n1.png,one\n0.png,again\n')
    m = prepare("image_folder", root, tmp_path / "o", resolution=8, num_ref=2, captions=True, progress=False)
    assert captions_of(tmp_path / "o" / "train.npy") == ["two\nlines", "one"]
    assert "second row for '0.png' (first at line 2)" in m["skipped"][0]["error"]
    assert m["skipped"][0]["item"].endswith("metadata.csv:5")  # the quoted caption spans lines 2-3


def write_parquet(path, images, texts, text_type=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = pa.array([{"bytes": b if isinstance(b, bytes) else png_bytes(b), "path": f"{i}.png"}
                    for i, b in enumerate(images)], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": col, "text": pa.array(texts, text_type)}), path)


def test_parquet_with_text_column(tmp_path):
    imgs = [noise(12, 12, i) for i in range(4)]
    write_parquet(tmp_path / "p" / "train-0.parquet", imgs, ["zero", None, "two", "three"])
    write_parquet(tmp_path / "p" / "test-0.parquet", [noise(12, 12, 9), b"junk"], ["held out", "broken"])
    m = prepare("parquet", tmp_path / "p", tmp_path / "o", resolution=12, captions=True, progress=False)
    assert captions_of(tmp_path / "o" / "train.npy") == ["zero", "two", "three"]
    assert captions_of(tmp_path / "o" / "ref.npy") == ["held out"]
    assert np.array_equal(load_set(tmp_path / "o" / "train.npy")["images"][1], imgs[2])
    items = [s["item"].rsplit("/", 1)[-1] for s in m["skipped"]]
    assert items == ["train-0.parquet:1", "test-0.parquet:1"]
    with pytest.raises(DataError, match=r"train-0\.parquet:1: missing caption"):
        prepare("parquet", tmp_path / "p", tmp_path / "o2", resolution=12, captions=True, on_corrupt="fail",
                progress=False)
    # bytes captions are decoded here, so bad UTF-8 names the row
    import pyarrow as pa
    write_parquet(tmp_path / "b" / "train.parquet", imgs[:2], [b"fine", b"bad \xff"], pa.binary())
    with pytest.raises(DataError, match=r"train\.parquet:1: caption is not valid UTF-8 \(byte 0xff"):
        prepare("parquet", tmp_path / "b", tmp_path / "o3", resolution=12, num_ref=1, captions=True,
                on_corrupt="fail", progress=False)
    # no text column
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"image": pa.array([png_bytes(imgs[0])])}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet: no caption column.*'text'"):
        prepare("parquet", tmp_path / "n.parquet", tmp_path / "o4", resolution=12, num_ref=1, captions=True,
                progress=False)


def test_formats_without_captions_are_refused(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "data.mdb").write_bytes(b"")
    with pytest.raises(DataError, match="lmdb format has no captions"):
        prepare("lmdb", tmp_path / "lm", tmp_path / "o", resolution=8, num_ref=1, captions=True)


def test_read_lines_helper(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\ntwo\nthr\xc3e\n")
    with pytest.raises(DataError, match=r"t\.txt line 3: not valid UTF-8 \(byte 0xc3 at column 4\)"):
        read_lines(f)
    lines = read_lines(f, strict=False)
    assert [(n, t) for n, t, _ in lines[:2]] == [(1, "one"), (2, "two")]
    assert lines[2][2] and has_surrogates(lines[2][1]) and not has_surrogates("plain é")
    assert issubclass(CaptionError, DataError)
