"""Stage `report`: regenerate reports/<profile>/report.md (+ PNG figures) from DVC-tracked metrics.

Table 1 with our measured FIDs beside the paper's (labelled as the paper's), the merge-search result,
the feature network and data floor, training curves and sample grids; Table 2 (text-to-image: COCO /
ImageNet FID and CLIP, PartiPrompts CLIP) for every text-to-image profile that has been run, with the
prompt-by-model grid of the `t2i:` profile of params.yaml. Reads only files that DVC tracks,
so `dvc repro` alone regenerates it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def text_to_image_section(ctx, metrics, tmp, read):
    """Table 2 (PAPER.md §3.2) for the measured text-to-image profiles and the prompt-by-model grid."""
    from deme.config import ConfigError, load_config
    from deme.report import figures
    from deme.report.paper import paper_table
    from deme.report.tables import TABLE2_ROWS, measured_profiles, table2

    profiles = measured_profiles(metrics, "t2i")
    if not profiles:
        return ["## Table 2: text-to-image", "", "No text-to-image profile has been evaluated yet "
                "(`dvc repro t2i_evaluate` runs the `t2i:` profile of params.yaml).", ""]
    try:
        current = load_config(ctx.args.params, "t2i").profile
    except ConfigError:
        current = profiles[0]
    n = {p: len(read(p, "merge.json").get("weights", [])) for p in profiles}
    pre = read(current, "evaluate", "pretrained.json")
    clip = read(current, "clip.json")
    lines = [
        "## Table 2: zero-shot text-to-image (FID and CLIP score)",
        "",
        f"{paper_table('table2')['title']} is the paper's (labelled *(paper)*); *(ours)* columns are measured by "
        "this pipeline for each text-to-image profile that has been run, the delta against that profile's "
        "pretrained model in brackets, best per column in bold. CLIP score = 100 x cosine of normalised "
        "open_clip embeddings.",
        "",
        f"`{current}`: {pre.get('sampler', '?')}-{pre.get('steps', '?')}, guidance {pre.get('guidance_scale', '?')}, "
        f"one image per prompt from per-prompt seeds shared by every model; prompts: "
        + ", ".join(f"{b} {c}" for b, c in pre.get("prompts", {}).items())
        + f"; FID at {pre.get('fid_resolution', '?')}x{pre.get('fid_resolution', '?')} in feature space "
        f"`{pre.get('feature_net', '?')}`, CLIP model `{pre.get('clip_model', '?')}`"
        + (f" (trained by the clip stage: it ranks the true caption above a wrong one on "
           f"{clip.get('heldout_images', '?')} held-out images with accuracy {clip['ranking_accuracy']:.3f})"
           if "ranking_accuracy" in clip else "") + ".",
        "",
        table2(metrics, n),
        "",
    ]
    prompts = pre.get("grid_prompts", [])
    models = [(k, label) for k, label, _ in TABLE2_ROWS]
    if figures.prompt_grid(Path("samples") / current, models, prompts, tmp / f"prompt_grid_{current}.png"):
        lines += [f"### Prompt-by-model grid (`{current}`, same seed per prompt for every model)", "",
                  f"![prompt grid](prompt_grid_{current}.png)", ""]
    return lines


def body(ctx):
    import json
    import shutil

    from deme.io import atomic_dir
    from deme.report import figures
    from deme.report.paper import paper_numbers
    from deme.report.tables import SINGLE_MODEL, collect_fid, paper_only_rows, table1

    cfg, prof = ctx.cfg, ctx.cfg.profile
    metrics = Path("metrics")

    def read(*parts):
        p = metrics.joinpath(*parts)
        return json.loads(p.read_text()) if p.exists() else {}

    merge = read(prof, "merge.json")
    n_by_profile = {p.name: len(read(p.name, "merge.json").get("weights", [])) or cfg.deme.n
                    for p in metrics.iterdir() if p.is_dir()}
    out_dir = Path("reports") / prof
    with atomic_dir(out_dir) as tmp:
        figs = {"curves": figures.training_curves(Path("plots") / prof, tmp / "training_curves.png"),
                "weights": figures.weightings(tmp / "weightings.png"),
                "search": figures.merge_search(Path("plots") / prof / "merge_search.csv", tmp / "merge_search.png")}
        grids = []
        plain, *baselines = SINGLE_MODEL
        for name in ("data", "pretrained", plain, "ensemble", "merged", *baselines, "buffer"):
            src = Path("samples") / prof / f"{name}.png"
            if src.exists():
                shutil.copy(src, tmp / f"samples_{name}.png")
                grids.append(name)
        fid = collect_fid(metrics, [prof])[prof]
        feat, ref = read(prof, "featnet.json"), read(prof, "fid_ref.json")
        ev = {k: read(prof, "evaluate", f"{k}.json") for k in ("pretrained", "plain", "ensemble", "merged")}
        measured = [b for b in baselines if b in fid and fid[b] == fid[b]]
        beat = [b for b in measured if fid[b] < fid.get("plain", float("nan"))]

        def verdict(a, b):
            if any(k not in fid or fid[k] != fid[k] for k in (a, b)):
                return "not measured"
            return f"**{'yes' if fid[a] < fid[b] else 'no'}** ({fid[a]:.3f} vs {fid[b]:.3f})"

        sample = ev["pretrained"] or next((v for v in ev.values() if v), {})
        lines = [
            f"# DeMe Suite report: profile `{prof}`",
            "",
            "Generated by `dvc repro` (stage `report`) from DVC-tracked metrics. Columns marked *(ours)* are "
            "measured by this pipeline; columns marked *(paper)* are the paper's reported numbers "
            f"({paper_numbers()['source']}), shown for reference only. "
            + ("The tiny profiles use their own feature network, so their FIDs are on a different scale from the "
               "paper's Inception FIDs: compare directions and orderings, not values."
               if cfg.fid.feature_net == "featnet" else
               f"FID is Inception-v3 in clean-fid mode `{cfg.fid.modes[0]}` (comparable with the paper's "
               "pytorch-fid when legacy_pytorch); every mode's value is in metrics/<profile>/evaluate/*.json."),
            "",
            "## Table 1: FID of the pretrained, finetuned, ensemble and merged models",
            "",
            f"Sampler: {sample.get('sampler', '?').upper()}-{sample.get('steps', '?')}, eta {sample.get('eta', '?')}, "
            f"{sample.get('num_samples', '?')} samples per model from the same per-image seeds; FID against "
            f"{ref.get('num_ref', '?')} {'held-out' if ref.get('reference', 'ref') == 'ref' else 'training'} reference "
            f"images in feature space "
            f"`{ref.get('feature_net', '?')}` (sha256 {str(ref.get('feature_net_sha256', '?'))[:12]}…). "
            "Best per column in bold (the floor is excluded)."
            + (" The paper samples with eta 0; this profile uses eta "
               f"{sample.get('eta')} because its short-trained pretrained model predicts x0 worse than the data "
               "mean at t >= 900, which deterministic DDIM turns into grey backgrounds (see deme/profiles.py; "
               "`dvc exp run -S sample.eta=0` reproduces that setting)." if sample.get("eta") else ""),
            "",
            table1(metrics, n_by_profile),
            "",
            f"- DeMe merged beats the pretrained model: {verdict('merged', 'pretrained')}",
            f"- DeMe merged beats the plain-finetuning control: {verdict('merged', 'plain')}",
            f"- DeMe ensemble beats the pretrained model: {verdict('ensemble', 'pretrained')}",
            f"- DeMe merged beats the ensemble (the paper's DDPM claim): {verdict('merged', 'ensemble')}",
            f"- baselines that beat the plain-finetuning control: "
            f"{', '.join(beat) if beat else 'none'} (of {len(measured)} measured)",
            "",
            "All single-model methods train on all timesteps for N x the per-interval iterations with the same "
            "optimiser, EMA, data and number of training seeds (matched budget); wall times are per training "
            "seed on this machine.",
            "",
            *(["Rows of the paper's Table 1 that this profile does not run (the paper's numbers only):", "",
               paper_only_rows(), ""] if paper_only_rows() else []),
            "### Loss weightings of the baselines (PAPER.md §2.1)",
            "",
            "![weightings](weightings.png)",
            "",
            "## Merge-weight search",
            "",
        ]
        if merge:
            w = ", ".join(f"{x:.3f}" for x in merge["weights"])
            code_w = ", ".join(str(x) for x in paper_numbers()["merge_weights_code"]["weights"])
            lines += [
                f"Search `{merge['search']}` over {merge['candidates']} candidates, each scored by FID on "
                f"{merge['proxy_samples']} proxy samples whose seeds are disjoint from the evaluation's.",
                "",
                f"- selected weights (I1 … I{len(merge['weights'])}, low to high noise): ({w})",
                f"- proxy FID: selected {merge['proxy_fid']:.4f}, pretrained (all w = 0) "
                f"{merge['proxy_fid_pretrained']:.4f}",
                f"- for reference, the only published weights (official code, LSUN-Church, N=4): ({code_w})",
                "",
            ]
            if figs["search"]:
                lines += ["![merge search](merge_search.png)", ""]
        lines += [
            "## Feature network and data floor",
            "",
            "| quantity | value (ours) |", "|---|---|",
            *([f"| held-out accuracy: {k.removeprefix('accuracy_')} | {v:.3f} |" for k, v in feat.items()]
              if cfg.fid.feature_net == "featnet" else
              [f"| Inception-v3 ({mode}) | sha256 {str(sha)[:16]}… |" for mode, sha in feat.items()]),
            *[f"| data-vs-data floor FID, {key.removeprefix('fid_floor_')} ({ref.get('num_floor', '?')} "
              f"{'training' if ref.get('reference', 'ref') == 'ref' else 'held-out'} images vs the reference) | "
              f"{value:.4f} |" for key, value in ref.items() if key.startswith("fid_floor_")],
            "",
            "## Training curves",
            "",
        ]
        if figs["curves"]:
            lines += ["![training curves](training_curves.png)", ""]
        lines += ["## Samples (same initial noise for every model)", ""]
        for g in grids:
            lines += [f"**{g}**", "", f"![{g}](samples_{g}.png)", ""]
        lines += text_to_image_section(ctx, metrics, tmp, read)
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
        for f in tmp.iterdir():
            if f.suffix == ".png":
                ctx.run.log_artifact(f, "report")
        ctx.run.log_artifact(tmp / "report.md", "report")
    ctx.wrote(out_dir / "report.md")


if __name__ == "__main__":
    sys.exit(run_stage("report", __doc__, body))
