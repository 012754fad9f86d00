"""The pipeline end to end: the real `dvc repro` of the micro profile (image) and the micro_t2i profile
(text-to-image, the `t2i:` section) in a temporary git repository.

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


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """The image pipeline with its sweep (`dvc repro report sweeps/dvc.yaml:sweep_report`, profile micro) and
    the text-to-image pipeline (`dvc repro t2i_report`, profile micro_t2i), each in its own repository,
    reproduced at the same time on one core each (the two pipelines share no stage)."""
    made = {"image": (_make_repo(tmp_path_factory, "pipeline"), ["report", "sweeps/dvc.yaml:sweep_report"]),
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
    return out


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
    for model in ("pretrained", "plain", "ensemble", "merged", "min_snr", "p2", "snr_plus_one", "trunc_snr",
                  "ant_uw", "ant_nash", "difftuning"):
        m = json.loads((work / "metrics/micro/evaluate" / f"{model}.json").read_text())
        assert math.isfinite(m["fid"]) and m["fid"] >= 0, (model, m)
        assert m["num_samples"] == 64 and m["feature_net"] == "featnet"
        assert (work / "samples/micro" / f"{model}.png").stat().st_size > 0
    merge = json.loads((work / "metrics/micro/merge.json").read_text())
    assert len(merge["weights"]) == 2 and merge["candidates"] >= 2
    for i in (1, 2):
        assert (work / f"models/micro/deme/interval-{i}/diffusion_pytorch_model.safetensors").exists()
    report = (work / "reports/micro/report.md").read_text()
    assert "Table 1" in report and "(paper)" in report and "(ours)" in report
    fid = json.loads((work / "metrics/micro/evaluate/merged.json").read_text())["fid"]
    assert f"{fid:.3f}" in report  # the report shows the measured number
    for label in ("Min-SNR-γ", "P2 weighting", "SNR+1", "Trun-SNR", "ANT-UW", "ANT-NashMTL", "Diff-Tuning"):
        assert label in report
    assert (work / "reports/micro/weightings.png").stat().st_size > 0


T2I_MODELS = ("pretrained", "plain", "ensemble", "merged", "min_snr", "p2", "snr_plus_one", "trunc_snr", "ant_uw",
              "ant_nash", "difftuning")


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
    assert f"{clip['ranking_accuracy']:.4f}" in report
    assert (work / "reports/micro_t2i/prompt_grid.png").stat().st_size > 0
    runs = _runs(work, "micro_t2i")
    names = sorted(r.info.run_name for r in runs)
    single = ["plain", "min_snr", "p2", "snr_plus_one", "trunc_snr", "ant_uw", "ant_nash", "difftuning"]
    assert names == sorted(["prepare", "featnet", "clip", "fid_ref", "pretrain", "latents", "finetune@interval-1",
                            "finetune@interval-2", "merge", "report"] + [f"finetune@{m}" for m in single]
                           + [f"evaluate@{m}" for m in T2I_MODELS])
    assert all(r.data.tags["task"] == "t2i" and r.info.status == "FINISHED" for r in runs)
    again = _run([sys.executable, "-m", "dvc", "repro", "t2i_report"], work, env)
    assert "Running stage" not in again.stdout


def test_one_mlflow_run_per_stage_with_tags(micro_repo):
    work, _, _ = micro_repo
    runs = _runs(work)
    names = sorted(r.info.run_name for r in runs)
    single = ["plain", "min_snr", "p2", "snr_plus_one", "trunc_snr", "ant_uw", "ant_nash", "difftuning"]
    analyses = ["gradsim", "activations", "landscape", "plane", "taskvec", "sequence"]
    expected = sorted(["prepare", "featnet", "fid_ref", "pretrain", "finetune@interval-1", "finetune@interval-2",
                       "buffer", "merge", "evaluate@pretrained", "evaluate@ensemble", "evaluate@merged", "report",
                       "sweep@pretrained", "sweep@t3_n1", "sweep@n2_ps_cl_cp", "sweep@n2_p000", "report@sweep"]
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


def test_second_repro_does_nothing(micro_repo):
    work, env, _ = micro_repo
    before = len(_runs(work))
    out = _run([sys.executable, "-m", "dvc", "repro", "report", "sweeps/dvc.yaml"], work, env)
    assert "Running stage" not in out.stdout
    assert len(_runs(work)) == before
    status = _run([sys.executable, "-m", "dvc", "status", "--json", "report", "sweeps/dvc.yaml", "--with-deps"],
                  work, env)
    assert json.loads(status.stdout or "{}") == {}  # the image pipeline and the sweep's


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
        assert t["cos"].shape == (2, 2) and len(t["floor"]) == 1
    assert "Table 4" in report and "claims" in report and "images/s (measured)" in report
    # a figure is redrawn from its npz alone
    png = work / "figures/micro/gradsim/fig1a.png"
    png.unlink()
    _run([sys.executable, "stages/analyze.py", "--what", "gradsim", "--plot-only"], work, env)
    assert png.stat().st_size > 1000


def test_sweep_runs_table3_fig8_and_claims(micro_repo):
    work, env, _ = micro_repo
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


def test_exp_run_of_one_baseline_hparam_reruns_only_that_baseline(micro_repo):
    work, env, _ = micro_repo
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "outputs"], work, env)
    out = _run([sys.executable, "-m", "dvc", "exp", "run", "report", "-S", "baselines.p2.gamma=2.0"], work, env)
    ran = {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"finetune_baseline@p2", "evaluate@p2", "report"}
    show = _run([sys.executable, "-m", "dvc", "exp", "show", "--json"], work, env)
    assert "fid" in show.stdout
    exp_runs = [r for r in _runs(work) if r.data.tags.get("dvc_exp")]
    assert {r.data.tags["stage"] for r in exp_runs} == {"finetune", "evaluate", "report"}
    assert all(r.data.tags["dvc_exp"] == exp_runs[0].data.tags["dvc_exp"] for r in exp_runs)


def _params_with(work: Path, name: str, **sections) -> Path:
    """A copy of the micro params.yaml with some keys overridden (section -> {key: value})."""
    from deme.config import deep_update, read_params
    from deme.profiles import dump_yaml

    path = work / name
    path.write_text(dump_yaml(deep_update(read_params(work / "params.yaml"), sections)))
    return path


def test_two_processes_give_the_single_process_fid(micro_repo):
    """`accelerate launch --num_processes 2` on CPU (through deme.launch): the FID reference statistics and an
    evaluation FID equal the single-process ones for the same seeds, bit for bit."""
    import numpy as np

    work, env, _ = micro_repo
    saved = {p: p.read_bytes() for p in [work / "metrics/micro/evaluate/merged.json", work / "metrics/micro/fid_ref.json",
                                         *sorted((work / "stats/micro").iterdir())]}
    results = {}
    for n in (1, 2):  # batches of 16: 4 sample batches, split 2 + 2 over the processes
        params = _params_with(work, f"params-{n}.yaml", runtime={"num_processes": n}, sample={"batch_size": 16},
                              fid={"batch_size": 16})
        out = _run([sys.executable, "-m", "deme.launch", "stages/fid_ref.py", "--params", params.name], work, env)
        stats = np.load(work / "stats/micro/fid_ref_clean.npz")
        _run([sys.executable, "-m", "deme.launch", "stages/evaluate.py", "--model", "merged", "--params", params.name],
             work, env)
        results[n] = (stats["mu"].copy(), stats["sigma"].copy(),
                      json.loads((work / "metrics/micro/evaluate/merged.json").read_text()))
        if n == 2:
            assert "accelerate launch" in out.stdout or "[launch]" in out.stdout
    (mu1, s1, m1), (mu2, s2, m2) = results[1], results[2]
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
    target = work / "models/micro/deme/interval-1"
    saved = {p: p.read_bytes() for p in target.iterdir()}
    _run([sys.executable, "-m", "deme.launch", "stages/finetune.py", "--interval", "1", "--params", params.name],
         work, env)
    from deme.models import load_model, model_meta

    assert load_model(target) is not None and model_meta(target)["interval"] == 1
    runs = [r for r in _runs(work) if r.data.tags.get("num_processes") == "2" and r.data.tags["stage"] == "finetune"]
    assert len(runs) == 1 and "loss" in runs[0].data.metrics
    for p, data in saved.items():
        p.write_bytes(data)


def test_killed_finetuning_resumes_to_the_uninterrupted_weights(micro_repo):
    """SIGKILL a finetuning stage after a checkpoint, rerun it: it resumes and ends with the same weights,
    bit for bit, as an uninterrupted run (CPU, deterministic per-step seeds)."""
    import signal
    import time

    from safetensors.torch import load_file

    work, env, _ = micro_repo
    params = _params_with(work, "params-kill.yaml", finetune={"iterations": 120, "ckpt_every": 20, "log_every": 20},
                          runtime={"num_threads": 1})
    cmd = [sys.executable, "stages/finetune.py", "--method", "plain", "--params", params.name]
    out = work / "models/micro/plain/seed-0/diffusion_pytorch_model.safetensors"
    state = work / ".ckpt/micro/finetune-plain-seed0/state.json"
    shutil.rmtree(state.parent, ignore_errors=True)
    _run(cmd, work, env)
    reference = load_file(str(out))

    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("step", 0) >= 60:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise iterations"
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 240
    resumed = _run(cmd, work, env)
    assert f"resuming at step {killed_at}" in resumed.stdout
    after = load_file(str(out))
    assert after.keys() == reference.keys()
    assert all(bool((after[k] == reference[k]).all()) for k in reference)
    assert not state.parent.exists(), "the checkpoint is cleared after a finished run"


def test_several_training_seeds_give_mean_and_std(micro_repo):
    """baselines.seeds=2: one model per seed, evaluated separately, mean ± std in the metrics and the report.
    Runs the stage CLIs directly on the micro outputs (last test of the module: it rewrites outputs)."""
    work, env, _ = micro_repo
    params = work / "params.yaml"
    params.write_text(params.read_text().replace("  seeds: 1\n", "  seeds: 2\n", 1))
    for cmd in (["stages/finetune.py", "--method", "p2"], ["stages/evaluate.py", "--model", "p2"],
                ["stages/report.py"]):
        _run([sys.executable, *cmd], work, env)
    assert sorted(p.name for p in (work / "models/micro/baselines/p2").iterdir()) == ["seed-0", "seed-1"]
    m = json.loads((work / "metrics/micro/evaluate/p2.json").read_text())
    assert m["training_seeds"] == 2 and len(m["fid_seeds"]) == 2
    assert m["fid"] == pytest.approx(sum(m["fid_seeds"]) / 2)
    assert m["fid_seeds"][0] != m["fid_seeds"][1] and m["fid_std"] > 0
    assert f"± {m['fid_std']:.3f} (n=2)" in (work / "reports/micro/report.md").read_text()
