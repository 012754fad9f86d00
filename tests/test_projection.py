"""Channel-wise projection (docs/paper.md §1.5): identity at init, placement, counts, deepcopy, state dict."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from conftest import make_tiny_unet, randomize_
from deme.projection import (ATTR, add_channel_projection, has_channel_projection, projected_blocks,
                             projection_parameters)


def _inputs(seed=0, n=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _out(model, x, t):
    with torch.no_grad():
        return model(x, t).sample


@pytest.fixture
def unet():
    return randomize_(make_tiny_unet(), seed=1)


def test_identity_at_init_gives_bitwise_equal_output(unet):
    x = _inputs()
    ts = [0, 1, 249, 500, 999]
    before = {t: _out(unet, x, t) for t in ts}
    before_vec = _out(unet, x, torch.tensor([3, 400, 998]))
    add_channel_projection(unet)
    assert has_channel_projection(unet)
    for t in ts:
        after = _out(unet, x, t)
        assert torch.equal(after, before[t]), f"t={t}: max diff {(after - before[t]).abs().max()}"
    assert torch.equal(_out(unet, x, torch.tensor([3, 400, 998])), before_vec)


def test_number_of_layers_and_parameters(unet):
    add_channel_projection(unet)
    blocks = projected_blocks(unet)
    names = [n for n, _ in blocks]
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert len(blocks) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
    widths = [getattr(b, ATTR).weight.shape[0] for _, b in blocks]
    # down 8, 16; mid 16; up 16, 8 (block_out_channels = (8, 16))
    assert widths == [8, 16, 16, 16, 8]
    assert projection_parameters(unet) == sum(c * c for c in widths) == 64 + 256 + 256 + 256 + 64


def test_projection_layers_are_bias_free_identity_1x1_convs(unet):
    add_channel_projection(unet)
    convs = [getattr(b, ATTR) for _, b in projected_blocks(unet)]
    assert len(convs) == 5
    for conv in convs:
        assert isinstance(conv, nn.Conv2d)
        assert conv.kernel_size == (1, 1)
        assert conv.bias is None
        c = conv.in_channels
        assert conv.out_channels == c
        assert torch.equal(conv.weight.detach()[:, :, 0, 0], torch.eye(c))
        assert conv.weight.requires_grad


def test_projection_counts_toward_parameters(unet):
    n0 = sum(p.numel() for p in unet.parameters())
    add_channel_projection(unet)
    assert sum(p.numel() for p in unet.parameters()) == n0 + projection_parameters(unet)


def test_idempotent(unet):
    add_channel_projection(unet)
    n1 = sum(p.numel() for p in unet.parameters())
    hooks1 = sum(len(b._forward_hooks) for _, b in projected_blocks(unet))
    x = _inputs()
    ref = _out(unet, x, 10)
    with torch.no_grad():  # a non-identity projection: a doubled hook would apply it twice
        getattr(unet.mid_block, ATTR).weight.mul_(2.0)
    once = _out(unet, x, 10)
    assert add_channel_projection(unet) is unet
    assert sum(p.numel() for p in unet.parameters()) == n1
    assert sum(len(b._forward_hooks) for _, b in projected_blocks(unet)) == hooks1 == 5
    assert torch.equal(_out(unet, x, 10), once)
    assert not torch.equal(once, ref)


def test_no_projection_before_insertion(unet):
    assert not has_channel_projection(unet)
    assert projection_parameters(unet) == 0


@pytest.mark.parametrize("block", ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"])
def test_perturbing_any_projection_changes_output(unet, block):
    add_channel_projection(unet)
    x = _inputs()
    ref = _out(unet, x, 300)
    conv = getattr(unet.get_submodule(block), ATTR)
    with torch.no_grad():
        conv.weight[0, 0] += 0.5
        conv.weight[1, 0] += 0.3
    assert not torch.allclose(_out(unet, x, 300), ref)


def test_down_block_skip_tensors_are_not_projected(unet):
    """Only the main path is projected: the residual tuple of a down block is passed on unchanged."""
    add_channel_projection(unet)
    block = unet.down_blocks[0]
    captured = {}
    h = block.register_forward_hook(lambda m, a, o: captured.setdefault("out", o))
    with torch.no_grad():
        getattr(block, ATTR).weight.mul_(3.0)
        unet(_inputs(), 5)
    h.remove()
    hidden, residuals = captured["out"]
    # the last residual of a DownBlock2D is the (unprojected) main-path output after the downsampler
    assert torch.allclose(hidden, 3.0 * residuals[-1])


def test_deepcopy_uses_its_own_projections(unet):
    add_channel_projection(unet)
    x = _inputs()
    ref = _out(unet, x, 600)
    clone = copy.deepcopy(unet)
    assert torch.equal(_out(clone, x, 600), ref)
    with torch.no_grad():
        getattr(clone.mid_block, ATTR).weight.mul_(0.5)
    assert not torch.allclose(_out(clone, x, 600), ref)
    assert torch.equal(_out(unet, x, 600), ref), "perturbing the copy changed the original"
    assert getattr(clone.mid_block, ATTR).weight.data_ptr() != getattr(unet.mid_block, ATTR).weight.data_ptr()


def test_state_dict_contains_projection_keys_and_loads_strictly(unet):
    add_channel_projection(unet)
    sd = unet.state_dict()
    keys = sorted(k for k in sd if ATTR in k)
    assert keys == sorted(f"{n}.{ATTR}.weight" for n, _ in projected_blocks(unet))
    # a projected state dict round-trips into a freshly projected model, and the function follows
    with torch.no_grad():
        sd[f"mid_block.{ATTR}.weight"].mul_(1.5)
    other = add_channel_projection(make_tiny_unet(seed=7))
    other.load_state_dict(sd, strict=True)
    x = _inputs()
    unet.load_state_dict(sd)
    assert torch.equal(_out(other, x, 42), _out(unet, x, 42))


def test_projection_follows_model_dtype():
    m = make_tiny_unet().to(torch.float64)
    add_channel_projection(m)
    assert all(getattr(b, ATTR).weight.dtype == torch.float64 for _, b in projected_blocks(m))


def test_save_and_load_model_keeps_projections(unet, tmp_path):
    from deme.config import config_from_mapping
    from deme.models import load_model, model_meta, save_model

    add_channel_projection(unet)
    with torch.no_grad():
        getattr(unet.up_blocks[1], ATTR).weight.mul_(1.25)
    x = _inputs()
    ref = _out(unet, x, 123)
    save_model(unet, tmp_path / "m", config_from_mapping({"profile": "micro"}), method="test")
    assert model_meta(tmp_path / "m")["channel_projection"] is True
    loaded = load_model(tmp_path / "m")
    assert has_channel_projection(loaded)
    assert projection_parameters(loaded) == projection_parameters(unet)
    assert torch.equal(_out(loaded, x, 123), ref)


LSUN_KW = dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                 "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"))


def test_lsun_church_parameter_count_matches_paper():
    """docs/paper.md §1.5: 13 layers, 4*128^2 + 4*256^2 + 5*512^2 = 1,638,400; 113.67M -> 115.31M."""
    from diffusers import UNet2DModel

    t0 = time.perf_counter()
    model = UNet2DModel(**LSUN_KW)
    if time.perf_counter() - t0 > 5:
        pytest.skip("building the LSUN-256 UNet took more than 5 s on this machine")
    n0 = sum(p.numel() for p in model.parameters())
    add_channel_projection(model)
    widths = [getattr(b, ATTR).weight.shape[0] for _, b in projected_blocks(model)]
    assert widths == [128, 128, 256, 256, 512, 512, 512, 512, 512, 256, 256, 128, 128]
    assert projection_parameters(model) == 1_638_400
    n1 = sum(p.numel() for p in model.parameters())
    assert round(n0 / 1e6, 2) == 113.67
    assert round(n1 / 1e6, 2) == 115.31
