"""The epsilon-prediction objective of DeMe and of plain finetuning (docs/paper.md §1.3-1.4, Eq. 5).

    L_i = E_{t ~ pi_i} [ ||eps - eps_theta_i(x_t, t)||^2 + lambda_c ||eps_theta(x_t, t) - eps_theta_i(x_t, t)||^2 ]

Plain finetuning is the same objective on the whole range [0, T) with p = 0 and no teacher, so the
ablations of Table 3 are only switches of this one object. Both MSEs are means over batch, channels and
pixels (official code) and are computed in fp32 whatever the training precision.

The loss-reweighting baselines (docs/paper.md §2.1) are this objective with per-timestep ``weights`` on the
per-sample epsilon-MSE (``deme.weighting.epsilon_weights``); ``loss_eps`` stays the unweighted MSE so that
curves compare across methods.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deme.schedule import sample_timesteps


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (the forward process of every objective)."""
    ab = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


@dataclass
class EpsObjective:
    alphas_cumprod: torch.Tensor  # [T], from the noise schedule
    lo: int = 0  # the interval [lo, hi) this model is trained on
    hi: int = 1000
    p: float = 0.0  # probability of a global timestep draw (Eq. 6)
    granularity: str = "batch"
    antithetic: bool = True
    teacher: nn.Module | None = None  # frozen pretrained model for the consistency loss
    consistency_weight: float = 1.0
    weights: torch.Tensor | None = None  # lambda_eps(t) [T] of a reweighting baseline, or None

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(self.alphas_cumprod, x0, noise, t)

    def __call__(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator, cond: dict | None = None):
        t = sample_timesteps(x0.shape[0], self.lo, self.hi, p=self.p, num_timesteps=self.num_timesteps,
                             granularity=self.granularity, antithetic=self.antithetic,
                             generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        xt = self.noisy(x0, noise, t)
        cond = cond or {}  # text-to-image: the prompt's encoder_hidden_states, for the teacher too
        pred = model(xt, t, **cond).sample.float()
        loss_eps = F.mse_loss(pred, noise.float())
        terms = {"loss_eps": loss_eps.detach()}
        if self.weights is None:
            loss = loss_eps
        else:  # lambda_eps(t) * per-sample MSE, averaged over the batch (fp32)
            per_sample = (pred - noise.float()).pow(2).flatten(1).mean(1)
            loss = (self.weights.to(x0.device, torch.float32)[t] * per_sample).mean()
        if self.teacher is not None and self.consistency_weight > 0:
            with torch.no_grad():
                target = self.teacher(xt, t, **cond).sample.float()
            loss_consistency = F.mse_loss(pred, target)
            loss = loss + self.consistency_weight * loss_consistency
            terms["loss_consistency"] = loss_consistency.detach()
        terms["loss"] = loss.detach()
        return loss, terms
