"""Training loop: teacher immutability, consistency term, NaN guard, resumable checkpoints, data order."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_tiny_unet, randomize_
from deme.config import ScheduleConfig, TrainConfig
from deme.objectives import EpsObjective
from deme.schedule import alphas_cumprod
from deme.train import BatchStream, NonFiniteLossError, to_model_range, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ab():
    return alphas_cumprod(ScheduleConfig()).float()


def _cfg(**kw):
    base = dict(iterations=5, batch_size=8, log_every=1, ckpt_every=0, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- objective

def test_consistency_term_is_zero_when_student_equals_teacher(ab, random_images):
    student = randomize_(make_tiny_unet(), seed=2)
    teacher = copy.deepcopy(student).requires_grad_(False)
    obj = EpsObjective(ab, 250, 500, p=0.3, teacher=teacher)
    x0 = to_model_range(random_images[:8])
    loss, terms = obj(student, x0, torch.Generator().manual_seed(0))
    assert float(terms["loss_consistency"]) == 0.0
    assert float(terms["loss_eps"]) > 0
    assert float(loss.detach()) == float(terms["loss_eps"])
    assert float(terms["loss"]) == float(loss.detach())
    assert loss.requires_grad


def test_consistency_term_weighted_and_positive_when_models_differ(ab, random_images):
    student = randomize_(make_tiny_unet(), seed=2)
    teacher = randomize_(make_tiny_unet(), seed=3).requires_grad_(False)
    x0 = to_model_range(random_images[:8])
    _, t1 = EpsObjective(ab, 0, 250, teacher=teacher, consistency_weight=1.0)(
        student, x0, torch.Generator().manual_seed(5))
    loss, t2 = EpsObjective(ab, 0, 250, teacher=teacher, consistency_weight=2.5)(
        student, x0, torch.Generator().manual_seed(5))
    assert float(t1["loss_consistency"]) > 0
    assert float(t1["loss_consistency"]) == pytest.approx(float(t2["loss_consistency"]), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(t2["loss_eps"]) + 2.5 * float(t2["loss_consistency"]), rel=1e-6)
    _, t3 = EpsObjective(ab, 0, 250, teacher=teacher, consistency_weight=0.0)(
        student, x0, torch.Generator().manual_seed(5))
    assert "loss_consistency" not in t3


class _Recorder(nn.Module):
    """Wraps a model and records the (x_t, t) it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), torch.as_tensor(t).clone()))
        return self.inner(x, t)


def test_teacher_sees_same_input_and_timesteps_as_student(ab, random_images):
    student = _Recorder(randomize_(make_tiny_unet(), seed=2))
    teacher = _Recorder(make_tiny_unet(seed=4).requires_grad_(False))
    obj = EpsObjective(ab, 750, 1000, p=0.0, teacher=teacher)
    obj(student, to_model_range(random_images[:8]), torch.Generator().manual_seed(1))
    (xs, ts), = student.calls
    (xt, tt), = teacher.calls
    assert torch.equal(xs, xt) and torch.equal(ts, tt)
    assert ((ts >= 750) & (ts < 1000)).all() and ts.shape == (8,)


def test_noisy_matches_forward_process(ab):
    obj = EpsObjective(ab)
    x0 = torch.full((2, 3, 4, 4), 0.5)
    noise = torch.ones_like(x0)
    t = torch.tensor([0, 999])
    xt = obj.noisy(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        a = float(ab[ti])
        assert torch.allclose(xt[i], torch.full_like(xt[i], a ** 0.5 * 0.5 + (1 - a) ** 0.5), atol=1e-6)


# ----------------------------------------------------------------------------------------- train loop

def test_teacher_is_unchanged_and_student_trains(ab, random_images):
    student = randomize_(make_tiny_unet(), seed=2, scale=0.05)
    teacher = copy.deepcopy(student).requires_grad_(False)
    teacher_before, student_before = _state(teacher), _state(student)
    logs = []
    obj = EpsObjective(ab, 0, 250, p=0.4, teacher=teacher)
    out = train(student, obj, random_images, _cfg(), seed=0, device=CPU,
                log=lambda m, s: logs.append((s, dict(m))))
    assert _states_equal(_state(teacher), teacher_before), "the frozen teacher was modified by training"
    assert all(not p.requires_grad for p in teacher.parameters())
    after = _state(out)
    changed = [k for k in after if not torch.equal(after[k], student_before[k])]
    assert len(changed) > len(after) // 2, "the student (EMA) weights did not change"
    assert [s for s, _ in logs] == [1, 2, 3, 4, 5]
    assert logs[0][1]["loss_consistency"] == 0.0  # student == teacher before the first update
    assert all(m["loss_consistency"] > 0 for _, m in logs[1:])
    for _, m in logs:
        assert m["loss"] == pytest.approx(m["loss_eps"] + m["loss_consistency"], rel=1e-5)
    assert not out.training  # returned in eval mode


def test_log_every_controls_log_steps(ab, random_images):
    logs = []
    train(make_tiny_unet(), EpsObjective(ab), random_images, _cfg(iterations=5, log_every=2), seed=0,
          device=CPU, log=lambda m, s: logs.append(s))
    assert logs == [2, 4, 5]  # every log_every steps, plus the last one


class _NaNAfter:
    """An objective that returns a NaN loss from its k-th call on."""

    def __init__(self, inner, k):
        self.inner, self.k, self.n = inner, k, 0

    def __call__(self, model, x0, gen):
        self.n += 1
        loss, terms = self.inner(model, x0, gen)
        if self.n >= self.k:
            loss = loss * float("nan")
            terms = {**terms, "loss": loss.detach()}
        return loss, terms


def test_nan_guard_names_step_and_loss(ab, random_images):
    obj = _NaNAfter(EpsObjective(ab), k=3)
    with pytest.raises(NonFiniteLossError) as e:
        train(make_tiny_unet(), obj, random_images, _cfg(iterations=5), seed=0, device=CPU, desc="pretrain")
    msg = str(e.value)
    assert "step 3" in msg
    assert "loss" in msg and "nan" in msg.lower()
    assert "pretrain" in msg
    assert isinstance(e.value, FloatingPointError)


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return SimpleNamespace(sample=x * self.w * float("nan"))


def test_nan_guard_on_model_output_at_first_step(ab, random_images):
    with pytest.raises(NonFiniteLossError, match=r"step 1\b.*loss"):
        train(_NaNModel(), EpsObjective(ab), random_images, _cfg(iterations=2), seed=0, device=CPU)


def test_nan_guard_points_to_last_checkpoint(ab, random_images, tmp_path):
    ckpt = tmp_path / "ckpt"
    obj = _NaNAfter(EpsObjective(ab), k=4)
    with pytest.raises(NonFiniteLossError) as e:
        train(make_tiny_unet(), obj, random_images, _cfg(iterations=6, ckpt_every=2), seed=0, device=CPU,
              ckpt_dir=ckpt, fingerprint="fp")
    assert "step 4" in str(e.value) and str(ckpt) in str(e.value)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2


class _Snapshot:
    """Wraps an objective; records the model's parameters at every call (theta before that step's update)."""

    def __init__(self, inner):
        self.inner, self.params = inner, []

    def __call__(self, model, x0, gen):
        self.params.append([p.detach().clone() for p in model.parameters()])
        return self.inner(model, x0, gen)


def test_returned_model_is_the_ema_with_warmup(ab, random_images):
    """EMA with warm-up (docs/paper.md §1.6): decay at optimizer step s is min(max, 1 - s^-power) with
    decay 0 at s = 1 (diffusers' EMAModel counts from 0 after the first update)."""
    init = make_tiny_unet(seed=6)
    n = 4
    cfg = _cfg(iterations=n + 1, ema_max_decay=0.5, ema_power=0.75)
    snap = _Snapshot(EpsObjective(ab))
    decays = {}
    train(copy.deepcopy(init), snap, random_images, cfg, seed=3, device=CPU,
          log=lambda m, s: decays.__setitem__(s, m["ema_decay"]))
    thetas = snap.params[1:]  # theta_1 .. theta_n (weights after steps 1..n)
    out = train(copy.deepcopy(init), EpsObjective(ab), random_images, _cfg(iterations=n, ema_max_decay=0.5),
                seed=3, device=CPU)
    expected_decay = {1: 0.0}
    expected_decay.update({s: min(0.5, 1 - s ** -0.75) for s in range(2, n + 2)})
    for s in range(1, n + 2):
        assert decays[s] == pytest.approx(expected_decay[s], abs=1e-12)
    assert expected_decay[2] < 0.5 and expected_decay[4] == 0.5  # warm-up, then the cap
    shadow = [p.clone() for p in thetas[0]]  # decay 0 at step 1: the EMA starts at theta_1
    for s in range(2, n + 1):
        d = expected_decay[s]
        shadow = [sh - (1 - d) * (sh - th) for sh, th in zip(shadow, thetas[s - 1])]
    for got, exp, last in zip(out.parameters(), shadow, thetas[-1]):
        assert torch.allclose(got.detach(), exp, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(g.detach(), l) for g, l in zip(out.parameters(), thetas[-1])), \
        "the returned weights are the raw weights, not the EMA"


# ----------------------------------------------------------------------------------------- resume

class _Crash(Exception):
    pass


def _crash_at(step, seen):
    def log(metrics, s):
        seen.append(s)
        if s == step:
            raise _Crash(f"simulated crash at {s}")
    return log


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_crash_and_resume_equals_uninterrupted_run(ab, random_images, tmp_path, grad_accum):
    init = randomize_(make_tiny_unet(), seed=5, scale=0.05)
    teacher = copy.deepcopy(init).requires_grad_(False)

    def objective():
        return EpsObjective(ab, 250, 500, p=0.4, teacher=teacher)

    cfg = _cfg(iterations=6, ckpt_every=3, log_every=1, grad_accum=grad_accum)
    ref_logs = []
    ref = train(copy.deepcopy(init), objective(), random_images, cfg, seed=11, device=CPU,
                ckpt_dir=tmp_path / "ref", fingerprint="fp", log=lambda m, s: ref_logs.append((s, m["loss"])))
    ref_state = _state(ref)
    # no checkpoint is written at the final step; the one from step 3 is kept
    assert json.loads((tmp_path / "ref" / "state.json").read_text())["step"] == 3

    seen = []
    with pytest.raises(_Crash):
        train(copy.deepcopy(init), objective(), random_images, cfg, seed=11, device=CPU,
              ckpt_dir=tmp_path / "run", fingerprint="fp", log=_crash_at(4, seen))
    assert seen == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 3

    resumed_logs = []
    resumed = train(copy.deepcopy(init), objective(), random_images, cfg, seed=11, device=CPU,
                    ckpt_dir=tmp_path / "run", fingerprint="fp",
                    log=lambda m, s: resumed_logs.append((s, m["loss"])))
    # steps 1-3 are replayed from the checkpoint (the resumed run's curve is complete), 4-6 are trained again
    assert [s for s, _ in resumed_logs] == [1, 2, 3, 4, 5, 6], "the run did not resume at step 3"
    assert resumed_logs == ref_logs, "losses after resuming differ from the uninterrupted run"
    res_state = _state(resumed)
    diff = [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])]
    assert not diff, f"EMA weights differ after resume, e.g. {diff[:3]}"


def test_checkpoint_with_other_fingerprint_is_discarded(ab, random_images, tmp_path):
    cfg = _cfg(iterations=4, ckpt_every=2)
    with pytest.raises(_Crash):
        train(make_tiny_unet(), EpsObjective(ab), random_images, cfg, seed=0, device=CPU,
              ckpt_dir=tmp_path / "c", fingerprint="A", log=_crash_at(3, []))
    assert (tmp_path / "c" / "state.json").exists()
    seen = []
    train(make_tiny_unet(), EpsObjective(ab), random_images, cfg, seed=0, device=CPU,
          ckpt_dir=tmp_path / "c", fingerprint="B", log=lambda m, s: seen.append(s))
    assert seen == [1, 2, 3, 4]
    assert json.loads((tmp_path / "c" / "state.json").read_text())["fingerprint"] == "B"


def test_ckpt_every_zero_writes_nothing(ab, random_images, tmp_path):
    train(make_tiny_unet(), EpsObjective(ab), random_images, _cfg(iterations=3, ckpt_every=0), seed=0,
          device=CPU, ckpt_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_same_seed_same_result_other_seed_differs(ab, random_images):
    init = make_tiny_unet(seed=3)
    cfg = _cfg(iterations=2, log_every=10)
    a = _state(train(copy.deepcopy(init), EpsObjective(ab), random_images, cfg, seed=1, device=CPU))
    b = _state(train(copy.deepcopy(init), EpsObjective(ab), random_images, cfg, seed=1, device=CPU))
    c = _state(train(copy.deepcopy(init), EpsObjective(ab), random_images, cfg, seed=2, device=CPU))
    assert _states_equal(a, b)
    assert not _states_equal(a, c)


# ----------------------------------------------------------------------------------------- data order

def _ids(batch: torch.Tensor) -> list[int]:
    """Recover image ids from images whose pixels all equal their id (see _id_images)."""
    return [int(round((float(b[0, 0, 0]) + 1) * 127.5)) for b in batch]


def _id_images(n, size=2):
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, size, size, 3).contiguous()


def test_to_model_range():
    img = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    x = to_model_range(img)
    assert x.shape == (1, 3, 1, 3) and x.dtype == torch.float32
    assert x[0, 0, 0].tolist() == [-1.0, 1.0, float(torch.tensor(128.0) / 127.5 - 1)]
    assert x[0, 0, 0, 2].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)


def test_batch_stream_deterministic_per_seed_and_step():
    imgs = _id_images(20)
    a, b = BatchStream(imgs, 4, seed=3), BatchStream(imgs, 4, seed=3)
    assert torch.equal(a(7), b(7))
    assert torch.equal(a(2), BatchStream(imgs, 4, seed=3)(2))
    assert _ids(a(0)) != _ids(a(1))
    assert _ids(a(0)) != _ids(BatchStream(imgs, 4, seed=4)(0))
    # random access out of order gives the same batches as sequential access
    seq = [_ids(BatchStream(imgs, 4, seed=3)(m)) for m in range(12)]
    c = BatchStream(imgs, 4, seed=3)
    assert [_ids(c(m)) for m in (11, 0, 6, 5, 1, 10, 2, 3, 4, 7, 8, 9)] == [seq[m] for m in
                                                                           (11, 0, 6, 5, 1, 10, 2, 3, 4, 7, 8, 9)]


@pytest.mark.parametrize("n, bs", [(20, 4), (22, 4), (9, 9)])
def test_batch_stream_epochs_are_permutations(n, bs):
    s = BatchStream(_id_images(n), bs, seed=0)
    per_epoch = n // bs
    assert s.per_epoch == per_epoch
    epochs = []
    for e in range(3):
        ids = sum((_ids(s(e * per_epoch + k)) for k in range(per_epoch)), [])
        assert len(ids) == per_epoch * bs
        assert len(set(ids)) == len(ids), "an image repeats within an epoch"
        assert set(ids) <= set(range(n))
        if n % bs == 0:
            assert sorted(ids) == list(range(n))
        epochs.append(ids)
    if n > 1 and per_epoch * bs > 1:
        assert epochs[0] != epochs[1], "every epoch uses the same order"


def test_batch_stream_rejects_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="exceeds"):
        BatchStream(_id_images(4), 8, seed=0)


# ----------------------------------------------------------------------------------------- LR schedule

def test_lr_factor_constant_cosine_and_warmup():
    from deme.train import lr_factor

    assert [lr_factor(s, "constant", 0, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, "cosine", 0, 100) == 1.0
    assert lr_factor(50, "cosine", 0, 100) == pytest.approx(0.5)
    assert lr_factor(100, "cosine", 0, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(s, "cosine", 0, 100) >= lr_factor(s + 1, "cosine", 0, 100) for s in range(100))
    assert lr_factor(0, "cosine", 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, "cosine", 10, 100) == pytest.approx(1.0)
    # rsqrt: 1/sqrt(step / warmup) after the warm-up, whatever the run length
    assert lr_factor(40, "rsqrt", 10, 100) == pytest.approx(0.5)
    assert lr_factor(40, "rsqrt", 10, 100) == lr_factor(40, "rsqrt", 10, 10_000)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_factor_is_diffusers_get_scheduler_with_the_warmup_one_step_ahead(schedule):
    """The same schedules as diffusers' get_scheduler: equal after the warm-up; during it this one is one step
    ahead ((step + 1) / warmup against step / warmup), so its first step does not run at LR 0."""
    from diffusers.optimization import get_scheduler

    from deme.train import lr_factor

    warmup, iterations = 10, 100
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[schedule]
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=iterations).lr_lambdas[0]
    assert [lr_factor(s, schedule, warmup, iterations) for s in range(warmup, iterations + 1)] == \
        pytest.approx([ref(s) for s in range(warmup, iterations + 1)], abs=1e-12)
    assert [lr_factor(s, schedule, warmup, iterations) for s in range(warmup - 1)] == \
        pytest.approx([ref(s + 1) for s in range(warmup - 1)], abs=1e-12)


def test_cosine_schedule_resume_equals_uninterrupted(ab, random_images, tmp_path):
    cfg = _cfg(iterations=6, ckpt_every=2, lr_schedule="cosine")
    ref = train(randomize_(make_tiny_unet(), seed=1), EpsObjective(ab, 0, 1000), random_images, cfg, seed=3,
                device=CPU, desc="ref")

    class Crash(RuntimeError):
        pass

    def crash_at_5(metrics, step):
        if step == 5:
            raise Crash

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        train(randomize_(make_tiny_unet(), seed=1), EpsObjective(ab, 0, 1000), random_images, cfg, seed=3,
              device=CPU, ckpt_dir=ckpt, fingerprint="f", log=crash_at_5, desc="crash")
    resumed = train(randomize_(make_tiny_unet(), seed=1), EpsObjective(ab, 0, 1000), random_images, cfg, seed=3,
                    device=CPU, ckpt_dir=ckpt, fingerprint="f", desc="resume")
    assert _states_equal(_state(ref), _state(resumed))


# ----------------------------------------------------------------------------------------- FID curve hook

def test_evaluate_hook_sees_the_ema_weights_and_leaves_training_untouched(ab, random_images):
    """train(evaluate=...) is called every eval_every steps with the EMA weights (docs/paper.md §1.6 FID curves),
    its metrics are logged at that step, and the run ends with exactly the weights of a run without it."""
    init = make_tiny_unet(seed=8)
    cfg = _cfg(iterations=6, eval_every=2, log_every=3, ema_max_decay=0.9)
    seen, logged = [], {}

    def evaluate(model, step):
        assert not model.training
        seen.append((step, _state(model)))
        return {"proxy_fid": float(step)}

    with_hook = train(copy.deepcopy(init), EpsObjective(ab), random_images, cfg, seed=4, device=CPU,
                      evaluate=evaluate, log=lambda m, s: logged.setdefault(s, {}).update(m))
    plain = train(copy.deepcopy(init), EpsObjective(ab), random_images, cfg, seed=4, device=CPU)
    assert [s for s, _ in seen] == [2, 4, 6]
    assert {s: m["proxy_fid"] for s, m in logged.items() if "proxy_fid" in m} == {2: 2.0, 4: 4.0, 6: 6.0}
    assert "loss" in logged[3] and "loss" in logged[6]
    assert _states_equal(_state(with_hook), _state(plain)), "evaluating changed the training run"
    # at the last step the hook saw the EMA weights, which are what train() returns
    assert _states_equal(seen[-1][1], _state(plain))
    # and those differ from the raw weights of that step (the EMA is not the live model)
    raw = train(copy.deepcopy(init), EpsObjective(ab), random_images,
                _cfg(iterations=6, ema_max_decay=0.0, ema_power=100.0), seed=4, device=CPU)
    assert not _states_equal(seen[-1][1], _state(raw))


def test_resumed_curve_equals_the_uninterrupted_one_when_a_log_window_spans_the_checkpoint(ab, random_images,
                                                                                           tmp_path):
    """log_every=2, ckpt_every=3: the step-4 point averages steps 3 and 4, and the checkpoint lies between
    them. The resumed run replays steps 2 (logged before the kill) and keeps step 3's loss terms, so its
    whole curve equals the uninterrupted one."""
    init = randomize_(make_tiny_unet(), seed=6, scale=0.05)
    cfg = _cfg(iterations=6, ckpt_every=3, log_every=2)
    ref = []
    train(copy.deepcopy(init), EpsObjective(ab, p=0.3), random_images, cfg, seed=2, device=CPU,
          ckpt_dir=tmp_path / "ref", fingerprint="fp",
          log=lambda m, s: ref.append((s, {k: v for k, v in m.items() if k != "images_per_s"})))
    seen = []
    with pytest.raises(_Crash):
        train(copy.deepcopy(init), EpsObjective(ab, p=0.3), random_images, cfg, seed=2, device=CPU,
              ckpt_dir=tmp_path / "run", fingerprint="fp", log=_crash_at(4, seen))
    assert seen == [2, 4]
    resumed = []
    train(copy.deepcopy(init), EpsObjective(ab, p=0.3), random_images, cfg, seed=2, device=CPU,
          ckpt_dir=tmp_path / "run", fingerprint="fp",
          log=lambda m, s: resumed.append((s, {k: v for k, v in m.items() if k != "images_per_s"})))
    assert [s for s, _ in resumed] == [2, 4, 6] and resumed == ref
