"""Benchmark: cost of a DeMe training step (consistency loss + channel-wise projection) relative to a
plain step at the same batch, measured in one run on the profile's architecture. Target: at most 1.4x.

    python bench/step_overhead.py [--params params.yaml] [--steps 30] [--batch 64]
"""
import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from deme.config import load_config  # noqa: E402
from deme.models import build_unet  # noqa: E402
from deme.objectives import EpsObjective  # noqa: E402
from deme.projection import add_channel_projection  # noqa: E402
from deme.schedule import alphas_cumprod  # noqa: E402


def time_steps(model, objective, x0, steps: int, warmup: int = 3) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _ = objective(model, x0, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=None, help="default: finetune.batch_size")
    args = ap.parse_args()
    cfg = load_config(args.params)
    batch = args.batch or cfg.finetune.batch_size
    torch.manual_seed(0)
    base = build_unet(cfg).train()
    r = cfg.data.resolution
    x0 = torch.rand(batch, 3, r, r) * 2 - 1
    ab = alphas_cumprod(cfg.schedule).float()
    T = cfg.schedule.num_train_timesteps

    plain = time_steps(copy.deepcopy(base), EpsObjective(ab, 0, T), x0, args.steps)
    teacher = copy.deepcopy(base).requires_grad_(False).eval()
    student = add_channel_projection(copy.deepcopy(base))
    n = cfg.deme.n
    deme = time_steps(student, EpsObjective(ab, 0, T // n, p=cfg.deme.p, teacher=teacher), x0, args.steps)
    proj_only = time_steps(add_channel_projection(copy.deepcopy(base)), EpsObjective(ab, 0, T), x0, args.steps)
    print(f"profile {cfg.profile}, batch {batch}, {args.steps} steps each, {torch.get_num_threads()} threads")
    print(f"{'step':34s} {'s/step':>8s} {'ratio':>7s}")
    print(f"{'plain (eps-MSE)':34s} {plain:8.4f} {1.0:7.2f}")
    print(f"{'projection only':34s} {proj_only:8.4f} {proj_only / plain:7.2f}")
    print(f"{'DeMe (consistency + projection)':34s} {deme:8.4f} {deme / plain:7.2f}   target <= 1.40")


if __name__ == "__main__":
    main()
