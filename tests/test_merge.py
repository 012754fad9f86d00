"""Task vectors, task arithmetic, the merged model and the merge-weight searches (docs/paper.md §1.8)."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_tiny_unet, randomize_
from deme.merge import (Scorer, coordinate_search, flatten, grid_search, merge_states, merged_model,
                        task_vector)
from deme.projection import add_channel_projection


def _state(seed, int_value=3):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g) * 1e-3,
            "big": torch.randn(3, generator=g) * 1e3, "steps": torch.tensor([int_value, 7])}


def _finetuned(base, seed, scale=0.05):
    """base + a small float32 delta: what finetuning produces."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        out[k] = v + scale * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() \
            else v + 100
    return out


@pytest.fixture
def states():
    base = _state(0)
    return base, [_finetuned(base, s) for s in (1, 2, 3, 4)]


def test_task_vector_is_difference_of_float_tensors(states):
    base, fts = states
    tau = task_vector(fts[0], base)
    assert set(tau) == {"w", "b", "big"}, "integer buffers must be skipped"
    for k in tau:
        assert torch.equal(tau[k], fts[0][k] - base[k])


def test_all_zero_weights_give_base_exactly(states):
    base, fts = states
    merged = merge_states(base, [task_vector(f, base) for f in fts], [0.0] * 4)
    assert merged.keys() == base.keys()
    for k in base:
        assert torch.equal(merged[k], base[k])
        assert merged[k].dtype == base[k].dtype


def test_single_vector_weight_one_gives_finetuned_exactly(states):
    """For finetuned = base + small delta (the realistic case) the round trip is bitwise exact."""
    base, fts = states
    merged = merge_states(base, [task_vector(fts[0], base)], [1.0])
    for k in ("w", "b", "big"):
        assert torch.equal(merged[k], fts[0][k]), k


def test_weight_one_is_within_half_an_ulp_for_arbitrary_fp32_states():
    """For unrelated fp32 tensors (weights that cross zero) the error is bounded by the rounding of the
    fp32 task vector: half an ulp of max(|base|, |finetuned|)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(20000, generator=g)
    f = torch.randn(20000, generator=g) * 3
    merged = merge_states({"a": b}, [task_vector({"a": f}, {"a": b})], [1.0])["a"]
    bound = torch.maximum(b.abs(), f.abs()).double() * 2.0 ** -23
    assert ((merged.double() - f.double()).abs() <= bound).all()


def test_weight_one_gives_finetuned_bitwise_for_any_fp32_state():
    base = {"a": torch.tensor([1e-3, 0.5, 1.0, -0.3])}
    ft = {"a": torch.tensor([1.2345e-7, -1.2345e-6, 3.3e-8, 0.3000001])}
    merged = merge_states(base, [task_vector(ft, base)], [1.0])
    assert torch.equal(merged["a"], ft["a"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_merge_keeps_dtype(dtype, states):
    base = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in states[0].items()}
    ft = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in states[1][0].items()}
    merged = merge_states(base, [task_vector(ft, base)], [0.5])
    for k in base:
        assert merged[k].dtype == base[k].dtype


def test_linearity_half_weight_is_midpoint(states):
    base, fts = states
    tau = task_vector(fts[0], base)
    half = merge_states(base, [tau], [0.5])
    for k in tau:
        mid = (base[k].double() + fts[0][k].double()) / 2
        assert torch.allclose(half[k].double(), mid, rtol=1e-6, atol=1e-6 * float(base[k].abs().max()))


def test_merge_is_base_plus_weighted_sum(states):
    base, fts = states
    taus = [task_vector(f, base) for f in fts]
    w = [0.1, 0.1, 0.2, 0.5]  # the official church weights (docs/paper.md §1.8), not summing to 1
    merged = merge_states(base, taus, w)
    for k in taus[0]:
        expected = base[k].double() + sum(wi * t[k].double() for wi, t in zip(w, taus))
        assert torch.equal(merged[k], expected.to(base[k].dtype))
    # scaling one weight changes only through its vector
    merged2 = merge_states(base, taus, [0.1, 0.1, 0.2, 1.0])
    for k in taus[0]:
        assert torch.allclose(merged2[k].double() - merged[k].double(), 0.5 * taus[3][k].double(), atol=1e-5)


def test_integer_buffers_untouched(states):
    base, fts = states
    merged = merge_states(base, [task_vector(f, base) for f in fts], [1.0, 0.5, 0.3, 2.0])
    assert torch.equal(merged["steps"], base["steps"])
    assert merged["steps"].dtype == torch.int64
    assert merged["steps"].data_ptr() != base["steps"].data_ptr()  # a copy, not an alias


def test_mismatched_keys_raise(states):
    base, fts = states
    bad = dict(fts[0])
    bad["down_blocks.0.channel_proj.weight"] = torch.eye(3)
    with pytest.raises(ValueError, match="channel_proj"):
        task_vector(bad, base)
    missing = {k: v for k, v in fts[0].items() if k != "w"}
    with pytest.raises(ValueError, match="different parameters"):
        task_vector(missing, base)


def test_number_of_weights_must_match(states):
    base, fts = states
    with pytest.raises(ValueError, match="weights"):
        merge_states(base, [task_vector(fts[0], base)], [0.5, 0.5])


def test_flatten(states):
    base, _ = states
    flat = flatten(base)
    assert flat.dtype == torch.float64
    assert flat.numel() == sum(v.numel() for v in base.values())


# ----------------------------------------------------------------------------------------- merged model

def test_merged_model_parameters_equal_merge_states():
    base = add_channel_projection(randomize_(make_tiny_unet(), seed=1))
    fts = []
    for s in (2, 3):
        m = add_channel_projection(randomize_(make_tiny_unet(), seed=1))
        randomize_(m, seed=s, scale=0.01)
        fts.append(m.state_dict())
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    taus = [task_vector(f, base_sd) for f in fts]
    assert any("channel_proj" in k for k in taus[0])
    model = merged_model(base, taus, [0.3, 0.7])
    expected = merge_states(base_sd, taus, [0.3, 0.7])
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert model is not base and not model.training
    for k, v in base.state_dict().items():  # the base model is not modified
        assert torch.equal(v, base_sd[k])
    # the projection of the merged model is I + sum_i w_i (W_i - I) and is used in the forward pass
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_merged = model(x, 100).sample
        zero = merged_model(base, taus, [0.0, 0.0])(x, 100).sample
        out_base = base(x, 100).sample
    assert torch.equal(zero, out_base)
    assert not torch.allclose(out_merged, out_base)


# ----------------------------------------------------------------------------------------- search

def test_scorer_memoises_and_records_rows():
    calls = []

    def fn(w):
        calls.append(w)
        return sum(w)

    seen = []
    s = Scorer(fn, on_new=lambda w, v, ph: seen.append((w, v, ph)))
    assert s((0.1, 0.2), "a") == pytest.approx(0.3)
    assert s((0.1, 0.2), "b") == pytest.approx(0.3)
    assert s((0.1 + 1e-9, 0.2), "c") == pytest.approx(0.3)  # rounds to the same key
    assert s([0.5, 0.0], "d") == 0.5
    assert calls == [(0.1, 0.2), (0.5, 0.0)]
    assert [r[0] for r in s.rows] == [(0.1, 0.2), (0.5, 0.0)]
    assert [r[2] for r in s.rows] == ["a", "d"]
    assert seen == [((0.1, 0.2), pytest.approx(0.3), "a"), ((0.5, 0.0), 0.5, "d")]
    assert s.best() == ((0.1, 0.2), pytest.approx(0.3))


def test_scorer_uses_given_cache_without_calling():
    calls = []
    s = Scorer(lambda w: calls.append(w) or 1.0, cache={(1.0, 1.0): 0.25})
    assert s((1.0, 1.0), "start") == 0.25
    assert calls == []
    assert s.rows == [((1.0, 1.0), 0.25, "start")]


def _quadratic(center, scales=None):
    scales = scales or [1.0 + i for i in range(len(center))]

    def f(w):
        return sum(a * (x - c) ** 2 for a, x, c in zip(scales, w, center))
    return f


def _counting(fn):
    calls = []

    def wrapped(w):
        calls.append(w)
        return fn(w)
    return wrapped, calls


@pytest.mark.parametrize("center, rounds", [((0.25, 1.25, 0.5), 1), ((0.375, 1.125), 2), ((0.0, 1.25), 1),
                                            ((1.0, 0.5, 0.0, 0.5), 0)])
def test_coordinate_search_finds_lattice_optimum(center, rounds):
    fn, calls = _counting(_quadratic(center))
    s = Scorer(fn)
    n = len(center)
    best = coordinate_search(s, n, coarse=[0.0, 0.5, 1.0], refine_step=0.25, refine_rounds=rounds, start=1.0,
                             bounds=[0.0, 1.5])
    assert best == pytest.approx(center)
    assert len(calls) == len(set(calls)), "a candidate was scored twice"
    assert len(calls) <= 1 + n * 3 + 2 * n * rounds
    assert s.best()[0] == best


def test_coordinate_search_stays_in_bounds():
    fn, calls = _counting(_quadratic((2.5, -1.0, 0.7)))
    s = Scorer(fn)
    best = coordinate_search(s, 3, coarse=[-1.0, 0.0, 1.0, 3.0], refine_step=0.5, refine_rounds=2, start=5.0,
                             bounds=[0.0, 1.5])
    assert all(0.0 <= x <= 1.5 for w in calls for x in w)
    assert best[0] == 1.5 and best[1] == 0.0
    assert 0.0 <= best[2] <= 1.5
    assert calls[0] == (1.5, 1.5, 1.5)  # start is clipped too


def test_grid_search_coarse_phase_is_full_product():
    fn, calls = _counting(_quadratic((0.5, 0.5, 1.0)))
    s = Scorer(fn)
    best = grid_search(s, 3, coarse=[0.0, 0.5, 1.0], refine_step=0.25, refine_rounds=0, bounds=[0.0, 1.5])
    coarse_rows = [r for r in s.rows if r[2] == "coarse"]
    assert len(coarse_rows) == 3 ** 3 == len(calls)
    assert {r[0] for r in coarse_rows} == set(itertools.product([0.0, 0.5, 1.0], repeat=3))
    assert best == (0.5, 0.5, 1.0)


def test_grid_search_refine_finds_quadratic_optimum():
    center = (0.25, 1.25)
    fn, calls = _counting(_quadratic(center))
    s = Scorer(fn)
    best = grid_search(s, 2, coarse=[0.0, 0.5, 1.0], refine_step=0.25, refine_rounds=1, bounds=[0.0, 1.5])
    assert best == pytest.approx(center)
    assert sum(r[2] == "coarse" for r in s.rows) == 9
    refine = [r[0] for r in s.rows if r[2] == "refine1"]
    assert 0 < len(refine) <= 25
    assert all(0.0 <= x <= 1.5 for w in calls for x in w)
    assert len(calls) == len(set(calls))


def test_grid_search_second_round_halves_step():
    center = (0.375, 0.875)
    s = Scorer(_quadratic(center))
    best = grid_search(s, 2, coarse=[0.0, 0.5, 1.0], refine_step=0.25, refine_rounds=2, bounds=[0.0, 1.5])
    assert best == pytest.approx(center)
    assert any(r[2] == "refine2" for r in s.rows)
