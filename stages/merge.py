"""Stage `merge`: task-vector merge of the N interval models with searched weights (docs/paper.md §1.8).

tau_i = theta_i - theta (EMA weights; theta includes identity projections), theta_merged = theta +
sum_i w_i tau_i. The weights come from a coarse-to-fine search scored by FID on a proxy sample set whose
seeds are disjoint from the final evaluation's. `merge.search: grid` is the paper's full grid; the tiny
default `coordinate` is a cheap cyclic coarse-to-fine. Every candidate's proxy FID goes to
plots/<profile>/merge_search.csv and MLflow; scored candidates are kept in .ckpt/ so a killed search
resumes without rescoring.

Text-to-image (`--t2i`): the task vectors of the interval UNets, scored by FID on the COCO prompts of the
`coco_proxy` set (disjoint from the evaluated 30K; FID-5K on sd14, Appendix A) against the statistics of
those prompts' own images (stats/<profile>/fid_coco_search_*, left out of the evaluation's COCO reference),
with the evaluation's sampler and guidance.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import StageError, run_stage  # noqa: E402


def search_seed(ctx, s, base, spaces, refs):
    """One training seed: the task vectors of its interval models and the weight search on proxy FID.
    Returns (merged model, best weights, its proxy FID, the pretrained model's proxy FID, scored rows)."""
    import json

    from deme.evaluation import fid_of_model
    from deme.io import sample_seeds
    from deme.merge import Scorer, merged_model, search, task_vector
    from deme.models import load_model, model_meta
    from deme.paths import Paths
    from deme.resume import ScoreLog, content_id, state_digest, stats_id
    from deme.text2image import proxy_fid_scorer

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    d, m = cfg.deme, cfg.merge
    models = []
    for i in d.intervals:
        meta = model_meta(paths.interval(i, s))
        if bool(meta.get("channel_projection")) != d.channel_projection:
            raise StageError(f"{paths.interval(i, s)} was trained with channel_projection="
                             f"{meta.get('channel_projection')}, params say {d.channel_projection}; rerun finetune")
        models.append(load_model(paths.interval(i, s)))
    base_state = base.state_dict()
    vectors = [task_vector(mod.state_dict(), base_state) for mod in models]
    del models
    seeds = sample_seeds("search", m.proxy_samples, cfg.seed)
    # resumable log of scored candidates, valid only for the same models and search settings
    # what every score depends on: settings, base weights, task vectors, references (t2i: the COCO statistics)
    reference = stats_id(refs) if refs is not None else content_id(paths.bench_stats("coco_search", next(iter(spaces))))
    log = ScoreLog(paths.ckpt("merge") / f"scores-seed{s}.jsonl",
                   json.dumps([cfg.to_dict()["merge"], cfg.to_dict()["sample"], cfg.to_dict()["pipeline"],
                               cfg.to_dict()["schedule"], state_digest(base_state), [state_digest(v) for v in vectors],
                               reference, cfg.seed]))
    cache = log.load()
    if cache:
        ctx.note(f"[resume] seed {s}: {len(cache)} scored candidates reused from {log.path}")
    if ctx.is_main:
        log.start()
    order = [0]

    def on_new(w, fid, phase):
        if not ctx.is_main:
            return
        log.append(w, fid)
        order[0] += 1
        ctx.run.log_metrics({f"proxy_fid_seed{s}": fid}, step=order[0])
        print(f"  seed {s} candidate {order[0]:3d} {phase:8s} w=({', '.join(f'{x:.3f}' for x in w)})  proxy FID {fid:.4f}")

    def image_score(w):
        # every process scores its share of the samples and gets the same FID, so all take the same path
        return fid_of_model(merged_model(base, vectors, w), seeds, cfg, spaces, refs, ctx.device,
                            desc="merge candidate")

    if cfg.task == "t2i":
        proxy_fid = proxy_fid_scorer(cfg, paths, spaces, ctx.device)
        score = lambda w: proxy_fid(merged_model(base, vectors, w))  # noqa: E731
    else:
        score = image_score
    scorer = Scorer(score, cache, on_new)
    pretrained_fid = scorer((0.0,) * d.n, "reference")  # all w = 0 is the pretrained model
    best = search(scorer, d.n, m)
    merged = merged_model(base, vectors, best) if ctx.is_main else None
    return merged, best, scorer.cache[best], pretrained_fid, scorer.rows, log


def body(ctx):
    import time

    import pandas as pd

    from deme.evaluation import feature_spaces, load_references
    from deme.io import atomic_write_text, write_json
    from deme.models import load_pretrained, save_model
    from deme.paths import Paths
    from deme.projection import add_channel_projection

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    d, m = cfg.deme, cfg.merge
    base = load_pretrained(cfg)
    if d.channel_projection:
        add_channel_projection(base)
    spaces = feature_spaces(cfg, ctx.device, headline=True)  # the search is scored in the headline mode
    # scored against images disjoint from the evaluation's reference (t2i: the proxy prompts' images,
    # deme.text2image.proxy_fid_scorer)
    refs = load_references(cfg, spaces, search=True) if cfg.task == "image" else None
    t0, results = time.perf_counter(), []
    for s in range(d.seeds):
        results.append(search_seed(ctx, s, base, spaces, refs))
    if not ctx.is_main:
        return
    from deme.io import atomic_dir

    rows = []
    with atomic_dir(paths.merged()) as tmp:
        for s, (merged, best, best_fid, _, scored, _) in enumerate(results):
            save_model(merged, tmp / f"seed-{s}", cfg, method="deme-merged", weights=list(best), proxy_fid=best_fid,
                       seed_index=s)
            rows += [{"seed": s, "candidate": len(rows) + k + 1, **{f"w{i + 1}": w[i] for i in range(d.n)},
                      "proxy_fid": f, "phase": ph} for k, (w, f, ph) in enumerate(scored)]
    atomic_write_text(paths.curve("merge_search"), pd.DataFrame(rows).to_csv(index=False))
    weights = [list(r[1]) for r in results]
    write_json(paths.metrics("merge"), {
        "weights": weights, "proxy_fid": [r[2] for r in results], "proxy_fid_pretrained": results[0][3],
        "seeds": d.seeds, "candidates": [len(r[4]) for r in results], "proxy_samples": m.proxy_samples,
        "search": m.search, "search_reference": "disjoint from the evaluation's (stats/<profile>/"
                             + ("fid_coco_search_*)" if cfg.task == "t2i" else "fid_search_*)")})
    ctx.run.log_metrics({"best_proxy_fid": results[0][2], "pretrained_proxy_fid": results[0][3],
                         "wall_s": time.perf_counter() - t0})
    ctx.run.log_params({"merged_weights": weights})
    ctx.run.log_artifact(paths.curve("merge_search"), "search")
    version = ctx.run.register_model(paths.merged(0), f"{cfg.profile}-merged",
                                     tags={"profile": cfg.profile, "weights": weights[0], "proxy_fid": results[0][2],
                                           "intervals": d.n})
    if version:
        ctx.note(f"MLflow model registry: {cfg.profile}-merged version {version} (training seed 0)")
    for s, (_, best, best_fid, pre, scored, log) in enumerate(results):
        ctx.note(f"seed {s}: best weights {tuple(round(x, 3) for x in best)}: proxy FID {best_fid:.4f} "
                 f"(pretrained {pre:.4f}; {len(scored)} candidates)")
        log.path.unlink(missing_ok=True)
    for p in (paths.merged(), paths.curve("merge_search"), paths.metrics("merge")):
        ctx.wrote(p)


if __name__ == "__main__":
    sys.exit(run_stage("merge", __doc__, body, tags=lambda c, a: {"method": "deme-merged"},
                       params=lambda c, a: {k: c.to_dict()[k] for k in ("seed", "merge", "sample", "deme")
                                            + (("pipeline",) if c.task == "t2i" else ())}))
