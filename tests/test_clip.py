"""The CLIP score (docs/paper.md §1.9, §8.3): deme/metrics/clip.py and stages/clip.py.

- The small open_clip model saved in the hub layout loads back through open_clip's own
  ``create_model_and_transforms`` (by registered name + weights file, and via ``local-dir:``) with identical
  embeddings; its PIL preprocess equals the tensor normalisation used in training.
- Offline lookup: a tag registered in open_clip's pretrained registry is found in a Hugging Face cache laid
  out as ``hf download`` leaves it, with the network refused; a missing ViT-g-14 / laion2b_s34b_b88k fails at
  once with ClipMissing naming the model, the caches looked in and the fetch command.
- The score math on hand-made embeddings (identical -> 100, orthogonal -> 0, opposite -> -100).
- A short contrastive training on the shapes ranks the true caption above a wrong one on held-out shapes.
- The stage, in-process, on micro_t2i data: trains, writes the model folder and metrics/micro_t2i/clip.json;
  for sd14 without the weights it exits 2 with one line and writes nothing.
"""
from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from deme.config import config_from_mapping
from deme.data import save_set
from deme.data.shapes import generate_shapes
from deme.io import sha256_file
from deme.metrics import clip as C

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VITG_REPO = "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"


def t2i_cfg(profile: str = "micro_t2i", **clip):
    return config_from_mapping({"t2i": {"profile": profile, "clip": clip}}, "t2i")


@pytest.fixture
def empty_default_cache(tmp_path, monkeypatch):
    """The default Hugging Face cache, as huggingface_hub resolved it at import, pointed at an empty folder."""
    from huggingface_hub import constants

    cache = tmp_path / "default-hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def small():
    """A micro_t2i CLIP model after a few training steps, the config, and 24 shapes to embed."""
    cfg = t2i_cfg(iterations=5)
    data = generate_shapes(64, seed=3, resolution=16)
    model = C.train_clip(data.images, data.captions, cfg, seed=0, device="cpu")
    return cfg, model, data


def reference_embeddings(model, images: np.ndarray, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings straight from the in-memory model (the training-time normalisation)."""
    import open_clip

    with torch.inference_mode():
        img = model.encode_image(C._normalise(model)(C.images_nchw(images)))
        txt = model.encode_text(open_clip.get_tokenizer("deme-tiny-clip")(list(captions)))
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


# ----------------------------------------------------------------------------------------------------
# Saving, loading, preprocess
# ----------------------------------------------------------------------------------------------------

def test_saved_model_loads_back_through_open_clip(small, tmp_path):
    import open_clip

    cfg, model, data = small
    out = tmp_path / "clip"
    C.save_clip(model, C.clip_model_config(cfg), out)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == C.clip_model_config(cfg)
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 16
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert config["preprocess_cfg"]["size"] == [16, 16]
    ref_img, ref_txt = reference_embeddings(model, data.images[:24], data.captions[:24])

    # 1. by registered name + weights file: the call that loads ViT-g-14 / <tag>
    loaded, _, preprocess = open_clip.create_model_and_transforms(
        cfg.clip.model, pretrained=str(out / "open_clip_model.safetensors"))
    assert list(loaded.state_dict()) == list(model.state_dict())
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    # 2. via open_clip's own local-dir: reading of the hub layout
    hub, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    img2, txt2 = reference_embeddings(hub.eval(), data.images[:24], data.captions[:24])
    assert torch.equal(img2, ref_img) and torch.equal(txt2, ref_txt)

    # 3. load_clip: the PIL preprocess of open_clip (16x16 in, 16x16 out) equals the training normalisation
    scorer = C.load_clip(cfg, "cpu", path=out)
    x = C.images_nchw(data.images[:24])
    assert torch.allclose(scorer.image_features(x), ref_img, atol=1e-6)
    assert torch.allclose(scorer.text_features(data.captions[:24]), ref_txt, atol=1e-6)
    expected = 100 * (ref_img * ref_txt).sum(-1).double().numpy()
    np.testing.assert_allclose(scorer.score(x, data.captions[:24]), expected, atol=1e-4)
    d = scorer.describe()
    assert d == {"clip_model": "deme-tiny-clip", "clip_pretrained": str(out),
                 "clip_sha256": sha256_file(out / "open_clip_model.safetensors")}
    with pytest.raises(ValueError, match=r"uint8 images \[n, 3, H, W\]"):
        scorer.score(torch.as_tensor(data.images[:2]), data.captions[:2])  # NHWC by mistake


def test_training_is_seeded(small):
    cfg, model, data = small
    again = C.train_clip(data.images, data.captions, cfg, seed=0, device="cpu")
    other = C.train_clip(data.images, data.captions, cfg, seed=1, device="cpu")
    sd, sd2, sd3 = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd)
    # the vocabulary rows of tokens absent from the captions keep their initial values: equal after 5 and
    # after 10 steps from the same seed, while the rows of the captions' tokens moved
    import open_clip

    longer = C.train_clip(data.images, data.captions, t2i_cfg(iterations=10), seed=0, device="cpu").state_dict()
    used = torch.unique(open_clip.get_tokenizer(cfg.clip.model)(sorted(set(data.captions))))
    unused = torch.ones(49408, dtype=torch.bool)
    unused[used] = False
    emb, emb10 = sd["token_embedding.weight"], longer["token_embedding.weight"]
    assert 20 < len(used) < 60
    assert torch.equal(emb[unused], emb10[unused])
    assert used[0] == 0  # padding, after the end-of-text token: the causal text encoder never reads it
    assert not torch.isclose(emb[used[1:]], emb10[used[1:]]).all(dim=1).any()


# ----------------------------------------------------------------------------------------------------
# Offline lookup in the Hugging Face cache
# ----------------------------------------------------------------------------------------------------

def fake_hf_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """``root`` laid out as huggingface_hub's cache after ``hf download repo <files>``."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.parametrize("where", ["cache_dir", "default cache"])
def test_registered_tag_is_found_in_the_cache_offline(small, tmp_path, monkeypatch, no_network,
                                                      empty_default_cache, where):
    import open_clip

    cfg0, model, data = small
    saved = tmp_path / "saved"
    C.save_clip(model, C.clip_model_config(cfg0), saved)
    repo = "deme-test/tiny-clip"
    cache = tmp_path / "hub" if where == "cache_dir" else empty_default_cache
    snapshot = fake_hf_cache(cache, repo, {n: saved / n for n in ("open_clip_config.json",
                                                                   "open_clip_model.safetensors")})
    # "org/name/" = open_clip's default file (open_clip_pytorch_model.bin), whose .safetensors twin is cached
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "deme-tiny-clip",
                        {"testtag": open_clip.pretrained._pcfg(hf_hub=repo + "/")})
    cfg = t2i_cfg(train=False, pretrained="testtag", cache_dir=str(cache) if where == "cache_dir" else "")
    weights, _ = C.find_cached_weights("deme-tiny-clip", "testtag", cfg.clip.cache_dir)
    assert weights == snapshot / "open_clip_model.safetensors"
    scorer = C.load_clip(cfg, "cpu")
    ref_img, ref_txt = reference_embeddings(model, data.images[:8], data.captions[:8])
    assert torch.allclose(scorer.image_features(C.images_nchw(data.images[:8])), ref_img, atol=1e-6)
    assert torch.allclose(scorer.text_features(data.captions[:8]), ref_txt, atol=1e-6)
    assert scorer.describe() == {"clip_model": "deme-tiny-clip", "clip_pretrained": "testtag",
                                 "clip_sha256": sha256_file(saved / "open_clip_model.safetensors")}
    assert no_network == []


@pytest.mark.parametrize("offline", ["1", None])
def test_missing_vit_g_fails_at_once_naming_what_to_fetch(tmp_path, monkeypatch, no_network, empty_default_cache,
                                                          offline):
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    cache = tmp_path / "my-clip-cache"
    cfg = t2i_cfg("sd14", cache_dir=str(cache))
    assert (cfg.clip.model, cfg.clip.pretrained, cfg.clip.train) == ("ViT-g-14", "laion2b_s34b_b88k", False)
    t0 = time.perf_counter()
    with pytest.raises(C.ClipMissing) as e:
        C.load_clip(cfg, "cpu")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'ViT-g-14'", "'laion2b_s34b_b88k'", str(cache), str(empty_default_cache), VITG_REPO,
                 f"huggingface-cli download {VITG_REPO} open_clip_pytorch_model.bin",
                 f"hf download {VITG_REPO}", "open_clip_model.safetensors", "clip.local_path"):
        assert part in msg, (part, msg)
    assert no_network == []


def test_other_missing_or_wrong_sources(tmp_path, empty_default_cache, no_network):
    with pytest.raises(C.ClipMissing, match="stages/clip.py --t2i"):
        C.load_clip(t2i_cfg(), "cpu", path=tmp_path / "models" / "micro_t2i" / "clip")
    with pytest.raises(C.ClipMissing, match="clip.local_path=.*no such file"):
        C.load_clip(t2i_cfg("sd14", local_path=str(tmp_path / "nowhere.bin")), "cpu")
    with pytest.raises(ValueError, match="no pretrained weights 'ViT-g-14' / 'no_such_tag'.*laion2b_s34b_b88k"):
        C.load_clip(t2i_cfg("sd14", pretrained="no_such_tag"), "cpu")
    with pytest.raises(ValueError, match="built-in"):
        C.register_model_config("ViT-B-32", {"embed_dim": 1, "vision_cfg": {}, "text_cfg": {}})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not loadable as open_clip 'deme-tiny-clip'"):
        C.load_clip(t2i_cfg(train=False, local_path=str(bad)), "cpu")


# ----------------------------------------------------------------------------------------------------
# The score
# ----------------------------------------------------------------------------------------------------

class HandMade(torch.nn.Module):
    """Image embedding = pixel (0, 0) minus 100; text embedding = the numbers in the prompt."""

    def encode_image(self, x):
        return x - 100

    def encode_text(self, tokens):
        return tokens


def test_score_is_100_times_the_cosine():
    preprocess = lambda pil: torch.tensor(np.asarray(pil)[0, 0], dtype=torch.float32)  # noqa: E731
    tokenizer = lambda prompts: torch.tensor([[float(v) for v in p.split()] for p in prompts])  # noqa: E731
    pixels = [(200, 100, 100), (200, 100, 100), (200, 100, 100), (100, 200, 200), (100, 200, 200), (130, 60, 100)]
    prompts = ["3 0 0", "0 2 0", "-1 0 0", "0 5 5", "0 1 0", "0.5 -0.5 0"]
    expected = [100, 0, -100, 100, 100 / np.sqrt(2), 100 * 0.5 * (30 + 40) / (0.5 * np.sqrt(2) * 50)]
    images = torch.zeros(len(pixels), 3, 4, 4, dtype=torch.uint8)
    for i, p in enumerate(pixels):
        images[i] = torch.tensor(p, dtype=torch.uint8).view(3, 1, 1)
    for batch in (1, 4, 64):
        scorer = C.ClipScorer(HandMade(), preprocess, tokenizer, name="hand", pretrained="", weights=None,
                              batch_size=batch)
        got = scorer.score(images, prompts)
        assert got.shape == (6,) and got.dtype == np.float64
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert C.ranking_accuracy(scorer, images[:3], prompts[:3], ["0 2 0", "-1 0 0", "0 2 0"]) == pytest.approx(2 / 3)


def test_wrong_captions_are_a_seeded_derangement():
    caps = generate_shapes(300, seed=5, resolution=16).captions
    wrong = C.wrong_captions(caps, seed=7)
    assert wrong == C.wrong_captions(caps, seed=7) != C.wrong_captions(caps, seed=8)
    assert len(wrong) == len(caps) and all(w != c for w, c in zip(wrong, caps))
    assert set(wrong) <= set(caps)
    with pytest.raises(ValueError):
        C.wrong_captions(["a", "a"], seed=0)


def test_short_training_ranks_the_true_caption_first(capsys):
    cfg = t2i_cfg(iterations=150, train_batch_size=64)  # micro_t2i's model: width 16, one layer, embed 16
    train, held = generate_shapes(2000, seed=11, resolution=16), generate_shapes(500, seed=12, resolution=16)
    t0 = time.perf_counter()
    model = C.train_clip(train.images, train.captions, cfg, seed=0, device="cpu")
    seconds = time.perf_counter() - t0
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    # the model's own eval transform, as create_model_and_transforms builds it
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    scorer = C.ClipScorer(model, preprocess, open_clip.get_tokenizer(cfg.clip.model), name=cfg.clip.model,
                          pretrained="", weights=None, batch_size=256)
    wrong = C.wrong_captions(held.captions, seed=0)
    matched, mismatched = C.pair_scores(scorer, C.images_nchw(held.images), held.captions, wrong)
    acc = C.ranking_accuracy(scorer, C.images_nchw(held.images), held.captions, wrong)
    with capsys.disabled():
        print(f"\n[clip] 150 iterations x 64 on 2000 shapes: {seconds:.1f} s, held-out ranking accuracy {acc:.3f}, "
              f"matched {matched.mean():.1f} vs mismatched {mismatched.mean():.1f}")
    assert acc == float(np.mean(matched > mismatched))
    assert acc >= 0.85
    assert matched.mean() > mismatched.mean() + 20


# ----------------------------------------------------------------------------------------------------
# The stage, in-process
# ----------------------------------------------------------------------------------------------------

def run_clip_stage(monkeypatch, params: dict, *extra: str) -> int:
    Path("params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", ["stages/clip.py", "--params", "params.yaml", *extra])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "stages" / "clip.py"), run_name="__main__")
    return done.value.code


def test_stage_trains_and_scores_micro_t2i(workdir, monkeypatch, capsys, no_network):
    save_set("data/micro_t2i/train.npy", generate_shapes(512, seed=1, resolution=16))
    save_set("data/micro_t2i/ref.npy", generate_shapes(256, seed=2, resolution=16))
    assert run_clip_stage(monkeypatch, {"t2i": {"profile": "micro_t2i"}}, "--t2i") == 0
    out = capsys.readouterr().out
    assert "held-out ranking accuracy" in out and "wrote models/micro_t2i/clip" in out
    model_dir = Path("models/micro_t2i/clip")
    assert sorted(p.name for p in model_dir.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    m = json.loads(Path("metrics/micro_t2i/clip.json").read_text())
    assert set(m) == {"ranking_accuracy", "clip_matched", "clip_mismatched", "heldout_images", "iterations",
                      "clip_model", "clip_pretrained", "clip_sha256"}
    assert m["heldout_images"] == 256 and m["iterations"] == 30 and "wall_s" not in m
    assert 0 <= m["ranking_accuracy"] <= 1 and -100 <= m["clip_mismatched"] <= 100
    assert m["clip_model"] == "deme-tiny-clip" and m["clip_pretrained"] == str(model_dir)
    assert m["clip_sha256"] == sha256_file(model_dir / "open_clip_model.safetensors")
    logged = mlflow_metrics(workdir.parent / "mlflow.db")
    assert {"ranking_accuracy", "clip_matched", "clip_mismatched", "clip_loss", "stage_seconds"} <= set(logged)
    assert logged["ranking_accuracy"] == pytest.approx(m["ranking_accuracy"])
    # what the evaluation will load: load_clip(cfg) finds the stage's output folder by itself
    assert C.load_clip(t2i_cfg(), "cpu").describe() == {k: m[k] for k in ("clip_model", "clip_pretrained",
                                                                          "clip_sha256")}
    assert no_network == []


def mlflow_metrics(db: Path) -> dict[str, float]:
    """The last value of every metric in the MLflow database (read with sqlite3: no MLflow start-up)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT key, value FROM metrics ORDER BY timestamp, step").fetchall()
    return dict(rows)


def test_stage_records_a_cached_model_for_a_real_profile(small, workdir, monkeypatch, capsys, no_network,
                                                        empty_default_cache):
    """The sd14 path (clip.train false: find the weights, record them, score captioned held-out images), run
    with the small model published under a registered tag in a Hugging Face cache."""
    import open_clip

    cfg0, model, _ = small
    C.save_clip(model, C.clip_model_config(cfg0), workdir.parent / "saved")
    cache = workdir.parent / "hub"
    snapshot = fake_hf_cache(cache, "deme-test/tiny-clip",
                             {"open_clip_model.safetensors": workdir.parent / "saved" / "open_clip_model.safetensors"})
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "deme-tiny-clip",
                        {"testtag": open_clip.pretrained._pcfg(hf_hub="deme-test/tiny-clip/")})
    save_set("data/micro_t2i/ref.npy", generate_shapes(300, seed=2, resolution=16))
    clip = {"train": False, "pretrained": "testtag", "cache_dir": str(cache)}
    assert run_clip_stage(monkeypatch, {"t2i": {"profile": "micro_t2i", "clip": clip}}, "--t2i") == 0
    weights = snapshot / "open_clip_model.safetensors"
    sha = sha256_file(weights)
    assert sorted(p.name for p in Path("models/micro_t2i/clip").iterdir()) == ["clip.json"]
    record = json.loads(Path("models/micro_t2i/clip/clip.json").read_text())
    assert record["weights"] == str(weights) and record["clip_sha256"] == sha
    m = json.loads(Path("metrics/micro_t2i/clip.json").read_text())
    assert {k: m[k] for k in ("clip_model", "clip_pretrained", "clip_sha256", "heldout_images")} == \
        {"clip_model": "deme-tiny-clip", "clip_pretrained": "testtag", "clip_sha256": sha, "heldout_images": 256}
    assert {"clip_matched", "clip_mismatched", "ranking_accuracy"} <= set(m)
    # the recorded folder loads the same weights
    cfg = t2i_cfg(**clip)
    assert C.load_clip(cfg, "cpu", path="models/micro_t2i/clip").describe()["clip_sha256"] == sha
    assert no_network == []


def test_stage_without_vit_g_exits_2_and_writes_nothing(workdir, monkeypatch, capsys, no_network,
                                                       empty_default_cache):
    assert run_clip_stage(monkeypatch, {"t2i": {"profile": "sd14"}}, "--t2i") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: clip: CLIP weights of open_clip 'ViT-g-14'")
    assert "huggingface-cli download" in lines[0]
    assert not Path("models").exists() and not Path("metrics").exists()
    # the image pipeline has no CLIP stage
    assert run_clip_stage(monkeypatch, {"profile": "micro"}) == 2
    assert "--t2i" in capsys.readouterr().err
