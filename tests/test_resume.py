"""Resume state of the long stages (deme/resume.py): a computation interrupted after some of its pieces and
rerun gives the uninterrupted result bit for bit, recomputing only the missing pieces; stale or corrupt pieces
are not reused; killed MLflow runs are closed as KILLED and linked to the run that resumes them; a corrupt
training checkpoint or model file is one clear line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_tiny_unet, randomize_
from deme.config import config_from_mapping
from deme.resume import ScoreLog, Shards, state_digest

CPU = torch.device("cpu")


class Interrupt(Exception):
    """Stands in for the kill: raised by a wrapped callable after a number of calls."""


def interrupting(fn, after: int):
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise Interrupt(f"interrupted after {after} calls")
        return fn(*args, **kwargs)
    wrapped.calls = calls
    return wrapped


# ---------------------------------------------------------------------------------------------- Shards


def test_shards_roundtrip_fingerprint_and_corrupt_pieces(tmp_path):
    s = Shards(tmp_path / "r", {"a": 1})
    s.put("k1", {"x": np.arange(3), "y": torch.ones(2)})
    again = Shards(tmp_path / "r", {"a": 1})
    got = again.get("k1")
    assert np.array_equal(got["x"], np.arange(3)) and got["y"].dtype == np.float32 and again.reused == 1
    assert again.get("missing") is None
    other = Shards(tmp_path / "r", {"a": 2})  # another setting: the old pieces are gone
    assert other.get("k1") is None and not s.dir.exists()
    other.put("k2", {"x": np.zeros(4)})
    (other.dir / "k2.npz").write_bytes(b"PK\x03\x04 truncated")  # a disk fault: recompute, never crash
    fresh = Shards(tmp_path / "r", {"a": 2})
    assert fresh.get("k2") is None and not (other.dir / "k2.npz").exists()
    (fresh.dir / ".k3.npz.123.tmp").write_bytes(b"half")  # an unfinished atomic write is not a piece
    assert fresh.get("k3") is None
    fresh.clear()
    assert not (tmp_path / "r").exists()


def test_saved_hook_logs_each_piece(tmp_path, monkeypatch):
    log = tmp_path / "events.log"
    monkeypatch.setenv("DEME_RESUME_LOG", str(log))
    s = Shards(tmp_path / "r", "fp")
    s.put("a", {"x": np.zeros(1)})
    s.put("b", {"x": np.zeros(1)})
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[1].endswith("b.npz") and str(os.getpid()) in lines[0]


def test_state_digest_sees_every_weight():
    a, b = make_tiny_unet(seed=0), make_tiny_unet(seed=0)
    assert state_digest(a) == state_digest(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert state_digest(a) != state_digest(b)


def test_score_log_survives_a_line_cut_by_a_kill(tmp_path):
    log = ScoreLog(tmp_path / "scores.jsonl", "key")
    log.start()
    log.append((0.0, 1.0), 3.5)
    with open(log.path, "a") as f:
        f.write('{"w": [1.0, 0')  # the kill
    assert log.load() == {(0.0, 1.0): 3.5}
    log.start()  # the rerun drops the cut line, so its appends stay one per line
    log.append((1.0, 1.0), 2.5)
    assert log.load() == {(0.0, 1.0): 3.5, (1.0, 1.0): 2.5}
    assert ScoreLog(log.path, "other key").load() == {}


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def cfg():
    return config_from_mapping({"profile": "micro", "data": {"resolution": 8},
                                "sample": {"steps": 3, "eta": 0.0, "batch_size": 4, "num_samples": 18}})


def test_interrupted_evaluation_resumes_to_the_same_features(cfg, spaces, tmp_path, monkeypatch):
    import deme.sample as sample_mod
    from deme.evaluation import sample_features

    model = randomize_(make_tiny_unet(seed=3), seed=3)
    seeds = range(50, 68)  # 5 batches of 4, the last one of 2
    ref, ref_kept = sample_features(model, seeds, cfg, spaces, CPU, desc="t", keep=6)

    real = sample_mod.sample_batch
    monkeypatch.setattr(sample_mod, "sample_batch", interrupting(real, after=3))
    fingerprint = {"model": state_digest(model)}
    with pytest.raises(Interrupt):
        sample_features(model, seeds, cfg, spaces, CPU, desc="t", keep=6, shards=Shards(tmp_path, fingerprint))
    counted = interrupting(real, after=10**6)
    monkeypatch.setattr(sample_mod, "sample_batch", counted)
    shards = Shards(tmp_path, fingerprint)
    feats, kept = sample_features(model, seeds, cfg, spaces, CPU, desc="t", keep=6, shards=shards)
    assert counted.calls[0] == 2 and shards.reused == 3  # only the two unfinished batches were sampled
    assert shards.items == {"fresh": 6, "reused": 12} and shards.fresh_fraction() == pytest.approx(1 / 3)
    for m in spaces:
        assert np.array_equal(feats[m], ref[m])
    assert torch.equal(kept, ref_kept)


def test_interrupted_feature_pass_resumes(spaces, tmp_path, monkeypatch):
    import deme.evaluation as ev

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    ref = ev.array_features(images, spaces, 3, desc="r")
    monkeypatch.setattr(ev, "batch_features", interrupting(ev.batch_features, after=3))  # 2 spaces: 1.5 batches
    with pytest.raises(Interrupt):
        ev.array_features(images, spaces, 3, desc="r", shards=Shards(tmp_path, "fp"))
    monkeypatch.undo()
    shards = Shards(tmp_path, "fp")
    got = ev.array_features(images, spaces, 3, desc="r", shards=shards)
    assert shards.reused == 1 and all(np.array_equal(got[m], ref[m]) for m in spaces)


# ---------------------------------------------------------------------------------------------- analysis


def test_interrupted_gradient_similarity_resumes_bitwise(tmp_path, monkeypatch):
    import deme.analysis.gradsim as gs

    from deme.schedule import alphas_cumprod

    model = randomize_(make_tiny_unet(seed=1), seed=1)
    ab = alphas_cumprod(config_from_mapping({"profile": "micro"}).schedule).float()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = [0, 100, 300, 500, 700, 999]
    kw = dict(micro_batch=4, sketch_dim=32, seed=5, group=2)
    ref = gs.compute_gradsim(model, x0, noise, ts, ab, **kw)
    monkeypatch.setattr(gs, "timestep_gradient", interrupting(gs.timestep_gradient, after=5))
    with pytest.raises(Interrupt):
        gs.compute_gradsim(model, x0, noise, ts, ab, shards=Shards(tmp_path, "fp"), **kw)
    monkeypatch.undo()
    shards = Shards(tmp_path, "fp")
    got = gs.compute_gradsim(model, x0, noise, ts, ab, shards=shards, **kw)
    assert shards.reused == 2 and np.array_equal(got["S"], ref["S"])


def test_interrupted_loss_plane_resumes_bitwise(tmp_path):
    from deme.analysis.landscape import floating_state, loss_on_plane

    model = randomize_(make_tiny_unet(seed=2), seed=2)
    origin = floating_state(model)
    g = torch.Generator().manual_seed(0)
    d1 = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in origin.items()}
    d2 = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in origin.items()}
    x = torch.rand(2, 3, 8, 8)

    def loss_fn(m):
        with torch.no_grad():
            return float(m(x, torch.tensor([10, 10])).sample.square().mean())

    xs = [-1.0, 0.0, 1.0]
    ref = loss_on_plane(model, origin, d1, d2, xs, xs, loss_fn)
    with pytest.raises(Interrupt):
        loss_on_plane(model, origin, d1, d2, xs, xs, interrupting(loss_fn, after=4), shards=Shards(tmp_path, "fp"))
    assert all(torch.equal(v, origin[k]) for k, v in floating_state(model).items())  # weights restored
    shards = Shards(tmp_path, "fp")
    counted = interrupting(loss_fn, after=10**6)
    got = loss_on_plane(model, origin, d1, d2, xs, xs, counted, shards=shards)
    assert counted.calls[0] == 5 and shards.reused == 4 and np.array_equal(got, ref)


# ---------------------------------------------------------------------------------------------- MLflow


KILLED_STAGE = """
import os, signal
from deme.tracking import stage_run
with stage_run("evaluate", "micro", item="ensemble") as run:
    print(run.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_run_is_closed_and_linked_to_the_resumed_one(workdir):
    import mlflow

    from deme.tracking import stage_run

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_STAGE], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    killed_id = proc.stdout.split()[0]
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # not another test's global URI
    assert client.get_run(killed_id).info.status == "RUNNING"  # what MLflow shows until someone closes it
    with stage_run("evaluate", "micro", item="merged") as other:  # another stage: not a resume of it
        pass
    assert client.get_run(killed_id).info.status == "RUNNING"
    with stage_run("evaluate", "micro", item="ensemble") as run:
        pass
    old, new = client.get_run(killed_id), client.get_run(run.id)
    assert old.info.status == "KILLED" and old.data.tags["deme.resumed_by"] == run.id
    assert new.info.status == "FINISHED" and new.data.tags["deme.resumed_from"] == killed_id
    assert "deme.resumed_from" not in client.get_run(other.id).data.tags
    for key in ("host", "pid", "workdir"):
        assert key in new.data.tags


def test_merged_model_is_registered_per_profile(workdir):
    import mlflow

    from deme.tracking import stage_run

    folder = workdir / "merged"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    versions = []
    for _ in range(2):
        with stage_run("merge", "micro") as run:
            versions.append(run.register_model(folder, "micro-merged", tags={"weights": [0.5, 1.0]}))
    assert versions == ["1", "2"]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mv = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("micro-merged", "2")
    assert mv.tags["weights"] == "[0.5, 1.0]" and mv.run_id == run.id


# ---------------------------------------------------------------------------------------------- bad checkpoints


def test_truncated_training_checkpoint_is_one_clear_line(tmp_path):
    from deme.models import CheckpointError
    from deme.train import _load_checkpoint, _save_checkpoint

    model = make_tiny_unet()
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters())
    opt = torch.optim.AdamW(model.parameters())
    _save_checkpoint(tmp_path / "ck", 3, "fp", model, ema, opt)
    assert _load_checkpoint(tmp_path / "ck", "fp", make_tiny_unet(), EMAModel(model.parameters()),
                            torch.optim.AdamW(model.parameters())) == 3
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        _load_checkpoint(tmp_path / "ck", "fp", make_tiny_unet(), ema, opt)
    assert str(tmp_path / "ck") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "ck" / "state.json").write_text('{"step": 3, "fingerp')
    with pytest.raises(CheckpointError, match="corrupt"):
        _load_checkpoint(tmp_path / "ck", "fp", make_tiny_unet(), ema, opt)


def test_truncated_model_file_is_one_clear_line(tmp_path):
    from deme.models import CheckpointError, load_model

    model = make_tiny_unet()
    model.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m") is not None
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m")
    assert str(tmp_path / "m") in str(e.value) and "\n" not in str(e.value)
    json.loads((tmp_path / "m" / "config.json").read_text())  # the error touched nothing


# ---------------------------------------------------------------------------------------------- what a resume covers


@pytest.mark.parametrize("change", ["settings", "code", "threads", "kernels"])
def test_a_training_checkpoint_resumes_only_with_the_same_settings_and_code(tmp_path, monkeypatch, capsys, change):
    """The checkpoint records the settings' fingerprint, the digest of the stage's code closure
    (deme/codedeps.py) and the thread count; any one changed: the stage starts over and says why; none: it
    resumes."""
    from diffusers.training_utils import EMAModel

    from deme.train import _load_checkpoint, _save_checkpoint

    model = make_tiny_unet()
    parts = lambda: (make_tiny_unet(), EMAModel(model.parameters()), torch.optim.AdamW(model.parameters()))  # noqa: E731
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-a")
    _save_checkpoint(tmp_path / "ck", 3, "fp", model, EMAModel(model.parameters()), torch.optim.AdamW(model.parameters()))
    assert _load_checkpoint(tmp_path / "ck", "fp", *parts()) == 3
    if change == "code":
        monkeypatch.setattr("deme.codedeps.running", lambda: "code-b")
    threads = torch.get_num_threads()
    if change == "threads":
        torch.set_num_threads(threads + 1)
    if change == "kernels":
        monkeypatch.setattr("deme.numerics.cpu_kernels", lambda: "AVX512/another-CPU")
    try:
        assert _load_checkpoint(tmp_path / "ck", "fp2" if change == "settings" else "fp", *parts()) == 0
    finally:
        torch.set_num_threads(threads)
    assert WHY[change] in capsys.readouterr().out
    assert not (tmp_path / "ck").exists()


def test_shards_of_other_code_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-a")
    Shards(tmp_path / "r", {"a": 1}).put("k", {"x": np.arange(3)})
    assert Shards(tmp_path / "r", {"a": 1}).get("k") is not None
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-b")
    assert Shards(tmp_path / "r", {"a": 1}).get("k") is None


def test_shards_of_another_thread_count_are_not_reused(tmp_path):
    Shards(tmp_path / "r", {"a": 1}).put("k", {"x": np.arange(3)})
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert Shards(tmp_path / "r", {"a": 1}).get("k") is None
    finally:
        torch.set_num_threads(threads)
    assert Shards(tmp_path / "r", {"a": 1}).get("k") is None  # the other count's pieces replaced these


def test_the_running_stage_code_digest_is_its_import_closure(monkeypatch):
    from deme import codedeps

    codedeps.running.cache_clear()
    monkeypatch.setattr(sys, "argv", [str(codedeps.ROOT / "stages" / "merge.py")])
    try:
        assert codedeps.running() == codedeps.digest("python stages/merge.py") != ""
    finally:
        codedeps.running.cache_clear()
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert codedeps.running() == ""
    codedeps.running.cache_clear()


def test_scores_of_other_code_or_another_thread_count_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-a")
    log = ScoreLog(tmp_path / "scores.jsonl", "key")
    log.start()
    log.append((0.5,), 3.0)
    assert ScoreLog(log.path, "key").load() == {(0.5,): 3.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert ScoreLog(log.path, "key").load() == {}
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-b")
    assert ScoreLog(log.path, "key").load() == {}


def test_stats_id_sees_every_reference_number():
    from deme.metrics.fid import Stats
    from deme.resume import stats_id

    a = {"clean": Stats(np.zeros(3), np.eye(3), 10)}
    b = {"clean": Stats(np.zeros(3), np.eye(3) * (1 + 1e-12), 10)}
    assert stats_id(a) == stats_id({"clean": Stats(np.zeros(3), np.eye(3), 10)}) != stats_id(b)
    assert stats_id(None) is None


WHY = {"settings": "other settings or inputs", "code": "other code", "threads": "runtime.num_threads",
       "kernels": "runtime.cpu_kernels"}


def _changed(change, monkeypatch):
    """Apply one kind of change for the next resume record: its inputs (returned), code or thread count."""
    if change == "code":
        monkeypatch.setattr("deme.codedeps.running", lambda: "code-b")
    if change == "threads":
        torch.set_num_threads(torch.get_num_threads() + 1)
    if change == "kernels":
        monkeypatch.setattr("deme.numerics.cpu_kernels", lambda: "AVX512/another-CPU")
    return {"a": 2} if change == "settings" else {"a": 1}


@pytest.mark.parametrize("change", list(WHY))
def test_shards_of_another_record_start_over_and_say_why(tmp_path, monkeypatch, capsys, change):
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-a")
    Shards(tmp_path / "r", {"a": 1}).put("k", {"x": np.arange(3)})
    threads = torch.get_num_threads()
    try:
        again = Shards(tmp_path / "r", _changed(change, monkeypatch))
        assert again.get("k") is None
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "[resume]" in out and WHY[change] in out and "starting over" in out
    assert len(list((tmp_path / "r").iterdir())) == 1  # the stale pieces are gone


@pytest.mark.parametrize("change", list(WHY))
def test_a_score_log_of_another_record_starts_over_and_says_why(tmp_path, monkeypatch, capsys, change):
    monkeypatch.setattr("deme.codedeps.running", lambda: "code-a")
    log = ScoreLog(tmp_path / "scores.jsonl", json.dumps({"a": 1}))
    log.start()
    log.append((0.5,), 3.0)
    ScoreLog(log.path, json.dumps({"a": 1})).start()
    assert "[resume]" not in capsys.readouterr().out  # the same record: kept, nothing to say
    threads = torch.get_num_threads()
    try:
        again = ScoreLog(log.path, json.dumps(_changed(change, monkeypatch)))
        again.start()
        assert again.load() == {}
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "[resume]" in out and WHY[change] in out and "starting over" in out
