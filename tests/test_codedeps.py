"""Code deps complete by construction: every dvc.yaml stage lists exactly its command's import closure."""
from __future__ import annotations

import textwrap

import pytest

from deme import codedeps


@pytest.mark.parametrize("dvc_file", codedeps.DVC_FILES)
def test_every_stage_lists_exactly_its_import_closure(dvc_file):
    assert codedeps.sync(dvc_file) == {}, "run `python -m deme.codedeps --write`"


@pytest.mark.parametrize("dvc_file", codedeps.DVC_FILES)
@pytest.mark.parametrize("setting", ["runtime.num_threads", "runtime.cpu_kernels"])
def test_every_computing_stage_depends_on_the_thread_count_and_kernels(dvc_file, setting):
    """On CPU a training step's floats depend on torch's intra-op thread count (runtime.num_threads) and on its
    CPU kernels (runtime.cpu_kernels, deme/numerics.py), both set by deme/cli.py for every stage: every stage
    that computes with torch lists them, so changing one reruns them."""
    import yaml

    stages = yaml.safe_load((codedeps.ROOT / dvc_file).read_text())["stages"]
    reads_metrics_only = {"validate", "report", "t2i_report", "sweep_report"}
    missing = [name for name, body in stages.items() if name not in reads_metrics_only
               and ("t2i." if name.startswith("t2i_") else "") + setting
               not in (body.get("do") or body).get("params", [])]
    assert not missing


@pytest.mark.parametrize("dvc_file", codedeps.DVC_FILES)
def test_every_stage_with_cached_outputs_can_be_run_cached(dvc_file):
    """DVC 3 saves no run-cache entry for a stage with a `cache: false` out that is neither a metric nor a plot
    (dvc/stage/__init__.py, Stage.run), so `dvc exp run -S` of a setting run before would retrain it. A stage
    that writes any DVC-cached output keeps all of them cached (metrics and plots aside); only stages whose
    outputs are all git-tracked results (validate, the reports, the sweeps' pretrained row) opt out."""
    import yaml

    stages = yaml.safe_load((codedeps.ROOT / dvc_file).read_text())["stages"]
    uncached = {}
    for name, body in stages.items():
        outs = [(o, {}) if isinstance(o, str) else next(iter(o.items())) for o in (body.get("do") or body)["outs"]]
        if any(opts.get("cache", True) for _, opts in outs):
            uncached.update({f"{name}: {path}": opts for path, opts in outs if not opts.get("cache", True)})
    assert not uncached, "drop `cache: false` (or declare it under metrics:/plots:)"


def test_the_thread_count_setting_overrides_the_environment(monkeypatch):
    import torch

    from deme.train import set_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _package(root):
    for rel, text in {
        "deme/__init__.py": "",
        "deme/a.py": "import os\n\ndef f():\n    from deme.sub import b  # function-level\n    return b\n",
        "deme/sub/__init__.py": "from .c import x\n",
        "deme/sub/b.py": "from ..d import y\n",
        "deme/sub/c.py": "x = 1\n",
        "deme/d.py": "y = 2\n",
        "deme/unused.py": "",
        "stages/s.py": "import sys\nfrom deme.a import f\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_closure_follows_function_level_relative_and_package_imports(tmp_path):
    _package(tmp_path)
    got = codedeps.closure("python stages/s.py", tmp_path)
    assert got == ["deme/__init__.py", "deme/a.py", "deme/d.py", "deme/sub/__init__.py", "deme/sub/b.py",
                   "deme/sub/c.py", "stages/s.py"]
    assert codedeps.code_deps("python stages/s.py", tmp_path) == [
        "deme/__init__.py", "deme/a.py", "deme/d.py", "deme/sub", "stages/s.py"]


def test_sync_reports_and_rewrites_a_missing_module(tmp_path):
    _package(tmp_path)
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          s:
            cmd: python stages/s.py
            deps:
              - stages/s.py
              - deme/unused.py
              - data/x  # data stays
            outs:
              - out
        """))
    assert codedeps.sync("dvc.yaml", root=tmp_path) == {
        "s": (["deme/__init__.py", "deme/a.py", "deme/d.py", "deme/sub", "metrics/params.ok"], ["deme/unused.py"])}
    codedeps.sync("dvc.yaml", write=True, root=tmp_path)
    assert codedeps.sync("dvc.yaml", root=tmp_path) == {}
    text = (tmp_path / "dvc.yaml").read_text()
    assert "      - data/x  # data stays\n" in text and "      - metrics/params.ok\n" in text


def test_digest_changes_with_any_file_of_the_closure_only(tmp_path):
    _package(tmp_path)
    before = codedeps.digest("python stages/s.py", tmp_path)
    (tmp_path / "deme/unused.py").write_text("z = 3\n")
    assert codedeps.digest("python stages/s.py", tmp_path) == before
    (tmp_path / "deme/sub/c.py").write_text("x = 2\n")
    assert codedeps.digest("python stages/s.py", tmp_path) != before
