"""The one summary metrics file per profile (deme/report/summary.py) and the report's pictures."""
from __future__ import annotations

import json

import numpy as np

from deme.report import figures
from deme.report.summary import summary, sweep_summary


def _write(root, profile, method, **m):
    p = root / profile / "evaluate" / f"{method}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(m))


def test_summary_has_each_evaluated_method_with_interval_and_n_only(tmp_path):
    _write(tmp_path, "tiny", "merged", fid=10.123456, fid_lo=9.0, fid_hi=11.0, kid=0.5, training_seeds=3,
           images_per_s=22.0, feature_net_sha256="ab" * 32)
    _write(tmp_path, "tiny", "pretrained", fid=12.0, fid_lo=11.0, fid_hi=13.0, kid=0.7, training_seeds=1)
    s = summary(tmp_path, "tiny")
    assert list(s) == ["pretrained", "merged"]  # table order, only what was evaluated
    assert s["merged"] == {"fid": 10.1235, "fid_lo": 9.0, "fid_hi": 11.0, "kid": 0.5, "n": 3}  # no timings, hashes
    _write(tmp_path, "t2i", "plain", coco_fid=50.0, coco_fid_lo=45.0, coco_fid_hi=55.0, coco_clip=20.0,
           parti_clip=21.0, training_seeds=2)
    assert summary(tmp_path, "t2i", "t2i")["plain"] == {"coco_fid": 50.0, "coco_fid_lo": 45.0, "coco_fid_hi": 55.0,
                                                        "coco_clip": 20.0, "parti_clip": 21.0, "n": 2}
    assert sweep_summary({"n4": {"fid_merged_50": 1.23456, "images_per_s_merged_50": 3.0, "n": 4}}) == {
        "n4": {"fid_merged_50": 1.2346}}


def test_fid_chart_and_side_by_side_samples(tmp_path):
    from PIL import Image

    s = {"pretrained": {"fid": 12.0, "fid_lo": 11.0, "fid_hi": 13.0, "n": 1},
         "merged": {"fid": 10.0, "fid_lo": 9.0, "fid_hi": 11.0, "n": 3}}
    assert figures.fid_chart(s, tmp_path / "fid.png").stat().st_size > 1000
    assert figures.fid_chart({}, tmp_path / "none.png") is None
    for name, value in (("pretrained", 0), ("merged", 255)):
        grid = np.full((80, 80, 3), value, np.uint8)
        grid[:40] = 128  # the first of two rows
        Image.fromarray(grid).save(tmp_path / f"{name}.png")
    out = figures.sample_strips(tmp_path, ["pretrained", "missing", "merged"], tmp_path / "strips.png", rows=2)
    assert out.stat().st_size > 1000
    assert figures.sample_strips(tmp_path, ["missing"], tmp_path / "x.png", rows=2) is None
