"""Diff-Tuning (Zhong et al., NeurIPS 2024; docs/paper.md §6.2-6.3) as a finetuning baseline.

Chain of forgetting: keep the pretrained model's behaviour where it transfers (small t) and adapt where it
does not (large t). Retention weight xi(t) = 1 - t/T (decreasing in t), adaptation weight psi(t) = t/T,
xi + psi = 1 (docs/paper.md §6.2 resolves the letter assignment this way).

- ``buffer`` variant (rebuttal's batch construction, the suite's default): each batch slot draws
  t ~ U{0..T-1}; with probability xi(t) it trains on an image of the retention buffer (pre-sampled from
  the pretrained model), otherwise on a target (training) image; plain epsilon-MSE. An unbiased estimate of
  L_ret + L_adp.
- ``kd`` variant (§6.3): no buffer; target images only, plus kd_weight * xi(t) ||eps_theta - eps_theta0||^2
  towards the frozen pretrained model (kd_weight 0.05).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deme.objectives.deme import add_noise


def retention_weight(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """xi(t) = 1 - t/T: the probability that a slot at timestep t takes a buffer image."""
    return 1.0 - t.double() / num_timesteps


class DiffTuningObjective(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, *, variant: str = "buffer",
                 buffer: torch.Tensor | None = None, teacher: nn.Module | None = None, kd_weight: float = 0.05):
        super().__init__()
        if variant not in ("buffer", "kd"):
            raise ValueError(f"Diff-Tuning variant must be 'buffer' or 'kd', got {variant!r}")
        if variant == "buffer" and (buffer is None or len(buffer) == 0):
            raise ValueError("the buffer variant needs a non-empty retention buffer")
        if variant == "kd" and teacher is None:
            raise ValueError("the kd variant needs the frozen pretrained model")
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.variant, self.kd_weight, self.teacher = variant, kd_weight, teacher
        self.buffer = buffer  # float [n, 3, H, W] in [-1, 1], kept on the CPU

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, batch with buffer images swapped in, mask of buffer slots)."""
        T = len(self.alphas_cumprod)
        b = x0.shape[0]
        t = torch.randint(0, T, (b,), generator=generator)
        use_buffer = torch.zeros(b, dtype=torch.bool)
        if self.variant == "buffer":
            use_buffer = torch.rand(b, generator=generator, dtype=torch.float64) < retention_weight(t, T)
            idx = torch.randint(0, len(self.buffer), (b,), generator=generator)
            if use_buffer.any():
                x0 = x0.clone()
                x0[use_buffer.to(x0.device)] = self.buffer[idx[use_buffer]].to(x0.device, x0.dtype)
        return t, x0, use_buffer

    def forward(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator, cond: dict | None = None):
        if cond and self.variant == "buffer":
            raise ValueError("the Diff-Tuning buffer variant has no prompts for its buffer images; "
                             "text-to-image profiles use baselines.difftuning.variant: kd")
        cond = cond or {}
        t, x0, use_buffer = self.draw(x0, generator)
        t = t.to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        xt = add_noise(self.alphas_cumprod, x0, noise, t)
        pred = model(xt, t, **cond).sample.float()
        loss_eps = F.mse_loss(pred, noise.float())
        loss = loss_eps
        terms = {"loss_eps": loss_eps.detach(), "buffer_fraction": use_buffer.float().mean()}
        if self.variant == "kd":
            with torch.no_grad():
                target = self.teacher(xt, t, **cond).sample.float()
            xi = retention_weight(t, len(self.alphas_cumprod)).to(x0.device, torch.float32)
            kd = (xi * (pred - target).pow(2).flatten(1).mean(1)).mean()
            loss = loss + self.kd_weight * kd
            terms["loss_kd"] = kd.detach()
        terms["loss"] = loss.detach()
        return loss, terms
