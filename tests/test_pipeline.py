"""The pipeline end to end: the real `dvc repro` of the micro profile (image, its analysis stages included)
and the micro_t2i profile (text-to-image, the `t2i:` section) in temporary git repositories, then the sweep
of sweeps/dvc.yaml (Table 3, Fig. 8) in a copy of the image repository.

Checks outputs, metrics, the MLflow runs and their tags, that a second `dvc repro` does nothing, and that
`dvc exp run -S` of a finetuning parameter reruns only what depends on it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deme.methods import SINGLE_MODEL_METHODS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _make_repo(tmp_path_factory, name: str) -> tuple[Path, dict]:
    """A git repository with the suite's code and a params.yaml of the micro and micro_t2i profiles."""
    work = tmp_path_factory.mktemp(name)
    for f in ("dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / f, work / f)
    for d in ("deme", "stages"):
        shutil.copytree(REPO / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "checkpoints").mkdir()  # the published checkpoints (a dependency of `pretrain`) and their pipeline
    shutil.copy(REPO / "checkpoints" / "dvc.yaml", work / "checkpoints" / "dvc.yaml")
    (work / "sweeps").mkdir()
    shutil.copy(REPO / "sweeps" / "dvc.yaml", work / "sweeps" / "dvc.yaml")
    (work / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("DVC_EXP_NAME", None)
    _run([sys.executable, "-m", "deme.profiles", "use", "micro"], work, env)
    _run([sys.executable, "-m", "deme.profiles", "use", "micro_t2i"], work, env)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["git", "add", "-A"], ["git", "commit", "-qm", "micro"]):
        _run(cmd, work, env)
    return work, env


# Work that needs the reproduced image pipeline but not the tests that follow runs in the background, each
# in its own copy of the repository, on the core the foreground tests leave idle: the sweep of
# sweeps/dvc.yaml, and the `dvc exp run` and several-seeds checks.
BACKGROUND = {
    "sweep": "python -m dvc repro sweeps/dvc.yaml > sweep.out 2>&1 && python -m dvc repro sweeps/dvc.yaml > again.out 2>&1",
    "exp": ("git add -A && git commit -qm outputs && "
            "python -m dvc exp run report -S baselines.p2.gamma=2.0 > exp_run.out 2>&1 && "
            "python -m dvc exp show --json > exp_show.json 2>/dev/null && "
            "python -c \"import pathlib; p = pathlib.Path('params.yaml'); "
            "p.write_text(p.read_text().replace('  seeds: 1\\n', '  seeds: 2\\n', 1))\" && "
            "python stages/finetune.py --method p2 > seeds.out 2>&1 && python stages/evaluate.py --model p2 >> seeds.out 2>&1 "
            "&& python stages/report.py >> seeds.out 2>&1"),
}


def _start_background(work: Path, env: dict, name: str) -> tuple[Path, dict, subprocess.Popen]:
    copy = work.with_name(f"{work.name}-{name}")
    shutil.copytree(work, copy, symlinks=True)
    benv = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", "-c", BACKGROUND[name]], cwd=copy, env=benv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return copy, benv, proc


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """The image pipeline (`dvc repro report`, profile micro) and the text-to-image pipeline (`dvc repro
    t2i_report`, profile micro_t2i), each in its own repository, reproduced at the same time on one core each
    (the two pipelines share no stage); then the background jobs of BACKGROUND start on copies of the image
    repository."""
    made = {"image": (_make_repo(tmp_path_factory, "pipeline"), ["report"]),
            "t2i": (_make_repo(tmp_path_factory, "pipeline_t2i"), ["t2i_report"])}
    procs = {}
    for key, ((work, env), targets) in made.items():
        one_core = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs[key] = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *targets], cwd=work, env=one_core,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1500)
        if proc.returncode != 0:
            raise AssertionError(f"dvc repro ({key}) failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
        (work, env), _ = made[key]
        out[key] = (work, env, subprocess.CompletedProcess(proc.args, 0, stdout, stderr))
        if key == "image":
            out["jobs"] = {name: _start_background(work, env, name) for name in BACKGROUND}
    yield out
    for _, _, proc in out.get("jobs", {}).values():
        if proc.poll() is None:
            proc.kill()


def _job(repos, name: str) -> tuple[Path, dict]:
    """Wait for a background job (once); its repository copy and environment."""
    copy, env, proc = repos["jobs"][name]
    if proc.returncode is None or not hasattr(proc, "output"):
        proc.output, _ = proc.communicate(timeout=900)
    output = proc.output
    if proc.returncode != 0:
        logs = "".join(f"\n--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(copy.glob("*.out")))
        raise AssertionError(f"background job {name} failed ({proc.returncode}): {output[-2000:]}{logs}")
    return copy, env


@pytest.fixture(scope="module")
def micro_repo(repos):
    return repos["image"]


@pytest.fixture(scope="module")
def t2i_repo(repos):
    return repos["t2i"]


def _runs(work: Path, profile: str = "micro") -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(profile)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_repro_writes_measured_metrics_and_report(micro_repo):
    work, _, _ = micro_repo
    for model in ("pretrained", "ensemble", "merged", *SINGLE_MODEL_METHODS):
        m = json.loads((work / "metrics/micro/evaluate" / f"{model}.json").read_text())
        assert math.isfinite(m["fid"]) and m["fid"] >= 0, (model, m)
        assert m["num_samples"] == 64 and m["feature_net"] == "featnet"
        assert (work / "samples/micro" / f"{model}.png").stat().st_size > 0
    merge = json.loads((work / "metrics/micro/merge.json").read_text())
    # deme.seeds = 2 on micro: every seed's interval models merged by a search of their own
    assert merge["seeds"] == 2 and [len(w) for w in merge["weights"]] == [2, 2] and min(merge["candidates"]) >= 2
    for i in (1, 2):
        for s in (0, 1):
            assert (work / f"models/micro/deme/interval-{i}/seed-{s}/diffusion_pytorch_model.safetensors").exists()
    report = (work / "reports/micro/report.md").read_text()
    assert "Table 1" in report and "(paper)" in report and "(ours)" in report
    m = json.loads((work / "metrics/micro/evaluate/merged.json").read_text())
    assert m["training_seeds"] == 2 and m["fid_lo"] < m["fid"] < m["fid_hi"] and m["kid_std"] > 0
    assert f"{m['fid']:.3f} [{m['fid_lo']:.3f}, {m['fid_hi']:.3f}] n=2" in report  # the measured number, its interval
    assert "The paper's orderings" in report and "95 % interval" in report
    plain = json.loads((work / "metrics/micro/evaluate/plain.json").read_text())
    assert len(plain["scale"]) == 2  # the plain control's own weight search, per seed
    for label in ("Min-SNR-γ", "P2 weighting", "SNR+1", "Trun-SNR", "ANT-UW", "ANT-NashMTL", "Diff-Tuning"):
        assert label in report
    # the piecewise control of seed s trained with seed s's searched merge weights as its loss weight
    for s, w in enumerate(merge["weights"]):
        meta = json.loads((work / f"models/micro/baselines/piecewise/seed-{s}/deme.json").read_text())
        assert meta["loss_weights"] == w and meta["method"] == "piecewise"
    assert "Piecewise reweighting" in report and "does decoupling add more than the reweighting" in report
    assert (work / "reports/micro/weightings.png").stat().st_size > 0


T2I_MODELS = ("pretrained", "ensemble", "merged", *SINGLE_MODEL_METHODS)


def test_text_to_image_pipeline_writes_table2(t2i_repo):
    """The t2i stages ran for micro_t2i: every model evaluated on the three benchmarks with FID and CLIP,
    the t2i report holds a measured Table 2 and the prompt-by-model grid, one MLflow run per stage, and a
    second `dvc repro t2i_report` does nothing."""
    work, env, _ = t2i_repo
    for model in T2I_MODELS:
        m = json.loads((work / "metrics/micro_t2i/evaluate" / f"{model}.json").read_text())
        for key in ("coco_fid", "imagenet_fid", "coco_clip", "imagenet_clip", "parti_clip"):
            assert math.isfinite(m[key]), (model, key, m)
        assert m["prompts"] == {"coco": 32, "imagenet": 40, "parti": 16} and m["sampler"] == "PNDMScheduler"
        assert (work / "samples/micro_t2i" / f"{model}-prompts.png").stat().st_size > 0
    clip = json.loads((work / "metrics/micro_t2i/clip.json").read_text())
    assert 0 <= clip["ranking_accuracy"] <= 1
    assert (work / "latents/micro_t2i/latents.npy").exists()
    assert (work / "models/micro_t2i/pretrained/model_index.json").exists()
    report = (work / "reports/micro_t2i/report.md").read_text()
    assert "Table 2" in report and "micro_t2i COCO FID↓ (ours)" in report and "COCO FID (paper)" in report
    merged = json.loads((work / "metrics/micro_t2i/evaluate/merged.json").read_text())
    assert f"{merged['coco_fid']:.2f}" in report
    for key in ("coco_fid", "imagenet_fid", "coco_clip", "parti_clip"):  # every value with its 95 % interval
        assert merged[f"{key}_lo"] <= merged[key] <= merged[f"{key}_hi"], key
    assert f"[{merged['coco_fid_lo']:.2f}, {merged['coco_fid_hi']:.2f}] n=1" in report
    # the single-model rows get the merge's search on their task vector, scored against the proxy's own images
    for model in SINGLE_MODEL_METHODS:
        m = json.loads((work / "metrics/micro_t2i/evaluate" / f"{model}.json").read_text())
        assert len(m["scale"]) == m["training_seeds"] and all(math.isfinite(f) for f in m["scale_proxy_fid"]), model
    assert "fid_coco_search" in json.loads((work / "metrics/micro_t2i/merge.json").read_text())["search_reference"]
    assert (work / "features/micro_t2i/merged.npz").exists() and "orderings on this profile (COCO FID)" in report
    assert f"{clip['ranking_accuracy']:.4f}" in report
    assert (work / "reports/micro_t2i/prompt_grid.png").stat().st_size > 0
    runs = _runs(work, "micro_t2i")
    names = sorted(r.info.run_name for r in runs)
    single = list(SINGLE_MODEL_METHODS)
    assert names == sorted(["prepare", "featnet", "clip", "fid_ref", "pretrain", "latents", "finetune@interval-1",
                            "finetune@interval-2", "merge", "report"] + [f"finetune@{m}" for m in single]
                           + [f"evaluate@{m}" for m in T2I_MODELS])
    assert all(r.data.tags["task"] == "t2i" and r.info.status == "FINISHED" for r in runs)
    again = _run([sys.executable, "-m", "dvc", "repro", "t2i_report"], work, env)
    assert "Running stage" not in again.stdout


def test_every_plot_file_is_one_line_per_run_without_blank_cells(micro_repo, t2i_repo):
    """DVC plots draw x against y per file: x must increase down the file (no restarts, e.g. a second training
    run appended to the first) and no cell may be blank."""
    import pandas as pd

    files = [f for work, _, _ in (micro_repo, t2i_repo) for f in sorted((work / "plots").glob("*/*.csv"))]
    assert len(files) >= 10
    for f in files:
        df = pd.read_csv(f)
        x = "candidate" if f.stem == "merge_search" else "step"
        assert df[x].is_monotonic_increasing and df[x].is_unique, f
        assert not df.isna().any().any(), (f, [c for c in df if df[c].isna().any()])


def test_dvc_plots_overlay_every_methods_training_curve(micro_repo, t2i_repo):
    """`dvc plots show` draws one chart per pipeline with one eps-MSE line per single-model method."""
    for (work, env, _), plot, prof in ((micro_repo, "finetune_loss_eps", "micro"),
                                       (t2i_repo, "t2i_finetune_loss_eps", "micro_t2i")):
        out = _run([sys.executable, "-m", "dvc", "plots", "show", "--json"], work, env).stdout
        shown = json.loads(out[out.index("{"):])
        assert not [e for e in shown.get("errors", []) if f"plots/{prof}/" in e["source"]], shown["errors"]
        values = shown["data"][plot][0]["content"]["data"]["values"]
        assert sorted({v["filename"] for v in values}) == sorted(f"finetune-{m}.csv" for m in SINGLE_MODEL_METHODS)
        assert all(v["loss_eps"] for v in values)


def test_one_mlflow_run_per_stage_with_tags(micro_repo):
    work, _, _ = micro_repo
    runs = _runs(work)
    names = sorted(r.info.run_name for r in runs)
    single = list(SINGLE_MODEL_METHODS)
    analyses = ["gradsim", "activations", "landscape", "plane", "taskvec", "sequence"]
    expected = sorted(["prepare", "featnet", "fid_ref", "pretrain", "finetune@interval-1", "finetune@interval-2",
                       "buffer", "merge", "evaluate@pretrained", "evaluate@ensemble", "evaluate@merged", "report"]
                      + [f"finetune@{m}" for m in single] + [f"evaluate@{m}" for m in single]
                      + [f"analyze@{a}" for a in analyses])
    assert names == expected
    for r in runs:
        assert r.info.status == "FINISHED"
        for tag in ("stage", "profile", "git_commit", "dvc_exp"):
            assert tag in r.data.tags, (r.info.run_name, tag)
        assert r.data.tags["profile"] == "micro"
        assert len(r.data.tags["git_commit"]) == 40
    ev = next(r for r in runs if r.info.run_name == "evaluate@merged")
    assert "fid" in ev.data.metrics
    ft = next(r for r in runs if r.info.run_name == "finetune@interval-1")
    assert {"loss", "loss_eps", "loss_consistency"} <= set(ft.data.metrics)
    # compare-ready: every setting as a param, one group per repro, images by key, data set and system metrics
    assert ev.data.params["deme.p"] == ft.data.params["deme.p"] and ev.data.params["method"] == "merged"
    assert len({r.data.tags["deme.group"] for r in runs}) == 1
    assert [d.dataset.name for d in ft.inputs.dataset_inputs] == ["micro/train"]
    trained = [r for r in runs if r.info.run_name.startswith("finetune@")]
    assert any(k.startswith("system/") for r in trained for k in r.data.metrics)  # sampled every second


def test_second_repro_does_nothing(micro_repo):
    work, env, _ = micro_repo
    before = len(_runs(work))
    out = _run([sys.executable, "-m", "dvc", "repro", "report"], work, env)
    assert "Running stage" not in out.stdout
    assert len(_runs(work)) == before
    status = _run([sys.executable, "-m", "dvc", "status", "--json", "report", "--with-deps"], work, env)
    assert json.loads(status.stdout or "{}") == {}


ANALYSES = {"gradsim": ["fig1a"], "activations": ["fig2"], "landscape": ["fig4"], "plane": ["fig6a"],
            "taskvec": ["fig6b", "fig7"], "sequence": ["fig_sequence"]}


def test_analysis_stages_write_data_figures_and_the_report_embeds_them(micro_repo):
    import numpy as np

    work, env, _ = micro_repo
    report = (work / "reports/micro/report.md").read_text()
    for name, figs in ANALYSES.items():
        with np.load(work / f"analysis/micro/{name}.npz") as data:
            assert data.files
        for fig in figs:
            for ext in ("png", "pdf"):
                assert (work / f"figures/micro/{name}/{fig}.{ext}").stat().st_size > 1000
            assert f"]({fig}.png)" in report and (work / f"reports/micro/{fig}.png").exists()
    with np.load(work / "analysis/micro/gradsim.npz") as g:
        S = g["S"]
        assert S.shape == (5, 5) and np.allclose(np.diag(S), 1, atol=1e-5)
    with np.load(work / "analysis/micro/taskvec.npz") as t:
        assert t["cos"].shape == (2, 2) and len(t["floor"]) == 2  # every interval's two training seeds
        assert t["seed_cos"].shape == (2, 2, 2) and t["seed_norms"].shape == (2, 2)  # the geometry of each seed
    assert "cross-interval cosine mean per training seed" in report
    assert "Table 4" in report and "claims" in report and "NFEs / image" in report and "images_per_s" in report
    # a figure is redrawn from its npz alone
    png = work / "figures/micro/gradsim/fig1a.png"
    png.unlink()
    _run([sys.executable, "stages/analyze.py", "--what", "gradsim", "--plot-only"], work, env)
    assert png.stat().st_size > 1000


def _stale(work: Path, env: dict) -> set[str]:
    out = _run([sys.executable, "-m", "dvc", "status", "--json", "report", "--with-deps"], work, env)
    return set(json.loads(out.stdout or "{}"))


def test_finetune_param_makes_exactly_its_dependents_stale(micro_repo):
    work, env, _ = micro_repo
    params = work / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("  lr: 0.0002\n", "  lr: 0.0005\n", 1))
        assert params.read_text() != original
        stale = _stale(work, env)
        assert {"finetune@1", "finetune@2", "finetune_plain", "finetune_baseline@p2", "finetune_difftuning"} <= stale
        assert not stale & {"prepare", "featnet", "fid_ref", "pretrain", "buffer", "evaluate@pretrained"}
    finally:
        params.write_text(original)
    assert _stale(work, env) == set()


def test_a_module_edit_makes_exactly_its_importers_stale(micro_repo):
    """Code deps are the import closure: touching deme/merge.py makes stale exactly the image stages whose
    command imports it, and restoring it makes the pipeline clean again."""
    from deme import codedeps

    work, env, _ = micro_repo
    module = work / "deme" / "merge.py"
    original = module.read_text()
    cmds = codedeps._stages((work / "dvc.yaml").read_text())
    want = {name for name, cmd in cmds.items()
            if not name.startswith("t2i_") and "deme/merge.py" in codedeps.closure(cmd, work)}
    assert want and want != {n for n in cmds if not n.startswith("t2i_")}  # some stages import it, not all
    try:
        module.write_text(original + "\n# touched\n")
        out = _run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], work, env)
        assert {s.split("@")[0] for s in json.loads(out.stdout or "{}") if not s.startswith("t2i_")} == want
    finally:
        module.write_text(original)
    assert _stale(work, env) == set()


def test_outputs_are_a_function_of_their_inputs_only(micro_repo):
    """Nothing that changes with a commit, a clock or a host goes into an output: after a new commit, a forced
    rerun of a training and an evaluation stage (same thread count as the pipeline's) leaves `dvc status`
    clean, so nothing downstream is stale."""
    work, env, _ = micro_repo
    one_core = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with _Restoring(work, "mlflow.db"):
        _run(["git", "commit", "-q", "--allow-empty", "-m", "another commit"], work, env)
        for stage in ("finetune@1", "evaluate@pretrained"):
            _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], work, one_core)
    assert _stale(work, env) == set()


# Bad values as `dvc exp run -S` writes them (the fuzz cases of test_params_fuzz.py that -S can express).
BAD_SET_PARAMS = ["deme.p=1.5", "finetune.iterations=-5", "sample.steps=abc", "data.kind=nope",
                  "finetune.lr=true", "fid.modes=clean", "merge.start=100", "t2i.sample.eta=2"]


def _snapshot(work: Path) -> dict[Path, bytes]:
    skip = {".git", "mlflow.db", "mlruns", "__pycache__", "tmp"}  # MLflow's store is the notebook, not an output
    return {f: f.read_bytes() for f in sorted(work.rglob("*"))
            if f.is_file() and not skip & set(f.relative_to(work).parts)}


def test_a_bad_exp_run_param_leaves_every_output_and_params_yaml_as_they_were(micro_repo):
    """The `validate` stage runs before DVC removes any output; under `dvc exp run` it puts params.yaml back."""
    work, env, _ = micro_repo
    before = _snapshot(work)
    assert any(p.parts[-2:] == ("micro", "pretrained") or "models" in p.parts for p in before)
    for setting in BAD_SET_PARAMS:
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "report", "-S", setting], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1 and setting.split("=")[0] in errors[0], (setting, errors)
        after = _snapshot(work)
        assert after.keys() == before.keys() and all(after[f] == before[f] for f in before), setting
    assert _stale(work, env) == set()


class _Restoring:
    """Put files and folders back as they were when the block ends (a test that reruns a stage must not leave
    the shared reproduced repository changed for the tests after it)."""

    def __init__(self, work: Path, *paths: str):
        self.files = {}
        for rel in paths:
            p = work / rel
            self.files.update({f: f.read_bytes() for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f, data in self.files.items():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)


def _params_with(work: Path, name: str, **sections) -> Path:
    """A copy of the micro params.yaml with some keys overridden (section -> {key: value})."""
    from deme.config import deep_update, read_params
    from deme.profiles import dump_yaml

    path = work / name
    path.write_text(dump_yaml(deep_update(read_params(work / "params.yaml"), sections)))
    return path


def test_two_processes_give_the_single_process_fid(micro_repo):
    """`accelerate launch --num_processes 2` on CPU (through deme.launch): the FID reference statistics and an
    evaluation FID equal the pipeline's single-process ones for the same seeds, bit for bit (micro samples and
    extracts features in batches of 16: 4 sample batches, split 2 + 2 over the processes)."""
    import numpy as np

    work, env, _ = micro_repo
    saved = {p: p.read_bytes() for p in [work / "metrics/micro/evaluate/merged.json", work / "metrics/micro/fid_ref.json",
                                         *sorted((work / "stats/micro").iterdir())]}
    with np.load(work / "stats/micro/fid_ref_clean.npz") as stats:
        mu1, s1 = stats["mu"].copy(), stats["sigma"].copy()
    m1 = json.loads((work / "metrics/micro/evaluate/merged.json").read_text())
    params = _params_with(work, "params-2.yaml", runtime={"num_processes": 2})
    out = _run([sys.executable, "-m", "deme.launch", "stages/fid_ref.py", "--params", params.name], work, env)
    assert "accelerate launch" in out.stdout or "[launch]" in out.stdout
    with np.load(work / "stats/micro/fid_ref_clean.npz") as stats:
        mu2, s2 = stats["mu"].copy(), stats["sigma"].copy()
    _run([sys.executable, "-m", "deme.launch", "stages/evaluate.py", "--model", "merged", "--params", params.name],
         work, env)
    m2 = json.loads((work / "metrics/micro/evaluate/merged.json").read_text())
    assert m2["num_processes"] == 2 and m1["num_processes"] == 1
    assert np.array_equal(mu1, mu2) and np.array_equal(s1, s2)
    assert m1["fid"] == m2["fid"], (m1["fid"], m2["fid"])
    runs = [r for r in _runs(work) if r.data.tags.get("num_processes") == "2"]
    assert {r.data.tags["stage"] for r in runs} == {"fid_ref", "evaluate"}  # one run per execution, from rank 0
    for path, data in saved.items():  # leave the pipeline's own outputs as they were
        path.write_bytes(data)


def test_two_process_training_runs(micro_repo):
    """DDP finetuning on CPU (gloo) through deme.launch: both processes train, rank 0 saves and logs once."""
    work, env, _ = micro_repo
    params = _params_with(work, "params-ddp.yaml", runtime={"num_processes": 2})
    target = work / "models/micro/deme/interval-1/seed-0"
    with _Restoring(work, "models/micro/deme/interval-1", "metrics/micro/train/interval-1.json",
                    "plots/micro/finetune-interval-1.csv"):
        _run([sys.executable, "-m", "deme.launch", "stages/finetune.py", "--interval", "1", "--params", params.name],
             work, env)
        from deme.models import load_model, model_meta

        assert load_model(target) is not None and model_meta(target)["interval"] == 1
        runs = [r for r in _runs(work) if r.data.tags.get("num_processes") == "2" and r.data.tags["stage"] == "finetune"]
        assert len(runs) == 1 and "loss" in runs[0].data.metrics


def test_killed_finetuning_resumes_to_the_uninterrupted_weights(micro_repo):
    """SIGKILL a finetuning stage after a checkpoint, rerun it: it resumes and ends with the same weights,
    bit for bit, as an uninterrupted run (CPU, deterministic per-step seeds)."""
    import signal
    import time

    from safetensors.torch import load_file

    work, env, _ = micro_repo
    params = _params_with(work, "params-kill.yaml", finetune={"iterations": 80, "ckpt_every": 10, "log_every": 10},
                          runtime={"num_threads": 1})
    restore = _Restoring(work, "models/micro/plain", "metrics/micro/train/plain.json", "plots/micro/finetune-plain.csv")
    cmd = [sys.executable, "stages/finetune.py", "--method", "plain", "--params", params.name]
    out = work / "models/micro/plain/seed-0/diffusion_pytorch_model.safetensors"
    state = work / ".ckpt/micro/finetune-plain-seed0/state.json"
    shutil.rmtree(state.parent, ignore_errors=True)
    _run(cmd, work, env)
    reference = load_file(str(out))

    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("step", 0) >= 40:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise iterations"
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 160
    resumed = _run(cmd, work, env)
    assert f"resuming at step {killed_at}" in resumed.stdout
    after = load_file(str(out))
    assert after.keys() == reference.keys()
    assert all(bool((after[k] == reference[k]).all()) for k in reference)
    assert not state.parent.exists(), "the checkpoint is cleared after a finished run"
    restore.__exit__()


# ----------------------------------------------------------------------------------------------------
# The background jobs (last in the module, so they have had the foreground tests' time to run).


def test_sweep_runs_table3_fig8_and_claims(repos):
    """`dvc repro sweeps/dvc.yaml` (the README's ablation command) on micro: every run trained, merged and
    evaluated at its step counts, the sweep report with Table 3, Fig. 8 and the claims; a second run does nothing."""
    work, env = _job(repos, "sweep")
    runs = {p.stem: json.loads(p.read_text()) for p in (work / "sweeps/micro").glob("*.json")}
    assert set(runs) == {"pretrained", "t3_n1", "n2_ps_cl_cp", "n2_p000"}
    full = runs["n2_ps_cl_cp"]
    assert full["steps"] == [5, 6] and full["n"] == 2 and len(full["weights"]) == 2  # Fig. 8 (5) and Table 3 (6)
    assert full["iterations_per_model"] * 2 == runs["t3_n1"]["iterations_total"] == 12  # compute-matched
    for key in ("fid_ensemble_6", "fid_merged_6", "fid_ensemble_5", "fid_merged_5"):
        assert math.isfinite(full[key])
    assert (work / "models/micro/sweep/n2_ps_cl_cp/merged/diffusion_pytorch_model.safetensors").exists()
    report = (work / "reports/micro_sweep/report.md").read_text()
    assert "Table 3" in report and "Fig. 8" in report and "(paper)" in report
    assert f"{full['fid_merged_6']:.3f}" in report and f"{runs['pretrained']['fid_6']:.3f}" in report
    assert "| claim (the paper's) |" in report and (work / "reports/micro_sweep/fig8.png").stat().st_size > 1000
    assert "Running stage" not in (work / "again.out").read_text()
    names = sorted(r.info.run_name for r in _runs(work) if r.data.tags["stage"] in ("sweep", "report")
                   and r.info.run_name != "report")
    assert names == ["report@sweep", "sweep@n2_p000", "sweep@n2_ps_cl_cp", "sweep@pretrained", "sweep@t3_n1"]


DEPS_COLUMNS = "^[^:.]*/[^:]*$"  # the README's `dvc exp show --drop`: dependency paths, not params or metrics


def test_exp_run_of_one_baseline_hparam_reruns_only_that_baseline(repos):
    work, env = _job(repos, "exp")
    out = (work / "exp_run.out").read_text()
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"validate", "finetune_baseline@p2", "evaluate@p2", "report"}  # validate: params.yaml changed
    assert "fid" in (work / "exp_show.json").read_text()
    table = _run([sys.executable, "-m", "dvc", "exp", "show", "--only-changed", "--drop", DEPS_COLUMNS, "--no-pager"],
                 work, {**env, "COLUMNS": "1000"}).stdout  # as wide as it wants: the table itself must fit
    width = max(len(line.rstrip()) for line in table.splitlines())
    assert width <= 160 and "p2.fid" in table and "gamma" in table, (width, table[:2000])
    summary = json.loads((work / "metrics" / "micro.json").read_text())
    assert {"fid", "fid_lo", "fid_hi", "n"} <= set(summary["p2"]) and summary["p2"]["n"] in (1, 2)
    exp_runs = [r for r in _runs(work) if r.data.tags.get("dvc_exp")]
    assert {r.data.tags["stage"] for r in exp_runs} == {"finetune", "evaluate", "report"}
    assert all(r.data.tags["dvc_exp"] == exp_runs[0].data.tags["dvc_exp"] for r in exp_runs)


def test_several_training_seeds_give_mean_and_std(repos):
    """baselines.seeds=2: one model per seed, evaluated separately, mean ± std in the metrics and the report
    (the stage CLIs run directly on the micro outputs, in the `exp` job's copy after its experiment)."""
    work, env = _job(repos, "exp")
    assert sorted(p.name for p in (work / "models/micro/baselines/p2").iterdir()) == ["seed-0", "seed-1"]
    m = json.loads((work / "metrics/micro/evaluate/p2.json").read_text())
    assert m["training_seeds"] == 2 and len(m["fid_seeds"]) == 2
    assert m["fid"] == pytest.approx(sum(m["fid_seeds"]) / 2)
    assert m["fid_seeds"][0] != m["fid_seeds"][1] and m["fid_std"] > 0
    assert f"{m['fid']:.3f} [{m['fid_lo']:.3f}, {m['fid_hi']:.3f}] n=2" in (work / "reports/micro/report.md").read_text()


# ----------------------------------------------------------------------------------------------------
# CI only (marked `ci`, DEME_FULL_TESTS=1): the SIGKILL fault harness over every long stage. Each stage is
# killed at a random point after 1..K saved pieces (a checkpoint, a finished batch of samples, a loss-plane
# point, a scored merge candidate), rerun, and must resume to the uninterrupted run's outputs bit for bit
# with the killed MLflow run closed as KILLED and linked to the resumed one (scripts/fault_harness.py).
# analyze@taskvec trains nothing where deme.seeds >= 2 (its seed floor is the second seed's models), so it has
# nothing to resume on micro.

# Before the resume, each stage's killed state is also tried with each kind of change to what shapes its
# result (a setting, the code, the thread count, an input file) and must start over, saying why
# (scripts/fault_harness.py --changes). The settings change is `seed` + 1 where the stage reads the seed; the
# input is the stage's first data or model dependency unless named here (the file its killed pieces read).
CHANGES = {
    "image": ["--settings", "fid_ref=fid.reference_samples=200",
              "--inputs", "fid_ref=data/micro/ref.npy", "analyze@plane=models/micro/deme"],
    "t2i": ["--settings", "t2i_fid_ref=t2i.fid.reference_samples=24",
            "--inputs", "t2i_fid_ref=data/micro_t2i/bench/coco.npy",
            "t2i_evaluate@merged=models/micro_t2i/pretrained/vae",
            "t2i_merge=models/micro_t2i/deme"],  # it reads the prompts of data/, not train.npy
    "sweep": [],
}

FAULT_STAGES = {
    "image": ["pretrain", "finetune@1", "finetune_baseline@ant_nash", "buffer", "merge:3", "evaluate@ensemble:3",
              "fid_ref:8", "analyze@gradsim", "analyze@activations", "analyze@landscape:6", "analyze@plane:8"],
    "t2i": ["t2i_pretrain", "t2i_latents", "t2i_finetune@1", "t2i_merge:3", "t2i_evaluate@merged:2", "t2i_fid_ref:3"],
    "sweep": ["sweeps/dvc.yaml:sweep@n2_p000:3"],
}


def _fault_harness(work: Path, env: dict, key: str, seed: int) -> list[dict]:
    copy = work.with_name(f"{work.name}-faults-{key}")
    shutil.copytree(work, copy, symlinks=True)
    # one thread, as the uninterrupted runs had: another thread count changes float sums, hence the bits
    fenv = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_harness.py"), *FAULT_STAGES[key],
                          "--seed", str(seed), "--json", "faults.json", "--changes", "settings,code,threads,input",
                          *CHANGES[key]], cwd=copy, env=fenv, capture_output=True, text=True, timeout=2400)
    report = copy / "faults.json"
    if not report.exists():
        raise AssertionError(f"fault harness ({key}) wrote no report ({out.returncode}):\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    results = json.loads(report.read_text())["results"]
    print(f"\nfault harness ({key}, seed {seed}):")
    for r in results:
        print(f"  {r['stage']}: killed after {r.get('pieces_saved_before_kill')} pieces at {r.get('killed_at_s')} s, "
              f"resumed={r.get('resumed')}, outputs equal={r.get('outputs_equal')} ({r.get('outputs')}), ok={r['ok']}")
        for c in r.get("changes", []):
            print(f"    {c['change']}: {c.get('what') or c.get('skipped')}: {c.get('why', '')} (ok={c['ok']})")
    changed = [c for r in results for c in r.get("changes", [])]
    assert len(changed) == 4 * len(results), "every stage tried with each kind of change"
    failed = [r for r in results if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[-6000:]
    return results


@pytest.mark.ci
def test_fault_harness_image_stages(micro_repo):
    work, env, _ = micro_repo
    results = _fault_harness(work, env, "image", seed=1)
    assert len(results) == len(FAULT_STAGES["image"])


@pytest.mark.ci
def test_fault_harness_text_to_image_stages(t2i_repo):
    work, env, _ = t2i_repo
    results = _fault_harness(work, env, "t2i", seed=2)
    assert len(results) == len(FAULT_STAGES["t2i"])


@pytest.mark.ci
def test_fault_harness_sweep_stage(repos):
    work, env = _job(repos, "sweep")
    results = _fault_harness(work, env, "sweep", seed=3)
    assert len(results) == 1


# CI only: the scale-out path on localhost (scripts/scaleout_check.py): an `mlflow server` as the tracking URI,
# 4 experiments queued with `dvc exp run --queue` and run by `dvc queue start -j 2`, every stage run logged on
# the server with its experiment's name, then `dvc push --run-cache` to a local DVC remote and a fresh clone
# that pulls and reproduces without running a stage.

@pytest.mark.ci
def test_scaleout_mlflow_server_queue_and_dvc_remote(micro_repo, tmp_path):
    work, env, _ = micro_repo
    repo = tmp_path / "repo"  # the reproduced state: earlier tests rewrote some outputs (e.g. the SIGKILL test's)
    shutil.copytree(work, repo, symlinks=True)
    _run([sys.executable, "-m", "dvc", "checkout", "--force", "report", "--with-deps"], repo, env)
    summary = tmp_path / "scaleout.json"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "scaleout_check.py"), str(repo),
                          "--tmp", str(tmp_path / "scaleout"), "--summary", str(summary)],
                         env={**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0 and summary.exists(), f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    s = json.loads(summary.read_text())
    print("\nscale-out:", json.dumps(s)[:3000])
    assert s["ok"] is True
    assert s["queued"] == s["succeeded"] == 4 and s["failed"] == 0
    assert s["mlflow_runs"] == s["mlflow_runs_expected"] == 12 and s["distinct_dvc_exp"] == 4  # 3 stages x 4, none lost
    assert s["parallel"]["max_concurrent_experiments"] == 2
    assert s["outputs_clone"] == s["outputs_original"] and s["outputs_clone"]["present"] == s["outputs_clone"]["outs"]
    assert s["recomputed_stages_in_clone"] == 0 and s["clone_repro"]["dvc_status_clean"]
