"""Stage `report`: regenerate reports/<profile>/report.md (+ PNG figures) from DVC-tracked metrics.

Table 1 with our measured FIDs beside the paper's (labelled as the paper's), the merge-search result,
the feature network and data floor, training curves, sample grids, Table 4 (measured cost of the ensemble
and the merged model beside the paper's quoted mixture-of-experts rows), the analysis figures of the
`analyze` stages (Fig. 1a, 2, 4, 6a, 6b, 7, the x0 sequence view) and the claims table.

With --sweep: reports/<profile>_sweep/report.md, Table 3 and Fig. 8 from the sweep runs of sweeps/dvc.yaml
and the claims table with the ablation's evidence.

With --t2i: reports/<t2i profile>/report.md, Table 2 (COCO / ImageNet FID and CLIP, PartiPrompts CLIP) for
every text-to-image profile that has been run, the CLIP model's caption-ranking accuracy, the pretrained
pipeline's VAE, the merge search, training curves, the prompt-by-model grid and sample grids. Reads only files that DVC tracks,
so `dvc repro` alone regenerates it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def write_page(ctx, out_dir, build, artifacts=lambda f: True):
    """Build a page into a fresh folder that replaces ``out_dir`` only when complete; log it to MLflow."""
    from deme.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        text, *rest = build(tmp)
        (tmp / "report.md").write_text(text)
        for f in sorted(tmp.iterdir()):
            if artifacts(f):
                ctx.run.log_artifact(f, "report")
    ctx.wrote(out_dir / "report.md")
    return rest


def body(ctx):
    from deme.io import write_json
    from deme.report.pages import image_page, t2i_page

    cfg = ctx.cfg
    page = t2i_page if cfg.task == "t2i" else image_page
    summ, = write_page(ctx, Path("reports") / cfg.profile, lambda tmp: page(cfg, tmp),
                       artifacts=lambda f: cfg.task == "t2i" or f.suffix in (".png", ".md"))
    write_json(Path("metrics") / f"{cfg.profile}.json", summ)
    ctx.wrote(Path("metrics") / f"{cfg.profile}.json", "the profile's summary metrics: dvc metrics show")


def sweep_report(ctx):
    """reports/<profile>_sweep/report.md: Table 3, Fig. 8 and the claims table with the sweep's evidence."""
    from deme.io import write_json
    from deme.paths import Paths
    from deme.report.ablation import load_runs
    from deme.report.pages import sweep_page
    from deme.report.summary import sweep_summary

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    runs = load_runs(paths.sweep_metrics("x").parent)
    write_json(Path("metrics") / f"{cfg.profile}_sweep.json", sweep_summary(runs))
    ctx.wrote(Path("metrics") / f"{cfg.profile}_sweep.json", "the sweep's summary metrics: dvc metrics show")
    pre = runs.pop("pretrained", None)
    write_page(ctx, paths.sweep_report_dir, lambda tmp: (sweep_page(cfg, runs, pre, tmp),))


def main_body(ctx):
    if ctx.args.sweep:
        return sweep_report(ctx)
    return body(ctx)


if __name__ == "__main__":
    sys.exit(run_stage("report", __doc__, main_body, item=lambda a: "sweep" if a.sweep else None,
                       add_args=lambda ap: ap.add_argument(
        "--sweep", action="store_true", help="the sweep report (Table 3, Fig. 8, claims): reports/<profile>_sweep/")))
