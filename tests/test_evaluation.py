"""FID while sampling (deme/evaluation.py): several feature spaces from one sampled batch, the first images
kept for the grid, optional PNGs, batch sharding and gathering in order, held-out references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_unet, randomize_
from deme.config import config_from_mapping
from deme.distributed import Dist, batch_ranges, gather_batches, my_batches
from deme.metrics.fid import Stats

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg():
    return config_from_mapping({"profile": "micro", "data": {"resolution": 8},
                                "sample": {"steps": 3, "eta": 0.0, "batch_size": 8, "num_samples": 20}})


def test_sample_features_all_spaces_keep_and_pngs(cfg, spaces, tmp_path):
    from PIL import Image

    from deme.evaluation import sample_features
    from deme.sample import generate

    model = randomize_(make_tiny_unet(seed=3), seed=3)
    seeds = range(100, 120)
    feats, kept = sample_features(model, seeds, cfg, spaces, CPU, desc="t", keep=11, save_dir=tmp_path / "png")
    images = torch.cat(list(generate(model, seeds, cfg.schedule, cfg.sample, (3, 8, 8), CPU)))
    assert feats["clean"].shape == (20, 6) and feats["other"].shape == (20, 5)
    with torch.no_grad():
        direct = spaces["other"].net(images.float()).numpy()
    assert np.allclose(feats["other"], direct, atol=1e-5)
    assert torch.equal(kept, images[:11])
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(20)]
    assert np.array_equal(np.asarray(Image.open(pngs[13])), images[13].permute(1, 2, 0).numpy())


def test_batches_are_dealt_round_robin_and_gathered_in_order():
    assert batch_ranges(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert my_batches(20, 8, Dist(0, 2)) == [(0, 8), (16, 20)]
    assert my_batches(20, 8, Dist(1, 2)) == [(8, 16)]
    assert my_batches(20, 8, Dist(2, 3)) == [(16, 20)]
    dealt = {r: [f"b{lo}" for lo, _ in my_batches(50, 8, Dist(r, 3))] for r in range(3)}
    assert sorted(sum(dealt.values(), [])) == sorted(f"b{lo}" for lo, _ in batch_ranges(50, 8))
    # gather_batches' reassembly rule, as all_gather_object would hand the parts over
    parts = [dealt[r] for r in range(3)]
    order = [parts[b % 3][b // 3] for b in range(7)]
    assert order == [f"b{lo}" for lo, _ in batch_ranges(50, 8)]
    assert gather_batches(["x", "y"], Dist()) == ["x", "y"]


def test_heldout_references_are_optional(cfg, spaces, tmp_path, monkeypatch):
    from deme.evaluation import load_references
    from deme.paths import Paths

    monkeypatch.chdir(tmp_path)
    paths = Paths(cfg.profile)
    for mode in spaces:
        Stats(np.zeros(3), np.eye(3), 10).save(paths.fid_ref(mode))
    assert set(load_references(cfg, spaces)) == set(spaces)
    assert load_references(cfg, spaces, heldout=True) == {}
    for mode in spaces:
        Stats(np.ones(3), np.eye(3), 10).save(paths.fid_heldout(mode))
    held = load_references(cfg, spaces, heldout=True)
    assert set(held) == set(spaces) and np.array_equal(held["clean"].mu, np.ones(3))
