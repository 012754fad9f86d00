"""Figures of the report (matplotlib, PNG), drawn from DVC-tracked CSV/JSON, never from live models."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path, pdf: bool = False) -> Path:
    """Write the PNG (and with ``pdf`` the PDF of the same stem, without a timestamp: same data, same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), metadata={"CreationDate": None})
    plt.close(fig)
    return path


def training_curves(plots_dir: Path, path: Path) -> Path | None:
    """Loss against step: the pretraining run, and every finetuning run (interval models and controls)."""
    pre = plots_dir / "pretrain.csv"
    runs = sorted(plots_dir.glob("finetune-*.csv"))
    if not runs and not pre.exists():
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    if pre.exists():
        df = pd.read_csv(pre)
        axes[0].plot(df["step"], df["loss"], color="k")
    axes[0].set(title="pretraining (from scratch)", xlabel="step", ylabel="ε-MSE", yscale="log")
    for csv in runs:
        df = pd.read_csv(csv)
        y = df["loss_eps"] if "loss_eps" in df else df["loss"]
        axes[1].plot(df["step"], y, label=csv.stem.removeprefix("finetune-"))
    axes[1].set(title="finetuning: ε-MSE on each run's own timesteps", xlabel="step", ylabel="ε-MSE",
                yscale="log")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def merge_search(csv: Path, path: Path) -> Path | None:
    if not csv.exists():
        return None
    df = pd.read_csv(csv)
    title = "merge-weight search"
    if "seed" in df and df["seed"].nunique() > 1:  # one search per training seed: show the first
        df, title = df[df["seed"] == df["seed"].min()], f"merge-weight search, training seed {df['seed'].min()}"
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for phase, g in df.groupby("phase", sort=False):
        ax.scatter(g["candidate"], g["proxy_fid"], label=phase, s=22)
    ref = df[df["phase"] == "reference"]
    if len(ref):
        ax.axhline(float(ref["proxy_fid"].iloc[0]), color="gray", ls="--", lw=1, label="pretrained (w = 0)")
    best = df.loc[df["proxy_fid"].idxmin()]
    ax.scatter([best["candidate"]], [best["proxy_fid"]], marker="*", s=180, color="gold", edgecolor="k",
               zorder=5, label="selected")
    ax.set(xlabel="candidate (scoring order)", ylabel="proxy FID", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def weightings(path: Path) -> Path:
    """lambda_eps(t) of every reweighting baseline on the DDPM linear and the SD scaled_linear schedules."""
    from deme.config import ScheduleConfig
    from deme.schedule import alphas_cumprod
    from deme.weighting import SCHEMES, epsilon_weights

    schedules = {"DDPM linear (1e-4..0.02)": ScheduleConfig(),
                 "Stable Diffusion scaled_linear": ScheduleConfig(beta_start=0.00085, beta_end=0.012,
                                                                 beta_schedule="scaled_linear")}
    labels = {"uniform": "uniform (DDPM simple)", "min_snr": "Min-SNR-5", "p2": "P2 (k=1, γ=1)",
              "snr_plus_one": "SNR+1", "trunc_snr": "truncated SNR"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (title, sched) in zip(axes, schedules.items()):
        ab = alphas_cumprod(sched)
        for scheme in SCHEMES:
            ax.plot(epsilon_weights(scheme, ab).numpy(), label=labels[scheme])
        ax.set(title=title, xlabel="timestep t", yscale="log")
    axes[0].set_ylabel("weight on the ε-MSE, λ_ε(t)")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def prompt_grid(samples_dir: Path, models: list[tuple[str, str]], prompts: list[str], path: Path) -> Path | None:
    """The prompt-by-model grid: one row per model (its ``<key>-prompts.png`` strip from the evaluate stage,
    same prompts and seeds for every model), the prompts as column titles."""
    import textwrap

    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [(label, samples_dir / f"{key}-prompts.png") for key, label in models]
    rows = [(label, p) for label, p in rows if p.exists()]
    if not rows or not prompts:
        return None
    strips = [np.asarray(Image.open(p).convert("RGB")) for _, p in rows]
    h, w = strips[0].shape[:2]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(8, 1.6 * len(prompts)), 1.5 * len(rows) + 1.2), squeeze=False)
    for ax, (label, _), strip in zip(axes[:, 0], rows, strips):
        ax.imshow(strip)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    cell = w / len(prompts)
    top = axes[0, 0]
    top.set_xticks([cell * (i + 0.5) for i in range(len(prompts))])
    top.set_xticklabels(["\n".join(textwrap.wrap(p, 18)) for p in prompts], fontsize=7)
    top.xaxis.tick_top()
    return _save(fig, path)


def fid_chart(summary: dict, path: Path, key: str = "fid", label: str = "FID") -> Path | None:
    """Each method's mean with its 95 % interval (error bar) and n; the pretrained model's interval as a band."""
    rows = [(m, v) for m, v in summary.items() if key in v]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(rows) + 1.2))
    for i, (m, v) in enumerate(rows):
        lo, hi = v.get(f"{key}_lo", v[key]), v.get(f"{key}_hi", v[key])
        ax.errorbar(v[key], i, xerr=[[v[key] - lo], [hi - v[key]]], fmt="o", capsize=3,
                    color="C3" if m in ("ensemble", "merged") else "C0")
    if "pretrained" in summary and f"{key}_lo" in summary["pretrained"]:
        p = summary["pretrained"]
        ax.axvspan(p[f"{key}_lo"], p[f"{key}_hi"], color="0.85", zorder=0, label="pretrained, 95 % interval")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{m} (n={v.get('n', 1)})" for m, v in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} (lower is better), mean and 95 % interval")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def sample_strips(samples_dir: Path, names: list[str], path: Path, rows: int, suffix: str = "") -> Path | None:
    """One row per model: the first row of its sample grid (``rows`` rows of equal height; the same initial
    noise for every model), labelled with the model's name."""
    from PIL import Image

    found = [(n, samples_dir / f"{n}{suffix}.png") for n in names if (samples_dir / f"{n}{suffix}.png").exists()]
    if not found:
        return None
    strips = []
    for name, f in found:
        img = np.asarray(Image.open(f).convert("RGB"))
        strips.append((name, img[: int(np.ceil(img.shape[0] / rows))]))
    fig, axes = plt.subplots(len(strips), 1, figsize=(8, 1.0 * len(strips) + 0.2), squeeze=False)
    for ax, (name, strip) in zip(axes[:, 0], strips):
        ax.imshow(strip)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
