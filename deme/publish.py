"""Publish a from-scratch pretraining as the profile's checkpoint, the way google/ddpm-cifar10-32 is published:
the weights (safetensors) and configs in checkpoints/<profile>/pretrained, and a model card with the settings,
the code commit, the steps, the wall time and the FID-vs-steps curve.

    dvc repro checkpoints/dvc.yaml    # hours on a CPU: models/<profile>/from-scratch/{model,curve.csv,metrics.json}
    python -m deme.publish            # -> checkpoints/<profile>/{pretrained/,MODEL_CARD.md,fid_curve.png}

The default pipeline's `pretrain` stage then imports checkpoints/<profile>/pretrained (model.local_path).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

KEEP = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")


def convergence(curve: list[list[float]]) -> dict:
    """FID at the last step against FID at half the steps (the closest curve point): the relative change of
    the last doubling of the pretraining, the issue's convergence criterion (< 5 %)."""
    last_step, last = curve[-1]
    half_step, half = min(curve, key=lambda p: abs(p[0] - last_step / 2))
    return {"steps": int(last_step), "fid": last, "half_steps": int(half_step), "fid_at_half": half,
            "last_doubling_change": (last - half) / half}


def fid_curve_png(curve: list[list[float]], floor: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    ax.plot([s for s, _ in curve], [f for _, f in curve], "o-", ms=3, label="EMA model")
    if floor:
        ax.axhline(floor, color="gray", ls="--", lw=1, label=f"data-vs-data floor {floor:.2f}")
    ax.set(xlabel="pretraining step", ylabel="FID (featnet)", yscale="log", title="FID vs pretraining steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def model_card(cfg, metrics: dict, lock: dict, floor: float | None, commit: str) -> str:
    import yaml

    conv = convergence(metrics["fid_curve"])
    settings = {k: cfg.to_dict()[k] for k in ("seed", "data", "schedule", "pretrain", "sample")}
    settings["runtime"] = {k: cfg.to_dict()["runtime"][k] for k in ("num_threads", "cpu_kernels")}
    settings["model"] = {"unet": cfg.to_dict()["model"]["unet"]}
    rows = "\n".join(f"| {int(s)} | {f:.3f} |" for s, f in metrics["fid_curve"])
    ratio = f"{conv['fid'] / floor:.1f}x" if floor else "?"
    converged = ("converged (a change under 5 %)" if abs(conv["last_doubling_change"]) < 0.05 else
                 "**not converged** (the criterion: a change under 5 %)")
    return f"""# `{cfg.profile}` pretrained checkpoint

The embedded stand-in for `google/ddpm-cifar10-32`: a diffusers `UNet2DModel` ({metrics['parameters']:,}
parameters) trained from scratch by the suite's own pretraining (`stages/pretrain.py --from-scratch`,
`checkpoints/dvc.yaml`) on the profile's {cfg.data.num_train:,} generated {cfg.data.resolution}x{cfg.data.resolution}
shapes; DDPM, T = {cfg.schedule.num_train_timesteps}, linear betas, epsilon prediction, EMA weights. The default
`dvc repro` imports `pretrained/` (params `model.local_path`) as the paper-scale profiles import the hub checkpoints.

| | |
|---|---|
| steps | {metrics['iterations']:,} (batch {cfg.pretrain.batch_size}) |
| wall time | {metrics['wall_s'] / 3600:.2f} h on {metrics.get('threads', '?')} CPU thread(s) (2-core machine) |
| CPU kernels | `runtime.cpu_kernels: {cfg.runtime.cpu_kernels}` (deme/numerics.py) |
| final training loss | {metrics['loss']:.5f} |
| FID (EMA, {cfg.pretrain.eval_samples} samples, {cfg.sample.sampler.upper()}-{cfg.sample.steps}, eta {cfg.sample.eta}) | {conv['fid']:.3f} |
| data-vs-data floor | {floor if floor is None else f'{floor:.3f}'} ({ratio} the floor) |
| FID change over the last doubling ({conv['half_steps']:,} → {conv['steps']:,} steps) | {conv['last_doubling_change']:+.1%}: {converged} |
| code | commit `{commit}` |
| weights sha256 | `{lock.get('sha256', '?')}` |

The FID is measured on the same {cfg.pretrain.eval_samples} noise seeds at every point (purpose `curve`, disjoint
from the evaluation's), in the featnet space of `models/{cfg.profile}/featnet`, against the held-out reference.

## FID vs pretraining steps

![FID vs steps](fid_curve.png)

| step | FID |
|---|---|
{rows}

## Re-create it

```bash
dvc repro checkpoints/dvc.yaml   # {metrics['wall_s'] / 3600:.1f} h here
python -m deme.publish           # copies it here and rewrites this card
```

`tests/test_publish.py` checks that the first {cfg.pretrain.log_every} steps of this pretraining reproduce the
logged loss bit for bit on the machine it runs on ({cfg.runtime.num_threads} CPU thread(s) and the
`{cfg.runtime.cpu_kernels}` CPU kernels, as it ran).

## Settings

```yaml
{yaml.safe_dump(settings, sort_keys=False, width=120).rstrip()}
```
"""


def first_logged_loss(profile: str = "tiny") -> tuple[int, float]:
    """Re-run the first `pretrain.log_every` steps of the profile's from-scratch pretraining (its preset, the
    data the prepare stage makes, its thread count and CPU kernels) and return (step, logged mean loss). Run it
    in a fresh process: the CPU kernels are fixed at the first torch operation."""
    import dataclasses

    import torch

    from deme.config import config_from_mapping
    from deme.data.shapes import generate_shapes
    from deme.io import derive_seed
    from deme.models import build_unet
    from deme.numerics import pin_cpu_kernels
    from deme.objectives import EpsObjective
    from deme.profiles import preset
    from deme.schedule import alphas_cumprod
    from deme.train import set_threads, train

    cfg = config_from_mapping(preset(profile))
    pin_cpu_kernels(cfg.runtime.cpu_kernels)
    set_threads(cfg.runtime.num_threads)
    data = generate_shapes(cfg.data.num_train, derive_seed(cfg.seed, "data", "train"), cfg.data.resolution)
    seed = derive_seed(cfg.seed, "pretrain")
    torch.manual_seed(seed)
    model = build_unet(cfg)
    objective = EpsObjective(alphas_cumprod(cfg.schedule).float(), 0, cfg.schedule.num_train_timesteps)
    logged = {}
    steps = cfg.pretrain.log_every
    budget = dataclasses.replace(cfg.pretrain, iterations=steps, eval_every=0)  # the LR schedule is step-wise
    train(model, objective, data.images, budget, seed=seed, device=torch.device("cpu"),
          log=lambda m, s: logged.setdefault(s, m), desc="reproduce")
    return steps, logged[steps]["loss"]


def publish(params: str = "params.yaml", commit: str | None = None) -> Path:
    import hashlib
    import json

    from deme.config import load_config
    from deme.io import atomic_dir, git_commit
    from deme.paths import Paths

    cfg = load_config(params)
    paths = Paths(cfg.profile)
    src = paths.from_scratch
    metrics_path = src / "metrics.json"
    if not (src / "model").is_dir() or not metrics_path.exists():
        raise FileNotFoundError(f"{src}: no from-scratch pretraining to publish; make it with: "
                                f"dvc repro checkpoints/dvc.yaml")
    metrics = json.loads(metrics_path.read_text())
    timing = src / "timing.json"  # wall time per run segment, beside the outputs (a clock is not an input)
    segments = json.loads(timing.read_text()) if timing.exists() else (
        [{"wall_s": metrics["wall_s"], "threads": metrics.get("threads", "?")}] if "wall_s" in metrics else [])
    metrics = {**metrics, "wall_s": sum(s["wall_s"] for s in segments) if segments else float("nan"),
               "threads": "/".join(sorted({str(s["threads"]) for s in segments})) or "?"}
    if not metrics.get("fid_curve"):
        raise ValueError(f"{metrics_path}: no FID curve (pretrain.eval_every was 0); nothing shows convergence")
    ref = Paths(cfg.profile).metrics("fid_ref")
    floor = json.loads(ref.read_text()).get("fid_floor") if ref.exists() else None
    weights = src / "model" / "diffusion_pytorch_model.safetensors"
    lock = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    dest = paths.published
    with atomic_dir(dest / "pretrained") as tmp:
        for name in KEEP:
            if (src / "model" / name).exists():
                shutil.copyfile(src / "model" / name, tmp / name)  # the umask's mode, not the cache's
    fid_curve_png(metrics["fid_curve"], floor, dest / "fid_curve.png")
    (dest / "MODEL_CARD.md").write_text(model_card(cfg, metrics, lock, floor, commit or git_commit()))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deme.publish", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--commit", help="the code commit the pretraining ran at (default: the checkout's HEAD)")
    args = ap.parse_args(argv)
    try:
        dest = publish(args.params, args.commit)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published {dest}/pretrained, {dest}/MODEL_CARD.md, {dest}/fid_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
