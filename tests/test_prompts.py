"""Benchmark prompt sets and FID references of the text-to-image profiles (deme.data.prompts; docs/paper.md
§3.2, §8.3): the readers of BK-SDM's COCO metadata.csv, ImageNet class-name files and PartiPrompts, with
errors by file and line; the COCO / proxy split; the reference arrays; the tiny stand-ins; and the
prepare stage run in-process with --t2i (micro_t2i, and sd14 on tiny files).
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deme.config import config_from_mapping
from deme.data import load_set
from deme.data import prompts as P
from deme.data.prompts import PromptError

ROOT = Path(__file__).resolve().parents[1]


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def coco_files(root: Path, n: int, missing=(), corrupt=()):
    """A BK-SDM-like metadata.csv with n rows and a val2014-like folder of n images (some left out)."""
    images = root / "val2014"
    images.mkdir(parents=True)
    rows = ["file_name,text"]
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        rows.append(f'{name},"A photo, number {i}."')
        if i in corrupt:
            (images / name).write_bytes(b"\xff\xd8 not a jpeg")
        elif i not in missing:
            Image.fromarray(noise(12 + i % 3, 20, i)).save(images / name)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root / "metadata.csv", images


# ----------------------------------------------------------------------------------------------------
# readers: happy paths and errors by line
# ----------------------------------------------------------------------------------------------------

def test_coco_sets_split_disjoint_and_count_errors(tmp_path):
    meta, images = coco_files(tmp_path, 10)
    coco, proxy = P.coco_sets(meta, 6, 3, images=images)
    assert coco["count"] == 6 and proxy["count"] == 3
    assert coco["prompts"][0] == "A photo, number 0." and proxy["prompts"][0] == "A photo, number 6."
    assert coco["file_names"][5] == "COCO_val2014_000000000005.jpg"
    assert coco["lines"] == list(range(2, 8)) and proxy["lines"] == [8, 9, 10]
    assert not set(coco["lines"]) & set(proxy["lines"]) and not set(coco["file_names"]) & set(proxy["file_names"])
    assert not set(coco["prompts"]) & set(proxy["prompts"])
    assert coco["sha256"] == proxy["sha256"] == P.sha256_file(meta) and coco["source"] == str(meta)
    with pytest.raises(PromptError, match=r"metadata\.csv: 10 usable prompt rows, 12 needed \(benchmarks\.coco_count=8"
                                          r" \+ benchmarks\.coco_proxy_count=4\)"):
        P.coco_sets(meta, 8, 4)


def test_coco_missing_image_listed_or_fatal_and_bad_rows(tmp_path):
    meta, images = coco_files(tmp_path, 8, missing=(2,))
    coco, proxy = P.coco_sets(meta, 4, 2, images=images, on_corrupt="skip")
    assert coco["skipped"] == [{"line": 4, "file_name": "COCO_val2014_000000000002.jpg",
                                "error": f"image not in {images}"}]
    assert "COCO_val2014_000000000002.jpg" not in coco["file_names"] + proxy["file_names"]
    assert proxy["file_names"][-1] == "COCO_val2014_000000000006.jpg"  # the rows move up
    with pytest.raises(PromptError, match=r"metadata\.csv line 4: image 'COCO_val2014_000000000002\.jpg' not in"):
        P.coco_sets(meta, 4, 2, images=images, on_corrupt="fail")
    with pytest.raises(PromptError, match=r"7 usable prompt rows \(1 row skipped for missing images\), 8 needed"):
        P.coco_sets(meta, 6, 2, images=images)
    meta.write_bytes(b"file_name,text\na.jpg,fine\nb.jpg,caf\xe9\n")
    with pytest.raises(PromptError, match=r"metadata\.csv line 3: not valid UTF-8 \(byte 0xe9 at column 10\)"):
        P.read_coco_metadata(meta)
    meta.write_text("file_name,text\na.jpg,fine\nb.jpg,\n")
    with pytest.raises(PromptError, match=r"line 3: empty caption"):
        P.read_coco_metadata(meta)
    meta.write_text("image,prompt\na.jpg,x\n")
    with pytest.raises(PromptError, match=r"line 1: header .* lacks 'file_name' and 'text'"):
        P.read_coco_metadata(meta)


def test_class_names_plain_and_indexed_and_errors_by_line(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("tench\ngoldfish\ngreat white shark\n")
    assert P.read_class_names(f) == ["tench", "goldfish", "great white shark"]
    f.write_text("1\tgoldfish\n0\ttench\n")
    assert P.read_class_names(f) == ["tench", "goldfish"]
    s = P.imagenet_set(f, "a photo of a {}", 2)
    assert s["prompts"] == ["a photo of a tench"] * 2 + ["a photo of a goldfish"] * 2
    assert s["class_index"] == [0, 0, 1, 1] and s["num_classes"] == 2 and s["count"] == 4
    cases = [
        (b"tench\ngoldfish\nsh\xe4rk\n", r"classes\.txt line 3: not valid UTF-8 \(byte 0xe4 at column 3\)"),
        (b"tench\n\ngoldfish\n", r"line 2: empty line"),
        (b"crane\nkite\ncrane\n", r"line 3: duplicate class name 'crane' \(also line 1\)"),
        (b"0\ttench\n1\tgoldfish\n1\tshark\n", r"line 3: class index 1 again \(first at line 2\)"),
        (b"0\ttench\ngoldfish\n", r"line 2: mixes layouts"),
        (b"0\ttench\n2\tgoldfish\n", r"class indices must be 0\.\.1; missing \[1\]"),
    ]
    for data, match in cases:
        f.write_bytes(data)
        with pytest.raises(PromptError, match=match):
            P.read_class_names(f)


def test_parti_tsv_txt_subset_and_errors(tmp_path):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\tBiology\n"
                   'A robot. The words "Fly an airplane" are written\tOutdoor Scenes\tComplex\t\n'
                   '"a ""quoted"" export"\tArts\tBasic\n')
    rows = P.read_parti(tsv)
    assert [r.prompt for r in rows] == ["bond", 'A robot. The words "Fly an airplane" are written',
                                        'a "quoted" export']
    assert rows[1].category == "Outdoor Scenes" and rows[1].challenge == "Complex" and rows[2].line == 4
    s = P.parti_set(tsv, 0)
    assert s["count"] == 3 and s["categories"][0] == "Abstract" and s["metrics"] == ["clip"]
    sub = P.parti_set(tsv, 2, seed=1)
    assert sub["count"] == 2 and sub["lines"] == sorted(sub["lines"]) and sub == P.parti_set(tsv, 2, seed=1)
    with pytest.raises(PromptError, match=r"3 prompts, benchmarks\.parti_count=5"):
        P.parti_set(tsv, 5)
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nbond\tAbstract\n")
    with pytest.raises(PromptError, match=r"bad\.tsv line 1: no 'Prompt' column \(header: \['Text', 'Category'\]\)"
                                          r".*google-research/parti"):
        P.read_parti(bad)
    bad.write_text("Prompt\tCategory\n\tAbstract\n")
    with pytest.raises(PromptError, match=r"bad\.tsv line 2: empty prompt"):
        P.read_parti(bad)
    txt = tmp_path / "parti.txt"
    txt.write_text("a cat\na dog on a skateboard\n")
    assert [r.prompt for r in P.read_parti(txt)] == ["a cat", "a dog on a skateboard"]


def test_missing_sources_name_the_key_and_what_to_fetch(tmp_path):
    b = config_from_mapping({"t2i": {"profile": "sd14"}}, "t2i").benchmarks
    with pytest.raises(PromptError, match=r"benchmarks\.coco_images=datasets/coco/val2014: not found; .*val2014\.zip"):
        P.source_path(b, "coco_images")
    with pytest.raises(PromptError, match=r"benchmarks\.parti_prompts=.*not found; .*github\.com/google-research/parti"
                                          r".*nateraw/parti-prompts"):
        P.source_path(b, "parti_prompts")
    with pytest.raises(PromptError, match=r"benchmarks\.coco_prompts: not set; .*mscoco_val2014_30k/metadata\.csv"):
        P.source_path(config_from_mapping({"t2i": {"profile": "sd14", "benchmarks": {"coco_prompts": ""}}},
                                          "t2i").benchmarks, "coco_prompts")


# ----------------------------------------------------------------------------------------------------
# FID references
# ----------------------------------------------------------------------------------------------------

def test_coco_reference_resizes_every_image_and_lists_corrupt_ones(tmp_path):
    _, images = coco_files(tmp_path, 6, corrupt=(3,))
    out = tmp_path / "bench" / "coco.npy"
    r = P.folder_reference(images, out, transform="resize", resolution=8, progress=False)
    arr = np.load(out, mmap_mode="r")
    assert arr.shape == (5, 8, 8, 3) and r["count"] == 5 and r["available"] == 6
    assert [s["item"].rsplit("/", 1)[-1] for s in r["skipped"]] == ["COCO_val2014_000000000003.jpg"]
    first = Image.open(images / "COCO_val2014_000000000000.jpg").convert("RGB").resize((8, 8), Image.BICUBIC)
    assert np.array_equal(arr[0], np.asarray(first)) and r["sha256"] == P.sha256_file(out)
    with pytest.raises(P.DataError, match=r"000000000003\.jpg: cannot read image"):
        P.folder_reference(images, tmp_path / "x.npy", transform="resize", resolution=8, on_corrupt="fail")
    # a seeded subset
    r2 = P.folder_reference(images, tmp_path / "s.npy", transform="resize", resolution=8, samples=2, seed=4)
    assert r2["selected"] == 2 and np.load(tmp_path / "s.npy").shape[0] <= 2
    with pytest.raises(PromptError, match=r"reference_samples=9 but only 6"):
        P.folder_reference(images, tmp_path / "t.npy", transform="resize", resolution=8, samples=9)


def test_center_crop_resize_keeps_aspect():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # the middle half is white
    out = P.center_crop_resize(img, 10)  # 40x20 -> 20x10 -> crop x 5..15: the white band is 5..15
    assert out.shape == (10, 10, 3) and out[:, 2:8].min() == 255
    assert P.resize_square(img, 10).shape == (10, 10, 3)


# ----------------------------------------------------------------------------------------------------
# tiny stand-ins
# ----------------------------------------------------------------------------------------------------

def micro_cfg(**over):
    return config_from_mapping({"t2i": {"profile": "micro_t2i", **over}}, "t2i")


def test_standins_are_deterministic_and_pass_validation(tmp_path):
    cfg = micro_cfg()
    a, b = P.write_standins(cfg, tmp_path / "a"), P.write_standins(cfg, tmp_path / "b")
    for key in a:
        files_a = sorted(p for p in (a[key].rglob("*") if a[key].is_dir() else [a[key]]) if p.is_file())
        assert files_a and [f.read_bytes() for f in files_a] == \
            [(b[key] / f.relative_to(a[key]) if b[key].is_dir() else b[key]).read_bytes() for f in files_a]
    assert P.read_class_names(a["imagenet_classes"]) == P.standin_class_names()
    assert len(P.standin_class_names()) == 40 and P.standin_class_names()[0] == "red circle"
    n = cfg.benchmarks.coco_count + cfg.benchmarks.coco_proxy_count
    rows = P.read_coco_metadata(a["coco_prompts"])
    assert len(rows) == n and len(list(a["coco_images"].glob("*.png"))) == n
    assert rows[0].text.startswith("a ") and "background" in rows[0].text
    parti = P.read_parti(a["parti_prompts"])
    assert len(parti) == P.PARTI_STANDIN_ROWS and parti[1].prompt.startswith("a ") and "that is" in parti[1].prompt
    # held out: not the training images (another seed)
    from deme.data.shapes import generate_shapes
    from deme.io import derive_seed
    train = generate_shapes(cfg.data.num_train, derive_seed(cfg.seed, "data", "train"), cfg.data.resolution)
    first = np.asarray(Image.open(a["coco_images"] / "00000.png"))
    assert not (train.images == first).all(axis=(1, 2, 3)).any()
    # another seed, other stand-ins
    c = P.write_standins(micro_cfg(seed=1), tmp_path / "c")
    assert c["coco_prompts"].read_bytes() != a["coco_prompts"].read_bytes()
    # a benchmark path in a shapes profile is not silently ignored
    with pytest.raises(PromptError, match=r"benchmarks\.parti_prompts: set, but data\.kind: shapes"):
        P.benchmark_sources(micro_cfg(benchmarks={"parti_prompts": "x.tsv"}), tmp_path / "d")


# ----------------------------------------------------------------------------------------------------
# the prepare stage, in-process
# ----------------------------------------------------------------------------------------------------

def run_prepare(monkeypatch, params: dict) -> int:
    Path("params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", ["stages/prepare.py", "--params", "params.yaml", "--t2i"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "stages" / "prepare.py"), run_name="__main__")
    return done.value.code


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_micro_t2i_writes_prompt_sets_and_references(workdir, monkeypatch, capsys):
    assert run_prepare(monkeypatch, {"t2i": {"profile": "micro_t2i"}}) == 0
    d = Path("data/micro_t2i")
    sets = {k: P.load_prompt_set(d / "prompts" / f"{k}.json") for k in P.PROMPT_SETS}
    assert {k: s["count"] for k, s in sets.items()} == {"coco": 32, "coco_proxy": 16, "imagenet": 40, "parti": 16}
    assert sets["coco"]["source"] == "data/micro_t2i/bench_src/coco/metadata.csv"
    assert sets["coco"]["fid_reference"] == "data/micro_t2i/bench/coco.npy"
    assert sets["coco_proxy"]["fid_reference"] == "data/micro_t2i/bench/coco_search.npy"
    assert sets["parti"]["fid_reference"] is None
    assert not set(sets["coco"]["lines"]) & set(sets["coco_proxy"]["lines"])
    assert sets["imagenet"]["prompts"][0] == "a red circle on a black background"
    coco, imagenet = np.load(d / "bench" / "coco.npy"), np.load(d / "bench" / "imagenet.npy")
    assert coco.shape == (32, 16, 16, 3) and imagenet.shape == (256, 16, 16, 3)
    assert np.array_equal(imagenet, np.load(d / "ref.npy"))  # the held-out images, same size: unchanged
    # the evaluation's COCO reference leaves out the proxy prompts' images; they are the merge search's
    src = d / "bench_src" / "coco" / "images"
    image = lambda name: np.asarray(Image.open(src / name))  # noqa: E731
    search = np.load(d / "bench" / "coco_search.npy")
    assert search.shape == (16, 16, 16, 3)
    assert all(np.array_equal(search[k], image(f)) for k, f in enumerate(sets["coco_proxy"]["file_names"]))
    assert all(np.array_equal(coco[k], image(f)) for k, f in enumerate(sets["coco"]["file_names"]))
    assert len(load_set(d / "train.npy")["captions"]) == 512
    metrics = json.loads(Path("metrics/micro_t2i/data.json").read_text())
    assert metrics["prompts_coco"] == 32 and metrics["bench_imagenet"] == 256 and metrics["bench_skipped_coco"] == 0
    manifest = json.loads((d / "bench" / "manifest.json").read_text())
    assert manifest["standin"] and manifest["references"]["coco"]["count"] == 32
    assert manifest["references"]["coco_search"]["count"] == metrics["bench_coco_search"] == 16
    assert "coco_proxy: 16" in capsys.readouterr().out
    # a rerun is byte-identical
    before = tree(d)
    assert run_prepare(monkeypatch, {"t2i": {"profile": "micro_t2i"}}) == 0
    assert tree(d) == before


def sd14_inputs(root: Path) -> dict:
    """Tiny versions of every sd14 input: a captioned LAION folder and the four benchmark sources."""
    laion = root / "laion"
    laion.mkdir()
    rows = ["file_name,text"]
    for i in range(6):
        Image.fromarray(noise(10, 12, i)).save(laion / f"{i}.jpg")
        rows.append(f"{i}.jpg,a picture {i}")
    (laion / "metadata.csv").write_text("\n".join(rows) + "\n")
    meta, images = coco_files(root / "coco", 6)
    (root / "classes.txt").write_text("tench\ngoldfish\n")
    (root / "imagenet").mkdir()
    for i in range(3):
        Image.fromarray(noise(12, 16, 50 + i)).save(root / "imagenet" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (root / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tBasic\t\n")
    return {"t2i": {"profile": "sd14", "data": {"path": str(laion), "resolution": 8, "num_ref": 2},
                    "merge": {"proxy_samples": 16},
                    "benchmarks": {"coco_prompts": str(meta), "coco_images": str(images), "coco_count": 2,
                                   "coco_proxy_count": 16,
                                   "coco_proxy_prompts": "", "imagenet_classes": str(root / "classes.txt"),
                                   "imagenet_images": str(root / "imagenet"),
                                   "parti_prompts": str(root / "PartiPrompts.tsv"), "fid_resolution": 8}}}


def test_stage_sd14_real_files_and_failure_leaves_previous_data(workdir, monkeypatch, capsys, tmp_path):
    params = sd14_inputs(tmp_path)
    # too few COCO rows for coco_count + proxy_samples: one line with both counts, nothing written
    assert run_prepare(monkeypatch, params) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "6 usable prompt rows, 18 needed" in err and not Path("data/sd14").exists()
    # 12 more rows and images: 1 evaluated + 16 proxy prompts fit in the 18 rows
    params["t2i"]["benchmarks"]["coco_count"] = 1
    b = params["t2i"]["benchmarks"]
    Path(b["coco_prompts"]).write_text(Path(b["coco_prompts"]).read_text() +
                                       "".join(f'extra_{i}.jpg,"extra {i}"\n' for i in range(12)))
    for i in range(12):
        Image.fromarray(noise(9, 9, 90 + i)).save(Path(b["coco_images"]) / f"extra_{i}.jpg")
    assert run_prepare(monkeypatch, params) == 0, capsys.readouterr().err
    d = Path("data/sd14")
    train = load_set(d / "train.npy")
    assert train["images"].shape == (6, 8, 8, 3) and list(train["captions"])[:2] == ["a picture 0", "a picture 1"]
    assert json.loads((d / "prompts" / "coco.json").read_text())["prompts"] == ["A photo, number 0."]
    assert json.loads((d / "prompts" / "coco_proxy.json").read_text())["count"] == 16
    assert np.load(d / "bench" / "imagenet.npy").shape == (3, 8, 8, 3)
    # every val2014 image but the 16 proxy prompts' images, which are the merge search's reference
    assert np.load(d / "bench" / "coco.npy").shape == (2, 8, 8, 3)
    assert np.load(d / "bench" / "coco_search.npy").shape == (16, 8, 8, 3)
    assert not (d / "bench_src").exists()
    before = tree(d)
    capsys.readouterr()
    # a corrupt ImageNet val image with on_corrupt=fail: fails late (after train/ref), data/sd14 untouched
    Path(b["imagenet_images"], "ILSVRC2012_val_00000001.JPEG").write_bytes(b"junk")
    params["t2i"]["data"]["on_corrupt"] = "fail"
    assert run_prepare(monkeypatch, params) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "ILSVRC2012_val_00000001.JPEG: cannot read image" in err[0]
    assert tree(d) == before
    # a missing PartiPrompts file: one line naming the key and what to fetch; data/sd14 untouched
    Path(b["parti_prompts"]).unlink()
    assert run_prepare(monkeypatch, params) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "benchmarks.parti_prompts=" in err[0] and "google-research/parti" in err[0]
    assert tree(d) == before
    assert not [p for p in Path("data").iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_separate_coco_proxy_file_must_be_disjoint(workdir, monkeypatch, capsys, tmp_path):
    """benchmarks.coco_proxy_prompts: the merge search's prompts from another caption file (sd14's default),
    whose images must not be among the evaluated ones (docs/paper.md §1.8)."""
    params = sd14_inputs(tmp_path)
    b = params["t2i"]["benchmarks"]
    meta, images = coco_files(tmp_path / "big", 20)
    b.update(coco_prompts=str(meta), coco_images=str(images), coco_count=4)
    # the same file as proxy: every image is shared -> one line naming the key
    b["coco_proxy_prompts"] = b["coco_prompts"]
    assert run_prepare(monkeypatch, params) == 2
    err = capsys.readouterr().err
    assert "benchmarks.coco_proxy_prompts" in err and "disjoint" in err
    # a missing proxy file names the key and how to make it
    b["coco_proxy_prompts"] = str(tmp_path / "nope.csv")
    assert run_prepare(monkeypatch, params) == 2
    assert "benchmarks.coco_proxy_prompts" in capsys.readouterr().err
    # a proxy file of the images the evaluation does not use: they are the search's reference, out of the COCO one
    rows = Path(meta).read_text().splitlines()
    proxy = tmp_path / "proxy.csv"
    proxy.write_text("\n".join([rows[0], *rows[5:]]) + "\n")  # images 4..19: 16 prompts, one per image
    b["coco_proxy_prompts"] = str(proxy)
    assert run_prepare(monkeypatch, params) == 0, capsys.readouterr().err
    d = Path("data/sd14")
    assert np.load(d / "bench" / "coco_search.npy").shape[0] == 16 and np.load(d / "bench" / "coco.npy").shape[0] == 4
    # one image twice (another caption of it): the search's reference would shrink; one line with both lines
    proxy.write_text("\n".join([rows[0], *rows[5:19], rows[6].replace("number 5", "again"), rows[19]]) + "\n")
    assert run_prepare(monkeypatch, params) == 2
    err = capsys.readouterr().err
    assert "line 16: image 'COCO_val2014_000000000005.jpg' again (first at line 3)" in err and "one caption per image" in err


def test_the_merge_search_scores_at_most_the_prepared_proxy_prompts():
    """The data stage prepares benchmarks.coco_proxy_count proxy prompts (a data setting: t2i_prepare does not
    depend on the merge's settings); merge.proxy_samples of them are scored, so it cannot ask for more."""
    from deme.config import ConfigError, config_from_mapping

    with pytest.raises(ConfigError, match=r"^t2i\.merge\.proxy_samples: must be <= benchmarks\.coco_proxy_count \(96\)"):
        config_from_mapping({"t2i": {"profile": "tiny_t2i", "merge": {"proxy_samples": 97}}}, "t2i")
    assert config_from_mapping({"t2i": {"profile": "tiny_t2i", "merge": {"proxy_samples": 64}}}, "t2i")
