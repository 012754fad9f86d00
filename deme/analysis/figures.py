"""The analysis figures (docs/paper.md §4), one function per figure.

Each ``fn(npz_path, png_path) -> png_path`` reads only the .npz written from the matching ``compute_*``
result (``np.savez(path, **result)``) and writes a PNG and a PDF with the same stem (docs/paper.md §4, general
conventions: plotting is cheap, testable and never touches a model).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deme.analysis.gradsim import off_diagonal  # noqa: E402

DIVERGING = "RdBu_r"  # blue = low / negative, red = high / positive
LANDSCAPE = "coolwarm"  # Fig. 4: blue = low loss, red = high loss


def _save(fig, png_path: Path | str) -> Path:
    """Write ``png_path`` and the PDF of the same stem; returns the PNG path."""
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    fig.savefig(png.with_suffix(".pdf"), metadata={"CreationDate": None})  # no timestamp: same data, same file
    plt.close(fig)
    return png


def _load(npz_path: Path | str) -> dict[str, np.ndarray]:
    with np.load(npz_path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[plt.Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


# ----------------------------------------------------------------------------------------------------

def fig1a(npz_path: Path | str, png_path: Path | str) -> Path:
    """Fig. 1(a): the heatmap of S = cos(g_t, g_t'), and the off-diagonal histograms for pairs in [0, T)
    and in [0, T/4) with their means."""
    d = _load(npz_path)
    S, ts = d["S"], d["timesteps"]
    T = int(d["num_train_timesteps"]) if "num_train_timesteps" in d else int(ts.max()) + 1
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax0.imshow(S, cmap=DIVERGING, vmin=-1, vmax=1, interpolation="nearest")
    ticks = np.unique(np.linspace(0, len(ts) - 1, min(len(ts), 6)).round().astype(int))
    ax0.set_xticks(ticks, [str(ts[i]) for i in ticks])
    ax0.set_yticks(ticks, [str(ts[i]) for i in ticks])
    ax0.set(xlabel="timestep t'", ylabel="timestep t", title="cos(g_t, g_t')")
    fig.colorbar(im, ax=ax0, fraction=0.046)
    sketch = int(d.get("sketch_dim", 0))
    note = f"sketch d={sketch}" if sketch else "exact gradients"
    for lo, hi, color in ((0, T, "tab:blue"), (0, T // 4, "tab:orange")):
        vals = off_diagonal(S, ts, lo, hi)
        if len(vals):
            ax1.hist(vals, bins=50, range=(-1, 1), density=True, alpha=0.55, color=color,
                     label=f"pairs in [{lo},{hi}): mean {vals.mean():.3f} (n={len(vals)})")
    ax1.set(xlabel="cosine similarity (off-diagonal)", ylabel="density",
            title=f"{len(ts)} timesteps, {int(d.get('samples', 0))} images, {note}")
    ax1.legend(fontsize=8)
    return _save(fig, png_path)


def fig2(npz_path: Path | str, png_path: Path | str) -> Path:
    """Fig. 2: (a) the representative layer's channel profiles a_pre, a_post and Delta_a, and spatial
    profiles s_pre, s_post and Delta_s; (b) the histograms of all Delta_a and Delta_s (medians in legend)."""
    d = _load(npz_path)
    layer = str(d["layer"])
    fig = plt.figure(figsize=(15, 7))
    gs = fig.add_gridspec(2, 4)
    c = np.arange(len(d["a_pre"]))
    ax = fig.add_subplot(gs[0, :2])
    ax.bar(c - 0.2, d["a_pre"], width=0.4, label="pre-finetuning")
    ax.bar(c + 0.2, d["a_post"], width=0.4, label="post-finetuning")
    ax.set(xlabel="channel", ylabel="mean over (h, w)", title=f"(a) channel profile a, {layer}")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(gs[0, 2:])
    ax.bar(c, d["da_rep"], color="tab:red")
    ax.set(xlabel="channel", ylabel="|Δa| / mean|a_pre|", title="(a) channel difference Δa")
    s_lim = float(max(np.abs(d["s_pre"]).max(), np.abs(d["s_post"]).max(), 1e-12))
    for col, (key, title) in enumerate((("s_pre", "spatial profile s, pre"), ("s_post", "s, post"))):
        ax = fig.add_subplot(gs[1, col])
        im = ax.imshow(d[key], cmap=DIVERGING, vmin=-s_lim, vmax=s_lim)
        ax.set(title=f"(a) {title}", xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(gs[1, 2])
    im = ax.imshow(d["ds_rep"], cmap="Reds", vmin=0)
    ax.set(title="(a) |Δs| / mean|s_pre|", xticks=[], yticks=[])
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(gs[1, 3])
    da, ds = d["da"], d["ds"]
    top = float(max(da.max(initial=0), ds.max(initial=0), 1e-12))
    bins = np.linspace(0, top, 60)
    ax.hist(da, bins=bins, alpha=0.6, density=True, label=f"Δa (channel), median {np.median(da):.3g}")
    ax.hist(ds, bins=bins, alpha=0.6, density=True, label=f"Δs (spatial), median {np.median(ds):.3g}")
    ax.set(yscale="log", xlabel="normalised difference", ylabel="density",
           title=f"(b) all {len(d['layers'])} layers")
    ax.legend(fontsize=7)
    return _save(fig, png_path)


def fig4(npz_path: Path | str, png_path: Path | str, ncols: int = 5) -> Path:
    """Fig. 4: the eps-MSE on the filter-normalised random plane, one filled-contour panel per timestep
    range (per-panel colour scale), the pretrained model marked at the origin."""
    d = _load(npz_path)
    xs, ys, loss, ranges = d["xs"], d["ys"], d["loss"], d["ranges"]
    fig, axes = _grid(len(ranges), ncols, (3.6, 3.3))
    for ax, z, (lo, hi) in zip(axes.flat, loss, ranges):
        cf = ax.contourf(xs, ys, z, levels=20, cmap=LANDSCAPE)
        ax.contour(xs, ys, z, levels=10, colors="k", linewidths=0.4, alpha=0.6)
        ax.plot([0], [0], marker="*", ms=12, color="gold", mec="k", ls="none", label="θ (pretrained)")
        ax.set(title=f"t ∈ [{lo}, {hi})", xlabel="α (direction 1)", ylabel="β (direction 2)", aspect="equal")
        fig.colorbar(cf, ax=ax, fraction=0.046, label="ε-MSE")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    return _save(fig, png_path)


def fig6a(npz_path: Path | str, png_path: Path | str, ncols: int = 3) -> Path:
    """Fig. 6(a): the loss surface on the plane of each pair of task vectors, with theta, theta_a,
    theta_b and the merged model's projection annotated."""
    d = _load(npz_path)
    names, pairs, point_names = [str(n) for n in d["names"]], d["pairs"], [str(n) for n in d["point_names"]]
    fig, axes = _grid(len(pairs), ncols, (4.2, 3.8))
    markers = {"θ": ("*", "gold"), "θ_a": ("o", "tab:green"), "θ_b": ("s", "tab:purple"), "merged": ("D", "w")}
    for p, (ax, (a, b)) in enumerate(zip(axes.flat, pairs)):
        cf = ax.contourf(d["xs"][p], d["ys"][p], d["loss"][p], levels=20, cmap=LANDSCAPE)
        ax.contour(d["xs"][p], d["ys"][p], d["loss"][p], levels=10, colors="k", linewidths=0.4, alpha=0.6)
        labels = {"θ": "θ (pretrained)", "θ_a": f"θ_{names[a]}", "θ_b": f"θ_{names[b]}",
                  "merged": "merged (proj.)"}
        for m, pname in enumerate(point_names):
            (x, y), marker = d["points"][p, m], markers.get(pname, ("x", "k"))
            ax.plot([x], [y], marker=marker[0], color=marker[1], mec="k", ms=9, ls="none")
            ax.annotate(f"{labels.get(pname, pname)}\n{d['point_loss'][p, m]:.4g}", (x, y), fontsize=7,
                        xytext=(7, 7), textcoords="offset points")
        ax.set(title=f"plane of τ_{names[a]}, τ_{names[b]}", xlabel="u = τ_a/‖τ_a‖",
               ylabel="v (orthogonal to u)", aspect="equal")
        fig.colorbar(cf, ax=ax, fraction=0.046, label="ε-MSE, t ~ U[0, T)")
    return _save(fig, png_path)


def _boxes(ax, quantiles: np.ndarray, labels: list[str], groups: list[str], floor: float) -> None:
    """Boxes of precomputed (min, q1, median, q3, max) [N, L, 5], one colour per model, grouped by layer."""
    n = len(quantiles)
    width = 0.8 / n
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, n))
    for i in range(n):
        stats = [{"whislo": max(q[0], floor), "q1": max(q[1], floor), "med": max(q[2], floor),
                  "q3": max(q[3], floor), "whishi": max(q[4], floor), "label": ""} for q in quantiles[i]]
        pos = np.arange(len(groups)) + (i - (n - 1) / 2) * width
        art = ax.bxp(stats, positions=pos, widths=width * 0.9, showfliers=False, patch_artist=True)
        for box in art["boxes"]:
            box.set(facecolor=colors[i], alpha=0.8)
        ax.plot([], [], color=colors[i], lw=6, label=labels[i])
    ax.set_xticks(np.arange(len(groups)), groups, rotation=60, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="|τ| (whiskers: min, max)")
    ax.legend(fontsize=8)


def fig6b(npz_path: Path | str, png_path: Path | str) -> Path:
    """Fig. 6(b): per-layer box plots of |tau_i| on a log scale, one colour per interval model, and the
    pooled low-noise vs high-noise view when stored. Entries equal to 0 are drawn at a floor of
    1e-3 x the smallest positive stored quantile (a log axis cannot show 0)."""
    d = _load(npz_path)
    groups = [str(g) for g in d["groups"]]
    labels = [f"{n} [{lo},{hi})" for n, (lo, hi) in zip(d["names"], d["intervals"])]
    q = d["abs_quantiles"]
    positive = q[q > 0]
    floor = float(positive.min()) * 1e-3 if positive.size else 1e-12
    pooled = "pooled_names" in d
    ncols = 2 if pooled else 1
    fig, axes = plt.subplots(1, ncols, figsize=(max(8, 0.7 * len(groups) * ncols), 4.6), squeeze=False)
    _boxes(axes[0, 0], q, labels, groups, floor)
    axes[0, 0].set_title("task-vector magnitudes per layer")
    if pooled:
        _boxes(axes[0, 1], d["pooled_abs_quantiles"], [f"pooled {n}" for n in d["pooled_names"]], groups, floor)
        axes[0, 1].set_title("pooled: low noise vs high noise")
    return _save(fig, png_path)


def fig7(npz_path: Path | str, png_path: Path | str) -> Path:
    """Fig. 7: the N x N task-vector cosine matrix (annotated), each off-diagonal pair against the seed
    noise floor(s), and the per-layer cosines of each pair."""
    d = _load(npz_path)
    names, cos = [str(n) for n in d["names"]], d["cos"]
    groups, layer_cos = [str(g) for g in d["groups"]], d["layer_cos"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    ax = axes[0]
    im = ax.imshow(cos, cmap=DIVERGING, vmin=-1, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("cos(τ_i, τ_j), all parameters")
    fig.colorbar(im, ax=ax, fraction=0.046)
    iu = np.triu_indices(len(names), k=1)
    pair_labels = [f"{names[i]}–{names[j]}" for i, j in zip(*iu)]
    ax = axes[1]
    ax.bar(range(len(pair_labels)), cos[iu], color="tab:blue", label="between intervals")
    floor = np.asarray(d["floor"], np.float64)
    if len(floor) > 3:  # many seed pairs: their mean and range, not one line each
        ax.axhspan(floor.min(), floor.max(), color="tab:red", alpha=0.15,
                   label=f"seed noise floor, {len(floor)} pairs: {floor.min():.3f} to {floor.max():.3f}")
        ax.axhline(floor.mean(), color="tab:red", ls="--", label=f"its mean {floor.mean():.3f}")
    else:
        for k, (fname, fval) in enumerate(zip(d["floor_names"], floor)):
            ax.axhline(fval, color=plt.cm.tab10(3 + k), ls="--", label=f"seed noise floor {fname}: {fval:.3f}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(pair_labels)), pair_labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="cosine", title="pairs vs the same-interval, different-seed cosine")
    ax.legend(fontsize=7)
    ax = axes[2]
    rows = np.stack([layer_cos[:, i, j] for i, j in zip(*iu)]) if pair_labels else np.zeros((0, len(groups)))
    im = ax.imshow(rows, cmap=DIVERGING, vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(pair_labels)), pair_labels, fontsize=8)
    ax.set_title("per-layer cosine of each pair")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, png_path)


def fig_sequence(npz_path: Path | str, png_path: Path | str, n_images: int = 1) -> Path:
    """The x̂0 sequence view: rows = models, columns = the recorded timestep at the end of each interval
    (high noise first); each cell stacks the first ``n_images`` images of the batch vertically."""
    d = _load(npz_path)
    images, names, ts, intervals = d["images"], [str(n) for n in d["names"]], d["timesteps"], d["intervals"]
    M, K, B = images.shape[:3]
    n = max(1, min(n_images, B))
    fig, axes = plt.subplots(M, K, figsize=(1.7 * K + 1.2, 1.7 * n * M + 0.6), squeeze=False)
    for m in range(M):
        for k in range(K):
            ax = axes[m, k]
            ax.imshow(np.concatenate(list(images[m, k, :n]), axis=0))
            ax.set_xticks([])
            ax.set_yticks([])
            if m == 0:
                lo, hi = intervals[k]
                ax.set_title(f"t={ts[k]}\nend of [{lo},{hi})", fontsize=8)
            if k == 0:
                ax.set_ylabel(names[m], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("x̂0 predictions from the same initial noise", fontsize=10)
    return _save(fig, png_path)
