"""ANT baselines: timestep intervals as multi-task-learning tasks (Go et al., NeurIPS 2023; docs/paper.md §2.2).

K uniform intervals (default 5); every micro-batch is split equally across the K tasks, t uniform inside
each task's interval, and L_j is task j's mean epsilon-MSE.

- UW (Kendall et al.): loss = sum_j 1/2 (exp(-s_j) L_j / K + s_j), learnable log-variances s_j (init 0)
  in their own AdamW group (lr 0.025, no weight decay).
- Nash-MTL: every ``update_every`` steps, the K per-task gradients g_j give the Gram matrix G = g g^T
  (normalised by its Frobenius norm); alpha solves the Nash-bargaining system G alpha = 1/alpha, alpha > 0,
  warm-started from the previous alpha; loss = sum_j alpha_j L_j / K between solves.

The Nash system is the stationarity condition of the strictly convex f(alpha) = 1/2 alpha^T G alpha -
sum_j log alpha_j, so :func:`nash_weights` minimises f by damped Newton steps that keep alpha > 0. This
replaces the reference code's cvxpy/ECOS concave-convex iterations with a dependency-free solver of the
same system.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deme.objectives.deme import add_noise


def nash_weights(gram: np.ndarray, alpha0: np.ndarray | None = None, tol: float = 1e-10,
                 max_iter: int = 100) -> np.ndarray:
    """The alpha > 0 with G alpha = 1 / alpha (G symmetric positive definite)."""
    G = np.asarray(gram, dtype=np.float64)
    k = G.shape[0]
    G = G + 1e-10 * np.trace(G) / k * np.eye(k)  # guard a singular Gram matrix (parallel gradients)
    a = np.ones(k) / np.sqrt(max(np.trace(G) / k, 1e-12)) if alpha0 is None else np.asarray(alpha0, np.float64)
    a = np.where(a > 0, a, 1.0)

    def f(x):
        return 0.5 * x @ G @ x - np.log(x).sum()

    for _ in range(max_iter):
        grad = G @ a - 1.0 / a
        if np.max(np.abs(grad * a)) < tol:  # relative residual of alpha_j (G alpha)_j = 1
            break
        hess = G + np.diag(1.0 / a**2)
        step = np.linalg.solve(hess, grad)
        s = 1.0
        while np.any(a - s * step <= 0) or f(a - s * step) > f(a) - 1e-4 * s * grad @ step:
            s *= 0.5
            if s < 1e-12:
                break
        a = a - s * step
    return a


class ANTObjective(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, num_tasks: int = 5, mode: str = "uw",
                 update_every: int = 25, uw_lr: float = 0.025):
        super().__init__()
        if mode not in ("uw", "nash"):
            raise ValueError(f"ANT mode must be 'uw' or 'nash', got {mode!r}")
        T = len(alphas_cumprod)
        if T % num_tasks:
            raise ValueError(f"K={num_tasks} tasks must divide T={T}")
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.num_tasks, self.mode, self.update_every, self.uw_lr = num_tasks, mode, update_every, uw_lr
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))  # UW s_j
        self.register_buffer("alpha", torch.ones(num_tasks))  # Nash weights
        self.calls = 0

    def param_groups(self) -> list[dict]:
        return [{"params": [self.log_vars], "lr": self.uw_lr, "weight_decay": 0.0}] if self.mode == "uw" else []

    def extra_state(self) -> dict:
        return {"alpha": self.alpha.tolist(), "calls": self.calls, "log_vars": self.log_vars.tolist()}

    def load_extra_state(self, state: dict) -> None:
        self.alpha.copy_(torch.tensor(state["alpha"]))
        self.calls = int(state["calls"])
        with torch.no_grad():
            self.log_vars.copy_(torch.tensor(state["log_vars"]))

    def task_timesteps(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t and task index per sample: the batch split as equally as possible across the K tasks."""
        K, T = self.num_tasks, len(self.alphas_cumprod)
        if batch < K:
            raise ValueError(f"micro-batch {batch} < num_tasks {K}: every ANT task needs at least one sample")
        task = torch.arange(batch) * K // batch  # contiguous equal shares
        width = T // K
        t = task * width + torch.randint(0, width, (batch,), generator=generator)
        return t, task

    def forward(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator, cond: dict | None = None):
        t, task = self.task_timesteps(x0.shape[0], generator)
        t, task = t.to(x0.device), task.to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        pred = model(add_noise(self.alphas_cumprod, x0, noise, t), t, **(cond or {})).sample.float()
        per_sample = (pred - noise.float()).pow(2).flatten(1).mean(1)
        K = self.num_tasks
        losses = torch.stack([per_sample[task == j].mean() for j in range(K)])
        terms = {"loss_eps": F.mse_loss(pred, noise.float()).detach()}
        if self.mode == "uw":
            s = self.log_vars
            loss = (0.5 * (torch.exp(-s) * losses / K + s)).sum()
            terms.update({f"uw_s{j + 1}": s[j].detach() for j in range(K)})
        else:
            if self.calls % self.update_every == 0:
                self._update_alpha(model, losses)
            loss = (self.alpha.to(losses.device) * losses).sum() / K
            terms.update({f"nash_alpha{j + 1}": self.alpha[j] for j in range(K)})
        self.calls += 1
        terms["loss"] = loss.detach()
        return loss, terms

    def _update_alpha(self, model: nn.Module, losses: torch.Tensor) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = []
        for j in range(self.num_tasks):  # K extra backward passes every update_every steps
            g = torch.autograd.grad(losses[j], params, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().double()
                                    for x, p in zip(g, params)]))
        g = torch.stack(grads)
        gram = (g @ g.T).cpu().numpy()
        gram = gram / max(np.linalg.norm(gram), 1e-30)
        alpha = nash_weights(gram, self.alpha.double().cpu().numpy())
        self.alpha.copy_(torch.as_tensor(alpha, dtype=torch.float32))
