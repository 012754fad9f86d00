"""The analysis library of docs/paper.md §4 (Figs. 1a, 2, 4, 6a, 6b, 7 and the x̂0 sequence view): known
answers on tiny UNets, and every figure function on a small saved npz."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_unet, randomize_
from deme.analysis import figures
from deme.analysis.activations import compute_activations
from deme.analysis.gradsim import compute_gradsim, cosine_matrix, off_diagonal, sketch, timestep_gradient
from deme.analysis.landscape import (compute_landscape, filter_normalized_direction, floating_state,
                                     loss_on_plane, range_losses)
from deme.analysis.sequence import compute_sequence, ddim_x0_trajectory, interval_end_steps
from deme.analysis.taskvec import (compute_cosines, compute_layer_stats, compute_planes, layer_groups,
                                   noise_floor, plane_basis, plane_coords, compute_seed_geometry,
                                   seed_pairs)
from deme.config import ScheduleConfig
from deme.merge import flatten, task_vector
from deme.objectives.deme import add_noise
from deme.projection import add_channel_projection
from deme.sample import Ensemble, ddim_sample, ddim_timesteps
from deme.schedule import alphas_cumprod

SCHEDULE = ScheduleConfig()
AB = alphas_cumprod(SCHEDULE)


def _unet(seed: int = 1):
    return randomize_(make_tiny_unet(), seed=seed).eval()


def _micro_unet(seed: int = 1):
    """~11k parameters: keeps the d=4096 sketch cheap."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    m = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    norm_num_groups=2)
    return randomize_(m, seed=seed).eval()


def _data(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g).clamp(-1, 1), torch.randn(n, 3, 8, 8, generator=g)


def _finetuned(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with every float tensor moved by a small random delta (a stand-in for finetuning)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return out


def _same_state(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# Fig. 1(a)

def test_cosine_matrix_known_answers():
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 3.0, -1.0])  # orthogonal to a
    S = cosine_matrix(torch.stack([a, 3 * a, b, -a]))
    expected = torch.tensor([[1, 1, 0, -1], [1, 1, 0, -1], [0, 0, 1, 0], [-1, -1, 0, 1]], dtype=torch.float64)
    assert torch.allclose(S, expected, atol=1e-12)


def test_exact_gradsim_is_symmetric_with_unit_diagonal_and_common_noise():
    model = _unet()
    x0, noise = _data()
    out = compute_gradsim(model, x0, noise, [10, 10, 500, 999], AB, micro_batch=2)
    S = out["S"]
    assert S.dtype == np.float32 and S.shape == (4, 4)
    np.testing.assert_allclose(np.diag(S), 1, atol=1e-6)
    np.testing.assert_array_equal(S, S.T)
    # the same t with the same images and noise gives the same gradient: a fresh noise draw would not
    assert S[0, 1] == pytest.approx(1, abs=1e-6)
    assert S[0, 2] < 0.999 and S[0, 3] < 0.999
    assert int(out["num_params"]) == sum(p.numel() for p in model.parameters())
    assert int(out["sketch_dim"]) == 0 and int(out["samples"]) == 4
    np.testing.assert_array_equal(out["timesteps"], [10, 10, 500, 999])


def test_timestep_gradient_accumulates_to_the_full_batch_gradient():
    model = _unet()
    x0, noise = _data()
    t = torch.full((4,), 300)
    loss = F.mse_loss(model(add_noise(AB, x0, noise, t), t).sample, noise)
    full = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    for mb in (1, 3, 4):
        acc = torch.cat(timestep_gradient(model, x0, noise, 300, AB, micro_batch=mb))
        # float32 sums in another order: about 1e-7 of the largest entry (~1) anywhere, so atol 1e-6
        assert torch.allclose(acc, full, rtol=1e-4, atol=1e-6), mb
    assert all(p.grad is None for p in model.parameters())


def test_sketch_approximates_exact_cosines_and_is_deterministic():
    model = _micro_unet()
    x0, noise = _data()
    ts = [5, 200, 600, 950]
    exact = compute_gradsim(model, x0, noise, ts, AB)["S"]
    sk = compute_gradsim(model, x0, noise, ts, AB, sketch_dim=4096, seed=3)["S"]
    assert np.abs(sk - exact).max() < 0.1
    assert np.abs(sk - exact).max() > 0  # it is a sketch, not the exact matrix
    # the same R for every timestep whatever the grouping, and the same R for the same seed
    again = compute_gradsim(model, x0, noise, ts, AB, sketch_dim=4096, seed=3, group=1)["S"]
    np.testing.assert_allclose(again, sk, atol=1e-5)


def test_sketch_is_linear_deterministic_and_seeded():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 40, generator=g), torch.randn(3, 7, generator=g)]  # 3 vectors, 2 "parameters"
    names = ["w", "b"]
    a = sketch(grads, names, 64, seed=1)
    assert a.shape == (3, 64)
    assert torch.equal(a, sketch(grads, names, 64, seed=1))
    assert not torch.allclose(a, sketch(grads, names, 64, seed=2))
    # one vector alone gets the same sketch as inside a group (the same R for every timestep)
    assert torch.allclose(sketch([x[1:2] for x in grads], names, 64, seed=1), a[1:2], atol=1e-6)
    summed = sketch([x[:1] + x[1:2] for x in grads], names, 64, seed=1)
    assert torch.allclose(summed, a[:1] + a[1:2], atol=1e-5)


def test_off_diagonal_selects_pairs_inside_the_range():
    ts = [0, 100, 300, 800]
    S = np.arange(16, dtype=float).reshape(4, 4)
    np.testing.assert_array_equal(off_diagonal(S, ts, 0, 250), [S[0, 1]])
    np.testing.assert_array_equal(off_diagonal(S, ts, 0, 1000), [S[0, 1], S[0, 2], S[0, 3], S[1, 2], S[1, 3],
                                                                S[2, 3]])
    assert off_diagonal(S, ts, 900, 1000).size == 0


# ----------------------------------------------------------------------------------------------------
# Fig. 4 and the plane evaluator

def test_filter_normalised_direction_matches_each_filter_norm():
    state = floating_state(_unet())
    d = filter_normalized_direction(state, torch.Generator().manual_seed(0))
    assert d.keys() == state.keys()
    for k, w in state.items():
        assert d[k].shape == w.shape
        if w.ndim <= 1:
            assert not d[k].any(), k  # biases and norm parameters are not moved
        else:
            torch.testing.assert_close(d[k].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
            assert not torch.allclose(d[k], w)


def test_landscape_origin_is_the_models_own_loss():
    model = _unet()
    x0, noise = _data()
    before = floating_state(model)
    ranges = [(0, 1000), (0, 250)]
    out = compute_landscape(model, x0, noise, ranges, AB, grid=3, t_draws=2, seed=0)
    assert out["loss"].shape == (2, 3, 3) and out["xs"][1] == 0 and out["ys"][1] == 0
    assert _same_state(before, floating_state(model))
    for k in range(2):  # direct: the eps-MSE of the untouched model on the stored fixed set
        t = torch.as_tensor(out["t"][k])
        assert t.min() >= ranges[k][0] and t.max() < ranges[k][1] and len(t) == 8
        x, eps = x0.repeat_interleave(2, 0), noise.repeat_interleave(2, 0)
        with torch.no_grad():
            direct = float(F.mse_loss(model(add_noise(AB, x, eps, t), t).sample, eps))
        assert out["origin_loss"][k] == pytest.approx(direct, rel=1e-5)
        assert out["loss"][k, 1, 1] == pytest.approx(direct, rel=1e-5)
    assert not np.allclose(out["loss"][0], out["loss"][0, 1, 1])  # the plane is not flat


def test_loss_on_plane_restores_the_weights_also_after_an_exception():
    model = _unet()
    x0, noise = _data()
    before = floating_state(model)
    origin = {k: v + 0.1 for k, v in before.items()}  # an origin other than the model's own weights
    g = torch.Generator().manual_seed(0)
    d1, d2 = filter_normalized_direction(origin, g), filter_normalized_direction(origin, g)
    loss_fn, _ = range_losses(x0, noise, [(0, 1000)], AB, t_draws=1)
    z = loss_on_plane(model, origin, d1, d2, [-1, 0, 1], [0, 0.5], loss_fn)
    assert z.shape == (1, 2, 3)
    assert _same_state(before, floating_state(model))
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        loss_on_plane(model, origin, d1, d2, [-1, 0, 1], [0, 1], failing)
    assert _same_state(before, floating_state(model))


# ----------------------------------------------------------------------------------------------------
# Fig. 6(a), 6(b), 7

def test_plane_coordinates_reproduce_distances_and_losses():
    base_model = _unet()
    model_a, model_b = _finetuned(base_model, 11), _finetuned(base_model, 12)
    base, sa, sb = (m.state_dict() for m in (base_model, model_a, model_b))
    ta, tb = task_vector(sa, base), task_vector(sb, base)
    u, v = plane_basis(ta, tb)
    assert float(u @ u) == pytest.approx(1) and float(v @ v) == pytest.approx(1) and abs(float(u @ v)) < 1e-12
    pa, pb = np.array(plane_coords(u, v, ta)), np.array(plane_coords(u, v, tb))
    na, nb, nab = (float(flatten(t).norm()) for t in (ta, tb, {k: ta[k] - tb[k] for k in ta}))
    assert np.linalg.norm(pa) == pytest.approx(na, rel=1e-9) and pa[1] == pytest.approx(0, abs=1e-9 * na)
    assert np.linalg.norm(pb) == pytest.approx(nb, rel=1e-9)
    assert np.linalg.norm(pa - pb) == pytest.approx(nab, rel=1e-9)

    x0, noise = _data()
    loss_fn, _ = range_losses(x0, noise, [(0, 1000)], AB, t_draws=1, seed=5)
    model = copy.deepcopy(base_model)
    out = compute_planes(model, base, {"a": sa, "b": sb, "c": _finetuned(base_model, 13).state_dict()}, loss_fn,
                         merge_weights=[0.5, 0.5, 0.5], grid=4)
    assert out["loss"].shape == (3, 4, 4) and out["points"].shape == (3, 4, 2)
    np.testing.assert_array_equal(out["pairs"], [[0, 1], [0, 2], [1, 2]])
    np.testing.assert_allclose(out["points"][0, 1], pa, rtol=1e-9)
    np.testing.assert_allclose(out["points"][0, 2], pb, rtol=1e-9)
    # the surface at theta_a's coordinates is the loss of the finetuned model a (and at (0,0) theta's)
    assert out["point_loss"][0, 1] == pytest.approx(float(loss_fn(model_a)[0]), rel=1e-5)
    assert out["point_loss"][0, 2] == pytest.approx(float(loss_fn(model_b)[0]), rel=1e-5)
    assert out["point_loss"][0, 0] == pytest.approx(float(loss_fn(base_model)[0]), rel=1e-5)
    assert out["offplane"][0] > 0  # the 3-model merge leaves the plane of (a, b)
    # the grid covers every point with a margin
    for p in range(3):
        assert out["xs"][p].min() < out["points"][p, :, 0].min() and out["xs"][p].max() > out["points"][p, :, 0].max()
    assert _same_state(floating_state(base_model), floating_state(model))


def test_task_vector_cosines_known_answers_and_noise_floor():
    base = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    t1 = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    t2 = {"w": 2 * torch.ones(2, 3), "b": torch.zeros(3)}  # parallel to t1
    t3 = {"w": torch.zeros(2, 3), "b": torch.tensor([1.0, -2.0, 0.5])}  # orthogonal to t1
    out = compute_cosines(base, {"1": t1, "2": t2, "3": t3}, seed_pairs={"1": (t1, t2)})
    np.testing.assert_allclose(out["cos"], [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)
    assert out["floor"].tolist() == pytest.approx([1.0])
    assert noise_floor(t1, t3, base) == pytest.approx(0.0, abs=1e-12)
    assert out["layer_cos"].shape == (len(out["groups"]), 3, 3)


def test_seed_geometry_gives_each_seeds_cosines_and_norms_and_every_seed_pair_as_floor():
    base = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    e_w, e_b = torch.ones(2, 3), torch.tensor([1.0, -2.0, 0.5])
    zw, zb = torch.zeros(2, 3), torch.zeros(3)
    by_seed = [{"I1": {"w": e_w, "b": zb}, "I2": {"w": zw, "b": e_b}},  # orthogonal intervals
               {"I1": {"w": 2 * e_w, "b": zb}, "I2": {"w": zw, "b": 3 * e_b}},
               {"I1": {"w": e_w, "b": zb}, "I2": {"w": e_w, "b": zb}}]  # the third seed: parallel
    out = compute_seed_geometry(base, by_seed)
    assert out["seed_cos"].shape == (3, 2, 2) and out["seed_norms"].shape == (3, 2)
    assert out["seed_cos"][:, 0, 1].tolist() == pytest.approx([0.0, 0.0, 1.0])
    np.testing.assert_allclose(out["seed_norms"][1], [2 * np.sqrt(6), 3 * np.sqrt(5.25)])
    pairs = seed_pairs(by_seed)
    assert sorted(pairs) == ["I1 s0-s1", "I1 s0-s2", "I1 s1-s2", "I2 s0-s1", "I2 s0-s2", "I2 s1-s2"]
    floor = compute_cosines(base, by_seed[0], pairs)
    assert dict(zip(floor["floor_names"], floor["floor"].round(12))) == {
        "I1 s0-s1": 1.0, "I1 s0-s2": 1.0, "I1 s1-s2": 1.0, "I2 s0-s1": 1.0, "I2 s0-s2": 0.0, "I2 s1-s2": 0.0}


def test_cosine_matrix_of_unet_task_vectors_is_symmetric_with_unit_diagonal():
    base_model = add_channel_projection(_unet())
    base = base_model.state_dict()
    fts = {f"I{i}": _finetuned(base_model, 20 + i).state_dict() for i in range(1, 4)}
    out = compute_cosines(base, fts, seed_pairs={"I1": (fts["I1"], _finetuned(base_model, 99).state_dict())})
    cos = out["cos"]
    np.testing.assert_allclose(cos, cos.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(cos), 1, atol=1e-12)
    assert np.abs(cos[np.triu_indices(3, 1)]).max() < 0.5  # independent random deltas: near orthogonal
    layer = out["layer_cos"]
    np.testing.assert_allclose(layer, layer.transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(np.diagonal(layer, axis1=1, axis2=2), 1, atol=1e-12)
    assert out["floor_layer"].shape == (1, len(out["groups"]))


def test_layer_groups_cover_every_parameter_once():
    model = add_channel_projection(_unet())
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    groups = layer_groups(keys)
    flat = [k for ks in groups.values() for k in ks]
    assert sorted(flat) == sorted(keys) and len(flat) == len(set(flat))
    assert list(groups) == ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "mid_block",
                            "up_blocks.0", "up_blocks.1", "conv_out", "projections"]
    assert all("channel_proj" in k for k in groups["projections"]) and len(groups["projections"]) == 5
    assert "conv_norm_out.weight" in groups["conv_out"]


def test_layer_stats_counts_quantiles_and_pooled_view():
    base_model = _unet()
    base = base_model.state_dict()
    fts = {"I1": _finetuned(base_model, 1, 0.01).state_dict(), "I2": _finetuned(base_model, 2, 0.1).state_dict()}
    out = compute_layer_stats(base, fts, [(0, 500), (500, 1000)])
    assert out["count"].sum() == sum(p.numel() for p in base_model.parameters())
    q = out["abs_quantiles"]
    assert q.shape == (2, len(out["groups"]), 5) and (np.diff(q, axis=-1) >= 0).all()
    tau = flatten({k: v for k, v in task_vector(fts["I1"], base).items() if k.startswith("conv_in")}).numpy()
    np.testing.assert_allclose(out["quantiles"][0, 0], np.quantile(tau, [0, 0.25, 0.5, 0.75, 1]))
    assert out["l2"][0, 0] == pytest.approx(np.linalg.norm(tau))
    assert (out["mean_abs"][1] > out["mean_abs"][0]).all()  # the larger delta is larger in every layer
    np.testing.assert_allclose(out["pooled_abs_quantiles"], q)  # one model per half: pooled = per model
    assert out["pooled_names"].tolist() == ["[0,500)", "[500,1000)"]


# ----------------------------------------------------------------------------------------------------
# Fig. 2

def test_activations_of_identical_models_do_not_change():
    model = _unet()
    x0, noise = _data()
    out = compute_activations(model, copy.deepcopy(model), x0, noise, torch.tensor([10, 300, 600, 900]), AB)
    assert out["layers"].tolist() == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert str(out["layer"]) == "mid_block" and out["a_pre"].shape == (16,) and out["s_pre"].shape == (4, 4)
    for key in ("da", "ds", "da_layer", "ds_layer", "da_rep", "ds_rep"):
        assert not out[key].any(), key
    assert out["da"].size == 4 * (8 + 16 + 16 + 16 + 8) and out["ds"].size == 4 * (16 + 16 + 16 + 64 + 64)


@pytest.mark.parametrize("via", ["hook", "projection"])
def test_scaling_one_channel_changes_channel_profile_more(via):
    pre = _unet()
    x0, noise = _data()
    if via == "projection":
        add_channel_projection(pre)
    post = copy.deepcopy(pre)
    # the most active channel of the mid block (strongest channel profile, so its change is not tiny)
    c, k = int(np.abs(compute_activations(pre, post, x0, noise, 500, AB)["a_pre"]).argmax()), 3.0
    if via == "hook":
        def scale(module, args, output):
            output = output.clone()
            output[:, c] *= k
            return output

        post.mid_block.register_forward_hook(scale)
    else:  # the projection's hook comes first: the capture must see its output
        with torch.no_grad():
            post.mid_block.channel_proj.weight[c, c] = k
    out = compute_activations(pre, post, x0, noise, 500, AB, layer="mid_block")
    i = out["layers"].tolist().index("mid_block")
    assert out["da_layer"][:i].max() == 0 and out["ds_layer"][:i].max() == 0  # upstream blocks unaffected
    da, ds = out["da_rep"], out["ds_rep"]
    assert da[c] > 0 and np.delete(da, c).max() == 0  # exactly one channel changed...
    assert ds.min() > 0 and ds.max() < 0.5 * ds.sum()  # ...while every pixel's spatial mean moves a little
    assert da.max() > 2 * ds.max()
    assert out["da_layer"][i] > 0 and out["ds_layer"][i] > 0


# ----------------------------------------------------------------------------------------------------
# x̂0 sequence

def test_interval_end_steps_known_answer():
    ts = ddim_timesteps(SCHEDULE, 8)
    assert ts == [875, 750, 625, 500, 375, 250, 125, 0]
    assert [ts[k] for k in interval_end_steps(ts, 4)] == [750, 500, 250, 0]
    with pytest.raises(ValueError):
        interval_end_steps(ddim_timesteps(SCHEDULE, 2), 4)


def test_sequence_is_deterministic_and_consistent_with_ddim_sample():
    m1, m2 = _unet(1), _unet(2)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    models = {"pretrained": m1, "other": m2, "ensemble": Ensemble([m1, m2])}
    out = compute_sequence(models, noise, SCHEDULE, steps=8, n_intervals=4)
    assert out["images"].shape == (3, 4, 2, 8, 8, 3) and out["images"].dtype == np.uint8
    assert out["timesteps"].tolist() == [750, 500, 250, 0]
    assert out["intervals"].tolist() == [[750, 1000], [500, 750], [250, 500], [0, 250]]
    again = compute_sequence({"pretrained": m1}, noise, SCHEDULE, steps=8, n_intervals=4)
    np.testing.assert_array_equal(again["images"][0], out["images"][0])
    assert not np.array_equal(out["images"][0], out["images"][1])
    _, final = ddim_x0_trajectory(m1, noise, SCHEDULE, 8, [0])
    assert torch.equal(final, ddim_sample(m1, noise, SCHEDULE, steps=8))
    # the ensemble uses model 2 on [500, 1000) and model 1 below: its first column is model 2's
    np.testing.assert_array_equal(out["images"][2, 0], out["images"][1, 0])


# ----------------------------------------------------------------------------------------------------
# Figures: each writes a PNG and a PDF from a small saved npz

def _check_written(png):
    assert png.exists() and png.stat().st_size > 1000
    pdf = png.with_suffix(".pdf")
    assert pdf.exists() and pdf.stat().st_size > 1000


def test_figures_write_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    model = _unet()
    x0, noise = _data()

    def save(name, result):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **result)
        return path

    S = compute_gradsim(model, x0, noise, [0, 100, 200, 600, 900], AB)
    activ = compute_activations(model, _finetuned(model, 3), x0, noise, 400, AB)
    land = compute_landscape(model, x0[:2], noise[:2], [(0, 1000), (0, 250)], AB, grid=3, t_draws=1)
    base = model.state_dict()
    fts = {f"I{i}": _finetuned(model, 30 + i).state_dict() for i in range(1, 5)}
    loss_fn, _ = range_losses(x0[:2], noise[:2], [(0, 1000)], AB, t_draws=1)
    planes = compute_planes(copy.deepcopy(model), base, dict(list(fts.items())[:3]), loss_fn, pairs=[(0, 1), (0, 2)],
                            merge_weights=[1, 1, 1], grid=3)
    two = {k: fts[k] for k in ("I1", "I4")}
    stats = compute_layer_stats(base, two, [(0, 500), (500, 1000)])
    cos = compute_cosines(base, fts, seed_pairs={"I1": (fts["I1"], _finetuned(model, 77).state_dict())})
    seq = {"images": rng.integers(0, 256, (2, 4, 2, 8, 8, 3), dtype=np.uint8), "names": np.array(["a", "b"]),
           "timesteps": np.array([750, 500, 250, 0]), "intervals": np.array([[750, 1000], [500, 750], [250, 500],
                                                                            [0, 250]]), "steps": np.asarray(8)}
    jobs = [(figures.fig1a, S), (figures.fig2, activ), (figures.fig4, land), (figures.fig6a, planes),
            (figures.fig6b, stats), (figures.fig7, cos), (figures.fig_sequence, seq)]
    for fn, result in jobs:
        png = fn(save(fn.__name__, result), tmp_path / "out" / f"{fn.__name__}.png")
        assert png == tmp_path / "out" / f"{fn.__name__}.png"
        _check_written(png)
