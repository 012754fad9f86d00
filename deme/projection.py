"""Channel-wise projection (docs/paper.md §1.5).

A bias-free 1x1 convolution ``P(F) = W F`` (W in R^{CxC}, identity at init) applied to the main-path hidden
state after every down block, the mid block and every up block of a diffusers UNet. Skip tensors are not
projected and conv_out is untouched, so at initialisation the augmented network computes exactly the
function of the original one. The projection of a block lives on the block itself (``<block>.channel_proj``)
and a module-level forward hook applies it, so the layers appear in the state dict, survive deepcopy,
and merge like any other weight (tau(W) = W_i - I; they are kept, not folded, in the merged model).
"""
from __future__ import annotations

import torch
from torch import nn

ATTR = "channel_proj"


def identity_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    return conv


def _project_output(block: nn.Module, args, output):
    proj = getattr(block, ATTR)
    if isinstance(output, tuple):  # down blocks return (hidden_states, residual tuple): project the first
        return (proj(output[0]),) + tuple(output[1:])
    return proj(output)


def _out_channels(block: nn.Module) -> int:
    return block.resnets[-1].out_channels


def projected_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every down, mid and up block, in forward order."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return blocks


def add_channel_projection(unet: nn.Module) -> nn.Module:
    """Insert identity-initialised projections in place; returns ``unet``. Idempotent."""
    if has_channel_projection(unet):
        return unet
    ref = next(unet.parameters())
    for _, block in projected_blocks(unet):
        block.add_module(ATTR, identity_conv(_out_channels(block)).to(device=ref.device, dtype=ref.dtype))
        block.register_forward_hook(_project_output)
    return unet


def has_channel_projection(unet: nn.Module) -> bool:
    return any(hasattr(b, ATTR) for _, b in projected_blocks(unet))


def projection_parameters(unet: nn.Module) -> int:
    return sum(getattr(b, ATTR).weight.numel() for _, b in projected_blocks(unet) if hasattr(b, ATTR))
