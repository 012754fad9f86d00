"""Sampling: the timestep ensemble (docs/paper.md §1.7), per-seed noise, DDIM, quantisation, grids, seeds."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_unet, randomize_
from deme.config import SampleConfig, ScheduleConfig
from deme.io import SEED_SPACE_SIZE, derive_seed, sample_seeds
from deme.sample import Ensemble, ddim_sample, ddim_timesteps, generate, image_grid, initial_noise, to_uint8
from deme.schedule import alphas_cumprod


class Const(nn.Module):
    """Predicts the constant ``value`` everywhere and records the timesteps it serves."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, x, t, *args, **kwargs):
        self.seen.append(int(torch.as_tensor(t).flatten()[0]))
        return SimpleNamespace(sample=torch.full_like(x, self.value))


def test_ddim50_timesteps():
    ts = ddim_timesteps(ScheduleConfig(), 50)
    assert ts == list(range(980, -1, -20))
    assert ddim_timesteps(ScheduleConfig(), 10) == list(range(900, -1, -100))


def test_ensemble_switch_points_ddim50_n4():
    models = [Const(k) for k in range(4)]
    ens = Ensemble(models)
    x = torch.zeros(2, 3, 4, 4)
    served = {}
    for t in ddim_timesteps(ScheduleConfig(), 50):
        out = ens(x, torch.tensor(t)).sample
        served.setdefault(int(out[0, 0, 0, 0]), []).append(t)
    assert served[3] == list(range(980, 759, -20)) and len(served[3]) == 12
    assert served[2] == list(range(740, 499, -20)) and len(served[2]) == 13
    assert served[1] == list(range(480, 259, -20)) and len(served[1]) == 12
    assert served[0] == list(range(240, -1, -20)) and len(served[0]) == 13


def test_ensemble_inside_ddim_sampler_calls_each_model_on_its_interval():
    models = [Const(0.0) for _ in range(4)]
    ddim_sample(Ensemble(models), torch.zeros(1, 3, 4, 4), ScheduleConfig(), steps=50)
    assert [len(m.seen) for m in models] == [13, 12, 13, 12]
    for k, m in enumerate(models):
        assert all(250 * k <= t < 250 * (k + 1) for t in m.seen)


@pytest.mark.parametrize("t, idx", [(0, 0), (249, 0), (250, 1), (999, 3), (1000, 3)])
def test_ensemble_index(t, idx):
    assert Ensemble([Const(k) for k in range(4)]).index(t) == idx


def test_ensemble_accepts_int_scalar_and_uniform_vector_timesteps():
    ens = Ensemble([Const(k) for k in range(2)])
    x = torch.zeros(3, 3, 2, 2)
    assert int(ens(x, 700).sample[0, 0, 0, 0]) == 1
    assert int(ens(x, torch.tensor([100, 100, 100])).sample[0, 0, 0, 0]) == 0


def test_ensemble_rejects_mixed_timesteps():
    ens = Ensemble([Const(k) for k in range(4)])
    with pytest.raises(ValueError, match="one timestep"):
        ens(torch.zeros(2, 3, 2, 2), torch.tensor([980, 960]))
    with pytest.raises(ValueError):  # same interval but different timesteps is still mixed
        ens(torch.zeros(2, 3, 2, 2), torch.tensor([10, 20]))


def test_ensemble_of_identical_models_equals_single_model():
    unet = randomize_(make_tiny_unet(), seed=3)
    noise = initial_noise([5, 6], (3, 8, 8))
    single = ddim_sample(unet, noise, ScheduleConfig(), steps=4)
    ens = ddim_sample(Ensemble([unet, unet]), noise, ScheduleConfig(), steps=4)
    assert torch.equal(single, ens)


# ----------------------------------------------------------------------------------------- noise, DDIM

def test_initial_noise_is_per_seed():
    shape = (3, 4, 4)
    a = initial_noise([10, 11, 12], shape)
    b = initial_noise([12, 99, 11], shape)
    assert a.shape == (3, 3, 4, 4)
    assert torch.equal(a[1], b[2]) and torch.equal(a[2], b[0])
    assert torch.equal(a[0], initial_noise([10], shape)[0])
    assert not torch.equal(a[0], a[1])
    assert torch.equal(a[0], torch.randn(shape, generator=torch.Generator().manual_seed(10)))


def test_initial_noise_does_not_depend_on_global_rng():
    torch.manual_seed(1)
    a = initial_noise([3], (2, 2))
    torch.manual_seed(2)
    assert torch.equal(a, initial_noise([3], (2, 2)))


def test_ddim_with_zero_eps_model_is_clipped_scaled_noise():
    """eps = 0: the x0 prediction is clip(x_t / sqrt(alpha_bar_t)); eta 0 carries it to the end."""
    noise = initial_noise([1, 2], (3, 4, 4))
    out = ddim_sample(Const(0.0), noise, ScheduleConfig(), steps=50)
    ab = alphas_cumprod(ScheduleConfig())
    expected = (noise.double() / ab[980].sqrt()).clamp(-1, 1).float()
    assert torch.allclose(out, expected, atol=1e-6)
    small = noise * 1e-3
    out = ddim_sample(Const(0.0), small, ScheduleConfig(clip_sample=False), steps=10)
    assert torch.allclose(out, (small.double() / ab[900].sqrt()).float(), atol=1e-6)


def test_ddim_output_in_range_and_deterministic():
    unet = randomize_(make_tiny_unet(), seed=4)
    noise = initial_noise([7, 8], (3, 8, 8))
    a = ddim_sample(unet, noise, ScheduleConfig(), steps=3)
    b = ddim_sample(unet, noise, ScheduleConfig(), steps=3)
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert a.shape == noise.shape


def test_generate_is_independent_of_batch_size():
    unet = randomize_(make_tiny_unet(), seed=4)
    seeds = list(range(100, 105))

    def run(bs):
        cfg = SampleConfig(steps=2, batch_size=bs)
        batches = list(generate(unet, seeds, ScheduleConfig(), cfg, (3, 8, 8), torch.device("cpu")))
        return batches

    b2, b5 = run(2), run(5)
    assert [len(b) for b in b2] == [2, 2, 1] and [len(b) for b in b5] == [5]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 8, 8) for b in b2)
    assert torch.equal(torch.cat(b2), b5[0])


def test_generate_with_eta_is_independent_of_batch_size():
    unet = randomize_(make_tiny_unet(), seed=4)
    seeds = list(range(100, 104))

    def run(bs):
        cfg = SampleConfig(steps=3, batch_size=bs, eta=1.0)
        return torch.cat(list(generate(unet, seeds, ScheduleConfig(), cfg, (3, 8, 8), torch.device("cpu"))))

    assert torch.equal(run(1), run(4))


# ----------------------------------------------------------------------------------------- quantisation

def test_to_uint8_endpoints_and_midpoint():
    out = to_uint8(torch.tensor([-1.0, 1.0, 0.0, -1.5, 2.0]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 255, 128, 0, 255]  # 0 -> 127.5 rounds to even 128 (numpy / diffusers agree)


def test_to_uint8_matches_diffusers_numpy_to_pil_convention():
    """diffusers' pipelines quantise in float32: round(clip(x / 2 + 0.5, 0, 1) * 255) with numpy's rounding."""
    x = torch.cat([torch.linspace(-1, 1, 511), torch.arange(256) / 127.5 - 1.0,
                   torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    xs = x.numpy()
    ref = np.round(np.clip(xs / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    out = to_uint8(x).numpy()
    assert np.array_equal(out, ref)
    # and it is the nearest level of the exact value (up to float32 rounding at ties)
    exact = (xs.astype(np.float64) + 1) * 127.5
    assert np.abs(out - exact).max() <= 0.5 + 1e-5
    # exact grid values map to their own level
    levels = torch.arange(256, dtype=torch.float64)
    assert torch.equal(to_uint8((levels / 127.5 - 1).float()), levels.to(torch.uint8))


# ----------------------------------------------------------------------------------------- grid

def test_image_grid_shape_and_layout():
    imgs = np.stack([np.full((3, 4, 4), i * 10, np.uint8) for i in range(5)])  # NCHW
    grid = image_grid(imgs)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:5, 1:5] == 0).all()
    assert (grid[1:5, 6:10] == 10).all()
    assert (grid[6:10, 6:10] == 40).all()
    assert (grid[0] == 255).all() and (grid[:, 5] == 255).all()
    assert (grid[6:10, 11:15] == 255).all()  # empty slot
    nhwc = image_grid(imgs.transpose(0, 2, 3, 1), nrow=5)
    assert nhwc.shape == (6, 26, 3)
    assert image_grid(torch.as_tensor(imgs), nrow=1).shape == (26, 6, 3)
    assert np.array_equal(image_grid(imgs[:1]), imgs[0].transpose(1, 2, 0))  # one image: itself (make_grid)


def test_save_grid_writes_png(tmp_path):
    from PIL import Image

    from deme.sample import save_grid

    imgs = np.zeros((4, 3, 2, 2), np.uint8)
    save_grid(imgs, tmp_path / "g.png", scale=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 * (2 * 3 + 1), 2 * (2 * 3 + 1))


# ----------------------------------------------------------------------------------------- seeds

def test_sample_seed_ranges_are_disjoint():
    ev = sample_seeds("eval", 50_000)
    se = sample_seeds("search", 5_000)
    assert len(ev) == 50_000 and len(se) == 5_000
    assert not set(ev) & set(se)
    assert ev[0] == 0 and se[0] == SEED_SPACE_SIZE
    for base in range(10):  # different bases of one purpose are disjoint too
        for other in range(base + 1, 10):
            assert not set(sample_seeds("eval", 1000, base)) & set(sample_seeds("eval", 1000, other))
    all_purposes = [set(sample_seeds(p, 1000, 3)) for p in ("eval", "search", "grid", "analysis")]
    assert len(set().union(*all_purposes)) == 4000


def test_sample_seeds_errors():
    with pytest.raises(KeyError, match="purpose"):
        sample_seeds("train", 10)
    with pytest.raises(ValueError):
        sample_seeds("eval", SEED_SPACE_SIZE + 1)


def test_derive_seed_is_stable_and_purpose_specific():
    a = derive_seed(0, "finetune", "interval-1")
    assert a == derive_seed(0, "finetune", "interval-1")
    assert 0 <= a < 2**31
    others = {derive_seed(0, "finetune", "interval-2"), derive_seed(1, "finetune", "interval-1"),
              derive_seed(0, "pretrain"), derive_seed(0, "finetune", "plain")}
    assert a not in others and len(others) == 4
    # pinned value: the seed must not change across versions/machines (sha256 of the repr)
    import hashlib
    digest = hashlib.sha256(repr((0, "finetune", "interval-1")).encode()).digest()
    assert a == int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
    assert derive_seed(0, "data") == 1281045198
