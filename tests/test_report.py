"""Report tables: measured numbers from metrics JSON beside the paper's, bold best, every FID with its 95 %
interval and n, KID ± std."""
from __future__ import annotations

import json
from pathlib import Path

from deme.report.tables import TABLE1_ROWS, collect_fid, table1


def _write(root: Path, rel: str, data: dict) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))


def _metrics(tmp_path: Path) -> Path:
    root = tmp_path / "metrics"
    fids = {"pretrained": 10.0, "plain": 9.5, "min_snr": 11.0, "ensemble": 8.0, "merged": 7.5}
    for key, fid in fids.items():
        _write(root, f"tiny/evaluate/{key}.json", {"fid": fid, "fid_lo": fid - 0.5, "fid_hi": fid + 0.5,
                                                  "kid": fid / 100, "kid_std": 0.001,
                                                  "training_seeds": 3 if key == "plain" else 1})
    _write(root, "tiny/fid_ref.json", {"fid_floor": 1.0})
    _write(root, "tiny/train/interval-1.json", {"iterations": 150, "wall_s": 10.0})
    for i in (2, 3, 4):
        _write(root, f"tiny/train/interval-{i}.json", {"iterations": 150, "wall_s": 10.0})
    _write(root, "tiny/train/plain.json", {"iterations": 600, "wall_s": 30.0})
    return root


def test_table1_measured_paper_delta_bold_and_seeds(tmp_path):
    md = table1(_metrics(tmp_path), {"tiny": 4})
    lines = {line.split("|")[1].strip(): line for line in md.splitlines()[2:]}
    assert "tiny FID (ours) [95 % interval] n" in md and "tiny KID ± std (ours)" in md and "CIFAR10 FID (paper)" in md
    merged = lines["DeMe (after merge: task-vector merge)"]
    assert "**7.500 [7.000, 8.000] n=1**" in merged and "0.0750 ± 0.0010" in merged and "-2.500" in merged and "150 × 4" in merged and "wall" not in md
    assert "**3.51**" in merged  # the paper's best CIFAR10 entry, bold in its own column
    plain = lines["Plain finetuning (control)"]
    assert "9.500 [9.000, 10.000] n=3" in plain and "600" in plain
    floor = lines["Data-vs-data floor (training vs held-out images)"]
    assert "1.000" in floor and "**" not in floor  # the floor is never 'best'


def test_missing_methods_are_blank_not_invented(tmp_path):
    fid = collect_fid(_metrics(tmp_path), ["tiny"])["tiny"]
    assert fid["p2"] != fid["p2"]  # NaN: never evaluated
    md = table1(_metrics(tmp_path), {"tiny": 4})
    p2 = next(line for line in md.splitlines() if line.startswith("| P2 weighting"))
    cells = [c.strip() for c in p2.split("|")[1:-1]]
    assert cells[1] == ""  # no measured value
    assert cells[-4] == "5.63"  # the paper's CIFAR10 number, in the paper's column
    assert len(TABLE1_ROWS) == 13


def test_tables_show_the_weights_each_rows_search_picked(tmp_path):
    """A single-model row whose search picked w = 0 is the pretrained model: the table says so."""
    from deme.report.tables import table2

    root = _metrics(tmp_path)
    _write(root, "tiny/evaluate/plain.json", {"fid": 10.0, "fid_lo": 9.5, "fid_hi": 10.5, "training_seeds": 3,
                                              "scale": [0.0, 1.25, 0.5]})
    _write(root, "tiny/merge.json", {"weights": [[0.25, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]})
    md = table1(root, {"tiny": 4})
    assert "tiny searched w per seed" in md
    cells = {c[0]: c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in md.splitlines()[2:])}
    assert "0.00, 1.25, 0.50" in cells["Plain finetuning (control)"]
    assert "0.25/0/0/1; 1/1/1/1" in cells["DeMe (after merge: task-vector merge)"]
    _write(root, "tiny_t2i/evaluate/pretrained.json", {"coco_fid": 5.0})
    _write(root, "tiny_t2i/evaluate/plain.json", {"coco_fid": 5.0, "scale": [0.0]})
    t2 = {c[0]: c for c in ([x.strip() for x in line.split("|")[1:-1]]
                            for line in table2(root, {"tiny_t2i": 4}).splitlines()[2:])}
    assert "0.00" in t2["Plain finetuning (control)"]
