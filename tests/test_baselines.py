"""Baselines of docs/paper.md §2.2 and §6.2-6.3: the Nash-bargaining solver, ANT-UW / ANT-NashMTL, Diff-Tuning,
and every baseline objective through the training loop (smoke runs, resume)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import Recorder, make_tiny_unet, randomize_
from deme.config import BaselinesConfig, ScheduleConfig, TrainConfig
from deme.objectives import ANTObjective, DiffTuningObjective, EpsObjective, nash_weights
from deme.objectives.difftuning import retention_weight
from deme.schedule import alphas_cumprod
from deme.train import to_model_range, train
from deme.weighting import epsilon_weights

CPU = torch.device("cpu")
T = 1000


@pytest.fixture(scope="module")
def ab():
    return alphas_cumprod(ScheduleConfig()).float()


@pytest.fixture(scope="module")
def x0():
    g = torch.Generator().manual_seed(7)
    return to_model_range(torch.randint(0, 256, (20, 8, 8, 3), generator=g, dtype=torch.uint8))


def _model(seed=2, scale=0.05):
    return randomize_(make_tiny_unet(), seed=seed, scale=scale)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _nash_residual(G, a):
    """max_j |alpha_j (G alpha)_j - 1|: the relative residual of G alpha = 1/alpha."""
    return float(np.max(np.abs(a * (G @ a) - 1.0)))


# ----------------------------------------------------------------------------------------- nash solver

def test_nash_orthogonal_unit_gradients_give_equal_unit_weights():
    for k in (2, 3, 5):
        a = nash_weights(np.eye(k))
        assert a.shape == (k,)
        np.testing.assert_allclose(a, np.ones(k), rtol=1e-6)
    # scaled identity: alpha = 1/sqrt(c)
    np.testing.assert_allclose(nash_weights(4.0 * np.eye(3)), np.full(3, 0.5), rtol=1e-6)
    # orthogonal gradients of different norms: alpha_j = 1/||g_j|| (each task's weighted gradient has norm 1)
    norms = np.array([0.5, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(nash_weights(np.diag(norms ** 2)), 1 / norms, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_nash_random_spd_solves_the_bargaining_system(k):
    rng = np.random.default_rng(k)
    for _ in range(4):
        g = rng.normal(size=(k, k + 3)) * rng.uniform(0.1, 3.0, size=(k, 1))  # unequal gradient norms
        G = g @ g.T
        G = G / np.linalg.norm(G)  # normalised as in ANTObjective
        a = nash_weights(G)
        assert np.all(np.isfinite(a)) and np.all(a > 0)
        np.testing.assert_allclose(G @ a, 1.0 / a, rtol=1e-6)
        # scaling G by c scales the solution by 1/sqrt(c)
        np.testing.assert_allclose(nash_weights(9.0 * G), a / 3.0, rtol=1e-6)


def test_nash_warm_start_converges_to_the_same_solution():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 9))
    G = g @ g.T / np.linalg.norm(g @ g.T)
    cold = nash_weights(G)
    for start in (cold, cold * 1.3, np.full(5, 100.0), np.full(5, 1e-3), np.array([1.0, -1.0, 0.0, 2.0, 0.5])):
        warm = nash_weights(G, np.asarray(start, dtype=np.float64))
        np.testing.assert_allclose(warm, cold, rtol=1e-6)
    # from the solution itself, nothing moves
    np.testing.assert_allclose(nash_weights(G, cold), cold, rtol=1e-12)
    # the warm start is not modified in place
    start = cold * 2.0
    before = start.copy()
    nash_weights(G, start)
    assert np.array_equal(start, before)


def test_nash_nearly_singular_gram_gives_finite_positive_weights():
    # two identical gradients: G is singular; the solution still exists and is unique
    G = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a = nash_weights(G)
    assert np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(a, [2 ** -0.5, 2 ** -0.5, 1.0], rtol=1e-6)
    # parallel (not identical) gradients of different lengths, plus a tiny one
    g = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1e-3]])
    G = g @ g.T / np.linalg.norm(g @ g.T)
    a = nash_weights(G)
    assert np.all(np.isfinite(a)) and np.all(a > 0)
    assert a[3] > a[2] > 0  # the tiny gradient gets the largest weight
    assert _nash_residual(G, a) < 1e-3


# ----------------------------------------------------------------------------------------- ANT tasks

def test_ant_task_split_even_batch(ab):
    obj = ANTObjective(ab, num_tasks=5)
    for seed in range(5):
        t, task = obj.task_timesteps(20, torch.Generator().manual_seed(seed))
        assert t.shape == (20,) and task.shape == (20,)
        assert t.dtype == torch.long
        counts = torch.bincount(t // 200, minlength=5)
        assert counts.tolist() == [4] * 5
        assert torch.bincount(task, minlength=5).tolist() == [4] * 5
        assert torch.equal(t // 200, task), "a task's timesteps are outside its interval [200j, 200j+200)"
        assert int(t.min()) >= 0 and int(t.max()) < T


def test_ant_task_timesteps_cover_each_interval_uniformly(ab):
    obj = ANTObjective(ab, num_tasks=4)
    g = torch.Generator().manual_seed(0)
    ts = torch.cat([obj.task_timesteps(40, g)[0] for _ in range(250)])  # 2,500 draws per interval
    for j in range(4):
        tj = ts[(ts >= 250 * j) & (ts < 250 * (j + 1))] - 250 * j
        assert len(tj) == 2500
        assert int(tj.min()) == 0 and int(tj.max()) == 249, "the interval ends are never drawn"
        assert float(tj.double().mean()) == pytest.approx(124.5, abs=4 * 72.2 / 2500 ** 0.5)
    # consecutive calls use fresh randomness
    a = obj.task_timesteps(40, torch.Generator().manual_seed(1))[0]
    b = obj.task_timesteps(40, torch.Generator().manual_seed(2))[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("batch", [23, 7, 11, 5, 99])
def test_ant_task_split_uneven_batch(ab, batch):
    K = 5
    t, task = ANTObjective(ab, num_tasks=K).task_timesteps(batch, torch.Generator().manual_seed(0))
    counts = torch.bincount(task, minlength=K).tolist()
    assert sum(counts) == batch
    assert all(c in (batch // K, -(-batch // K)) for c in counts), counts
    assert torch.equal(t // (T // K), task)


def test_ant_constructor_errors(ab):
    with pytest.raises(ValueError, match="pcgrad"):
        ANTObjective(ab, mode="pcgrad")
    with pytest.raises(ValueError, match="divide"):
        ANTObjective(ab, num_tasks=3)


def test_ant_batch_smaller_than_num_tasks_is_rejected(ab, x0):
    obj = ANTObjective(ab, num_tasks=5, mode="uw")
    try:
        loss, _ = obj(_model(), x0[:3], torch.Generator().manual_seed(0))
    except ValueError:  # a clear error at the first step is one acceptable fix
        return
    assert torch.isfinite(loss), "a batch of 3 for 5 tasks produced a non-finite loss"


# ----------------------------------------------------------------------------------------- ANT losses

def _ant_replay(obj, model, x0, seed):
    """Run ``obj`` once with a recorder; recompute the per-task losses L_j from the same draws.

    Returns (loss, terms, L [K] float64 detached, task per sample). The noise is replayed from a generator
    seeded identically (task_timesteps, then randn) and checked against the x_t the model saw.
    """
    rec = Recorder(model)
    loss, terms = obj(rec, x0, torch.Generator().manual_seed(seed))
    (xt, t, pred), = rec.calls
    g = torch.Generator().manual_seed(seed)
    t_ref, _ = obj.task_timesteps(x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_ref)
    a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=0, atol=1e-6)
    task = t // (T // obj.num_tasks)  # independent of the objective's own task labels
    per_sample = (pred.double() - noise.double()).pow(2).flatten(1).mean(1)
    L = torch.stack([per_sample[task == j].mean() for j in range(obj.num_tasks)])
    return loss, terms, L, task


def test_uw_loss_and_gradient(ab, x0):
    K = 5
    obj = ANTObjective(ab, num_tasks=K, mode="uw")
    s = torch.tensor([-0.5, 0.2, 0.0, 0.7, -1.0])
    with torch.no_grad():
        obj.log_vars.copy_(s)
    model = _model()
    loss, terms, L, _ = _ant_replay(obj, model, x0, seed=3)
    s64 = s.double()
    expected = (0.5 * (torch.exp(-s64) * L / K + s64)).sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["loss"]) == float(loss.detach())
    for j in range(K):
        assert float(terms[f"uw_s{j + 1}"]) == pytest.approx(float(s[j]))
    # the unweighted MSE is logged as loss_eps
    assert float(terms["loss_eps"]) == pytest.approx(float(L.mean()), rel=1e-5)  # 4 samples per task
    loss.backward()
    expected_grad = 0.5 * (1 - torch.exp(-s64) * L / K)
    torch.testing.assert_close(obj.log_vars.grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.parameters())


def test_uw_gradient_matches_finite_differences(ab, x0):
    """Independent of any replay: central differences of the loss in s_j (same generator seed)."""
    K = 5
    model = _model(seed=4)
    obj = ANTObjective(ab, num_tasks=K, mode="uw").double()
    s0 = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5], dtype=torch.float64)

    def loss_at(s):
        with torch.no_grad():
            obj.log_vars.copy_(s)
        obj.log_vars.grad = None
        loss, _ = obj(model, x0, torch.Generator().manual_seed(9))
        return loss

    loss = loss_at(s0)
    loss.backward()
    grad = obj.log_vars.grad.clone()
    h = 1e-3
    for j in range(K):
        e = torch.zeros(K, dtype=torch.float64)
        e[j] = h
        fd = (float(loss_at(s0 + e).detach()) - float(loss_at(s0 - e).detach())) / (2 * h)
        assert float(grad[j]) == pytest.approx(fd, rel=1e-3, abs=1e-6)
    # the analytic form 0.5 (1 - exp(-s_j) L_j / K) is the same gradient
    assert torch.all(grad < 0.5)


def test_param_groups(ab):
    uw = ANTObjective(ab, mode="uw")
    groups = uw.param_groups()
    assert len(groups) == 1
    (params,) = [g["params"] for g in groups]
    assert len(params) == 1 and params[0] is uw.log_vars
    assert groups[0]["lr"] == 0.025 and groups[0]["weight_decay"] == 0.0
    assert ANTObjective(ab, mode="uw", uw_lr=0.1).param_groups()[0]["lr"] == 0.1
    assert ANTObjective(ab, mode="nash").param_groups() == []
    assert torch.equal(uw.log_vars.detach(), torch.zeros(5))  # s_j initialised to 0
    assert BaselinesConfig().ant_uw.uw_lr == 0.025 and BaselinesConfig().ant_nash.update_every == 25


def test_nash_alpha_update_schedule_and_solution(ab, x0):
    K = 5
    obj = ANTObjective(ab, num_tasks=K, mode="nash", update_every=2)
    assert torch.equal(obj.alpha, torch.ones(K)) and obj.calls == 0
    model = _model(seed=5, scale=0.1)
    alphas = [obj.alpha.clone()]
    for call in range(5):
        assert obj.calls == call
        loss, terms, L, task = _ant_replay(obj, model, x0, seed=100 + call)
        assert obj.calls == call + 1
        alpha = obj.alpha.clone()
        changed = not torch.equal(alpha, alphas[-1])
        assert changed == (call % 2 == 0), f"call {call}: alpha {'changed' if changed else 'did not change'}"
        alphas.append(alpha)
        # the loss uses the current alpha: sum_j alpha_j L_j / K
        assert float(loss.detach()) == pytest.approx(float((alpha.double() * L).sum() / K), rel=1e-5)
        for j in range(K):
            assert float(terms[f"nash_alpha{j + 1}"]) == float(alpha[j])
        if call % 2 == 0:
            # alpha solves G alpha = 1/alpha for the Frobenius-normalised Gram matrix of the task gradients
            params = [p for p in model.parameters() if p.requires_grad]
            g = torch.Generator().manual_seed(100 + call)
            t, _ = obj.task_timesteps(x0.shape[0], g)
            noise = torch.randn(x0.shape, generator=g)
            a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
            pred = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
            per_sample = (pred - noise).pow(2).flatten(1).mean(1)
            grads = []
            for j in range(K):
                gj = torch.autograd.grad(per_sample[(t // 200) == j].mean(), params, retain_graph=True,
                                         allow_unused=True)
                grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().double()
                                        for x, p in zip(gj, params)]))
            gm = torch.stack(grads)
            G = (gm @ gm.T).numpy()
            G = G / np.linalg.norm(G)
            an = alpha.double().numpy()
            assert np.all(an > 0)
            assert _nash_residual(G, an) < 1e-4
    assert all(torch.all(a > 0) for a in alphas)


def test_nash_update_every_one_updates_every_call(ab, x0):
    obj = ANTObjective(ab, num_tasks=5, mode="nash", update_every=1)
    model = _model(seed=6)
    prev = obj.alpha.clone()
    for call in range(3):
        obj(model, x0, torch.Generator().manual_seed(call))
        assert not torch.equal(obj.alpha, prev)
        prev = obj.alpha.clone()


def test_extra_state_round_trip(ab):
    a = ANTObjective(ab, num_tasks=5, mode="nash", update_every=3)
    with torch.no_grad():
        a.alpha.copy_(torch.tensor([0.3, 1.7, 0.123456789, 2.5, 0.9]))
        a.log_vars.copy_(torch.tensor([-0.25, 0.125, 0.333333, 0.0, -1.5]))
    a.calls = 7
    state = json.loads(json.dumps(a.extra_state()))  # as written to state.json
    b = ANTObjective(ab, num_tasks=5, mode="nash", update_every=3)
    param = b.log_vars
    b.load_extra_state(state)
    assert torch.equal(b.alpha, a.alpha)
    assert torch.equal(b.log_vars.detach(), a.log_vars.detach())
    assert b.calls == 7
    assert b.log_vars is param and b.log_vars.requires_grad  # the optimizer's tensor is updated in place
    assert b.alpha.dtype == torch.float32


# ----------------------------------------------------------------------------------------- Diff-Tuning

def test_retention_weight():
    t = torch.arange(T)
    xi = retention_weight(t, T)
    assert xi.dtype == torch.float64
    torch.testing.assert_close(xi, 1 - t.double() / T, rtol=0, atol=1e-15)
    assert float(xi[0]) == 1.0 and float(xi[999]) == pytest.approx(0.001)
    assert float(xi[500]) == 0.5
    assert torch.all(xi[1:] < xi[:-1]), "the retention weight must decrease with t (docs/paper.md §6.2)"
    assert torch.all((xi > 0) & (xi <= 1))


def _buffer(n=6, size=2):
    """Distinct constant buffer images with values in (0, 1]; target images are -1."""
    vals = torch.arange(1, n + 1, dtype=torch.float32) / n
    return vals.view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()


def test_difftuning_buffer_fraction_follows_retention_weight(ab):
    buf = _buffer()
    obj = DiffTuningObjective(ab, variant="buffer", buffer=buf)
    target = torch.full((1000, 3, 2, 2), -1.0)
    g = torch.Generator().manual_seed(0)
    ts, masks = [], []
    for _ in range(20):  # 20,000 slots
        t, x, mask = obj.draw(target, g)
        assert t.shape == (1000,) and mask.dtype == torch.bool
        from_buffer = x.flatten(1).mean(1) > 0
        assert torch.equal(from_buffer, mask), "the mask does not mark the slots holding buffer images"
        assert torch.all(x[~mask] == -1.0)
        # every buffer slot holds one whole buffer image
        vals = x[mask][:, 0, 0, 0]
        assert torch.all(x[mask] == vals.view(-1, 1, 1, 1))
        assert set(torch.round(vals * 6).long().tolist()) <= set(range(1, 7))
        ts.append(t)
        masks.append(mask)
    assert torch.all(target == -1.0), "draw modified the target batch in place"
    t, mask = torch.cat(ts), torch.cat(masks)
    xi = retention_weight(torch.arange(T), T)
    for b in range(10):
        in_bin = (t >= 100 * b) & (t < 100 * (b + 1))
        n = int(in_bin.sum())
        frac = float(mask[in_bin].double().mean())
        p = float(xi[100 * b:100 * (b + 1)].mean())
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(frac - p) < 4 * sigma, f"bin {b}: buffer fraction {frac:.3f}, expected {p:.3f}"
    overall = float(mask.double().mean())
    assert abs(overall - 0.5005) < 4 * (0.25 / len(mask)) ** 0.5
    # t itself is uniform over 0..T-1
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert float(t.double().mean()) == pytest.approx(499.5, abs=4 * 288.7 / len(t) ** 0.5)
    # all buffer images get used
    vals = torch.cat([torch.round(obj.draw(target, torch.Generator().manual_seed(1))[1][:, 0, 0, 0] * 6)])
    assert set(vals[vals > 0].long().tolist()) == set(range(1, 7))


def test_difftuning_buffer_forward_trains_on_drawn_batch(ab, x0):
    buf = _buffer(size=8)
    obj = DiffTuningObjective(ab, variant="buffer", buffer=buf)
    rec = Recorder(_model())
    loss, terms = obj(rec, x0, torch.Generator().manual_seed(2))
    (xt, t, pred), = rec.calls
    g = torch.Generator().manual_seed(2)
    t_ref, xb, mask = obj.draw(x0, g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_ref)
    assert 0 < int(mask.sum()) < len(mask)
    a = ab[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * xb + (1 - a).sqrt() * noise, rtol=0, atol=1e-6)
    assert float(loss.detach()) == pytest.approx(float(F.mse_loss(pred, noise)), rel=1e-6)
    assert float(terms["loss_eps"]) == float(loss.detach())
    assert float(terms["buffer_fraction"]) == pytest.approx(float(mask.float().mean()))
    assert "loss_kd" not in terms


def test_difftuning_kd_never_uses_the_buffer(ab):
    teacher = _model(seed=3).requires_grad_(False)
    obj = DiffTuningObjective(ab, variant="kd", teacher=teacher, buffer=_buffer())
    target = torch.full((500, 3, 2, 2), -1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        t, x, mask = obj.draw(target, g)
        assert not mask.any()
        assert torch.equal(x, target)
        assert int(t.min()) >= 0 and int(t.max()) < T


def test_difftuning_kd_term(ab, x0):
    student = Recorder(_model(seed=2))
    teacher = Recorder(_model(seed=3).requires_grad_(False))
    obj = DiffTuningObjective(ab, variant="kd", teacher=teacher, kd_weight=0.05)
    loss, terms = obj(student, x0, torch.Generator().manual_seed(4))
    (xs, ts, ps), = student.calls
    (xt, tt, pt), = teacher.calls
    assert torch.equal(xs, xt) and torch.equal(ts, tt), "the teacher must see the student's x_t and t"
    xi = 1 - ts.double() / T
    kd = (xi * (ps.double() - pt.double()).pow(2).flatten(1).mean(1)).mean()
    assert float(kd) > 0
    assert float(terms["loss_kd"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(terms["loss_eps"]) + 0.05 * float(kd), rel=1e-6)
    assert float(terms["buffer_fraction"]) == 0.0
    # kd_weight scales the term
    loss2, terms2 = DiffTuningObjective(ab, variant="kd", teacher=teacher, kd_weight=1.0)(
        student, x0, torch.Generator().manual_seed(4))
    assert float(loss2.detach()) == pytest.approx(float(terms2["loss_eps"]) + float(kd), rel=1e-6)
    # no gradient flows into the teacher
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_difftuning_kd_with_identical_teacher_is_plain_loss(ab, x0):
    student = _model(seed=2)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss, terms = DiffTuningObjective(ab, variant="kd", teacher=teacher)(
        student, x0, torch.Generator().manual_seed(0))
    assert float(terms["loss_kd"]) == 0.0
    assert float(loss.detach()) == float(terms["loss_eps"])


def test_difftuning_constructor_errors(ab):
    with pytest.raises(ValueError, match="buffer"):
        DiffTuningObjective(ab, variant="buffer")
    with pytest.raises(ValueError, match="buffer"):
        DiffTuningObjective(ab, variant="buffer", buffer=torch.zeros(0, 3, 2, 2))
    with pytest.raises(ValueError, match="pretrained|teacher"):
        DiffTuningObjective(ab, variant="kd")
    with pytest.raises(ValueError, match="lwf"):
        DiffTuningObjective(ab, variant="lwf", buffer=_buffer(), teacher=_model())
    assert BaselinesConfig().difftuning.kd_weight == 0.05


# ----------------------------------------------------------------------------------------- train loop

METHODS = ["plain", "uniform", "min_snr", "p2", "snr_plus_one", "trunc_snr", "ant_uw", "ant_nash",
           "difftuning_buffer", "difftuning_kd"]


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (40, 8, 8, 3), generator=g, dtype=torch.uint8)


def _objective(method, ab, init):
    if method == "plain":
        return EpsObjective(ab)
    if method in ("uniform", "min_snr", "p2", "snr_plus_one", "trunc_snr"):
        return EpsObjective(ab, weights=epsilon_weights(method, ab))
    if method == "ant_uw":
        return ANTObjective(ab, num_tasks=5, mode="uw")
    if method == "ant_nash":
        return ANTObjective(ab, num_tasks=5, mode="nash", update_every=2)
    if method == "difftuning_buffer":
        return DiffTuningObjective(ab, variant="buffer", buffer=to_model_range(_images(seed=1)[:16]))
    if method == "difftuning_kd":
        return DiffTuningObjective(ab, variant="kd", teacher=copy.deepcopy(init).requires_grad_(False))
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_without_nan(method, ab):
    init = _model(seed=1)
    before = _state(init)
    obj = _objective(method, ab, init)
    logs = []
    cfg = TrainConfig(iterations=3, batch_size=10, log_every=1, ckpt_every=0)
    out = train(copy.deepcopy(init), obj, _images(), cfg, seed=0, device=CPU,
                log=lambda m, s: logs.append((s, dict(m))))
    assert [s for s, _ in logs] == [1, 2, 3]
    for _, m in logs:
        assert np.isfinite(m["loss"]) and np.isfinite(m["loss_eps"])
    after = _state(out)
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) > len(after) // 2, "the model did not train"
    if method == "snr_plus_one":
        assert max(m["loss"] for _, m in logs) > min(m["loss_eps"] for _, m in logs)  # weights > 1 act
    if method == "ant_uw":
        s = obj.log_vars.detach()
        assert torch.all(s.abs() > 1e-3), "the UW log-variances were not optimised"
        assert all(f"uw_s{j}" in logs[0][1] for j in range(1, 6))
    if method == "ant_nash":
        assert obj.calls == 3
        assert not torch.equal(obj.alpha, torch.ones(5)) and torch.all(obj.alpha > 0)
    if method == "difftuning_buffer":
        assert any(m["buffer_fraction"] > 0 for _, m in logs)
    if method == "difftuning_kd":
        assert logs[0][1]["loss_kd"] == 0.0  # the student starts as the teacher
        assert logs[-1][1]["loss_kd"] > 0
        assert all(torch.equal(p, before[k]) for k, p in obj.teacher.state_dict().items())


class _Crash(Exception):
    pass


def test_ant_nash_crash_and_resume_equals_uninterrupted_run(ab, tmp_path):
    init = _model(seed=8)
    images = _images(seed=2)
    cfg = TrainConfig(iterations=4, batch_size=10, log_every=1, ckpt_every=2)

    def objective():
        return ANTObjective(ab, num_tasks=5, mode="nash", update_every=2)

    ref_obj, ref_logs = objective(), []
    ref = train(copy.deepcopy(init), ref_obj, images, cfg, seed=5, device=CPU, ckpt_dir=tmp_path / "ref",
                fingerprint="fp", log=lambda m, s: ref_logs.append((s, m["loss"])))

    def crash(metrics, step):
        if step == 3:
            raise _Crash
    with pytest.raises(_Crash):
        train(copy.deepcopy(init), objective(), images, cfg, seed=5, device=CPU, ckpt_dir=tmp_path / "run",
              fingerprint="fp", log=crash)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2 and state["objective"]["calls"] == 2
    assert state["objective"]["alpha"] != [1.0] * 5

    res_obj, res_logs, steps_run = objective(), [], []
    forward = res_obj.forward
    res_obj.forward = lambda *a, **k: steps_run.append(1) or forward(*a, **k)  # counts the steps trained here
    resumed = train(copy.deepcopy(init), res_obj, images, cfg, seed=5, device=CPU, ckpt_dir=tmp_path / "run",
                    fingerprint="fp", log=lambda m, s: res_logs.append((s, m["loss"])))
    assert len(steps_run) == 2, "the run did not resume from the step-2 checkpoint"
    assert res_logs == ref_logs  # steps 1-2 replayed from the checkpoint's log, 3-4 trained again
    assert res_obj.calls == ref_obj.calls == 4
    assert torch.equal(res_obj.alpha, ref_obj.alpha)
    ref_state, res_state = _state(ref), _state(resumed)
    diff = [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])]
    assert not diff, f"weights differ after resume, e.g. {diff[:3]}"
