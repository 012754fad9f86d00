"""Table 3 / Fig. 8 sweep and the claims table: config, budgets, the factorial's main effects, the tables and
the verdict rules, on cases whose answer is known."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from deme.config import ConfigError, config_from_mapping
from deme.profiles import preset


def _cfg(**sweep):
    raw = copy.deepcopy(preset("tiny"))
    raw["sweep"].update(sweep)
    return config_from_mapping(raw)


def test_tiny_sweep_holds_table3_factorial_and_fig8_grid():
    cfg = config_from_mapping(preset("tiny"))
    runs = cfg.sweep.runs
    t3 = {k: r for k, r in runs.items() if r.table3}
    # the paper's 5 rows + A6-A9: N = 1 plain, N = 1 CP, and all 8 PS x CL x CP combinations at N = 8
    assert len(t3) == 10
    combos = {(r.probabilistic_sampling, r.consistency_loss, r.channel_projection) for r in t3.values() if r.n == 8}
    assert len(combos) == 8
    fig8_n = sorted(r.n for r in runs.values() if r.fig8 and r.p is None)
    assert fig8_n == [1, 2, 4, 5, 8, 10]
    fig8_p = sorted(r.p for r in runs.values() if r.fig8 and r.p is not None) + [cfg.deme.p]
    assert sorted(fig8_p) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    assert cfg.sweep.table3_steps == 100  # docs/paper.md §3.3: 100-step DDIM


@pytest.mark.parametrize("run, key", [
    ({"n": 3}, "sweep.runs.bad.n"),  # 3 does not divide 1000
    ({"n": 4, "p": 1.5}, "sweep.runs.bad.p"),
    ({"n": 4, "table3": False, "fig8": False}, "sweep.runs.bad"),
    ({"n": 4, "table3": True, "colour": 1}, "sweep.runs.bad.colour"),
    ({"n": "four", "table3": True}, "sweep.runs.bad.n"),
])
def test_bad_sweep_runs_name_the_key(run, key):
    with pytest.raises(ConfigError) as e:
        _cfg(runs={"bad": {"table3": True, **run}})
    assert e.value.key == key


def test_run_names_must_be_dvc_safe():
    with pytest.raises(ConfigError, match="run names may hold"):
        _cfg(runs={"p0.1": {"n": 4, "fig8": True}})


def test_runs_in_params_replace_the_presets_runs():
    """params.yaml lists the runs dvc.yaml's foreach sees: the preset's other runs must not come back."""
    cfg = config_from_mapping({"profile": "tiny", "sweep": {"runs": {"only": {"n": 2, "fig8": True}}}})
    assert list(cfg.sweep.runs) == ["only"]
    assert len(config_from_mapping({"profile": "tiny"}).sweep.runs) == 23


def test_budgets():
    from deme.sweep import iterations_per_model, variant_config

    cfg = _cfg(budget="total", iterations=0)  # 4 x 100 iterations shared by the N models
    assert [iterations_per_model(cfg, n) for n in (1, 2, 4, 8)] == [400, 200, 100, 50]
    cfg = _cfg(budget="per_model", iterations=0)
    assert [iterations_per_model(cfg, n) for n in (1, 8)] == [100, 100]
    cfg = _cfg(budget="total", iterations=1000)
    v = variant_config(cfg, cfg.sweep.runs["n8_cl"])
    assert v.deme.intervals == list(range(1, 9)) and v.finetune.iterations == 125
    assert not v.deme.probabilistic_sampling and v.deme.consistency_loss and not v.deme.channel_projection
    n1 = variant_config(cfg, cfg.sweep.runs["n1"])
    assert not n1.deme.probabilistic_sampling  # one interval is the whole range: nothing to sample globally
    p = variant_config(cfg, cfg.sweep.runs["n4_p020"])
    assert p.deme.p == 0.2 and variant_config(cfg, cfg.sweep.runs["n4"]).deme.p == cfg.deme.p


def test_variant_equal_to_main_config_trains_the_main_models():
    """The tiny n4 run has the main DeMe settings and the same per-model budget, hence the same objective and
    seeds as the finetune stage: its models must be the main pipeline's interval models."""
    from deme.sweep import variant_config

    cfg = config_from_mapping(preset("tiny"))
    v = variant_config(cfg, cfg.sweep.runs["n4"])
    assert v.deme == cfg.deme and v.finetune.iterations == cfg.finetune.iterations


def _row(n, ps, cl, cp, fid_e, fid_m, steps=100, **kw):
    return {"n": n, "probabilistic_sampling": ps, "consistency_loss": cl, "channel_projection": cp, "p": 0.4,
            "table3": True, "fig8": False, f"fid_ensemble_{steps}": fid_e, f"fid_merged_{steps}": fid_m,
            "iterations_per_model": 50, "iterations_total": 50 * n, "weights": [1.0] * n, **kw}


def _factorial(effect_ps=-1.0, effect_cl=-0.5, effect_cp=0.25, base=10.0):
    runs = {}
    for ps in (0, 1):
        for cl in (0, 1):
            for cp in (0, 1):
                f = base + effect_ps * ps + effect_cl * cl + effect_cp * cp
                runs[f"n8_{ps}{cl}{cp}"] = _row(8, bool(ps), bool(cl), bool(cp), f + 1, f)
    runs["t3_n1"] = _row(1, False, False, False, 12.0, 12.0)
    return runs


def test_main_effects_recover_known_additive_effects():
    from deme.report.ablation import main_effects

    eff = main_effects(_factorial(), 100)
    assert eff["PS"]["merged"] == pytest.approx(-1.0) and eff["PS"]["pairs"] == 4
    assert eff["CL"]["merged"] == pytest.approx(-0.5) and eff["CP"]["ensemble"] == pytest.approx(0.25)


def test_table3_puts_paper_rows_first_with_their_numbers():
    from deme.report.ablation import table3, table3_markdown

    df = table3(_factorial(), 100)
    assert len(df) == 9
    paper = df[df["in the paper"] == "yes"]
    assert list(paper["FID (paper)"]) == [4.40, 4.32, 4.27, 3.87]  # N=1 plain, then N=8 PS, PS+CL, all
    assert df.index[df["run"] == "t3_n1"][0] == 0
    md = table3_markdown(_factorial(), 100, {"fid_100": 13.5})
    assert "13.500" in md and "(paper)" in md and "**8.500**" in md  # best merged: PS+CL on, CP off


def test_fig8_data_and_figure(tmp_path):
    from deme.report.ablation import fig8, fig8_data

    runs = {f"n{n}": {**_row(n, True, True, True, 10 - n / 10, 9 - n / 10, steps=50), "fig8": True, "table3": False}
            for n in (1, 2, 4)}
    runs["p0"] = {**_row(4, True, True, True, 9.9, 9.0, steps=50), "p": 0.0, "fig8": True, "table3": False}
    by_n, by_p = fig8_data(runs, 50, 4, 0.4)
    assert list(by_n["n"]) == [1, 2, 4] and list(by_p["p"]) == [0.0, 0.4]
    png = fig8(runs, 50, 4, 0.4, 11.0, tmp_path / "fig8.png")
    assert png.stat().st_size > 1000 and (tmp_path / "fig8.pdf").stat().st_size > 1000


def test_gradient_agreement_on_a_known_matrix():
    from deme.report.claims import gradient_agreement

    ts = np.arange(0, 1000, 100)
    S = np.cos(np.abs(ts[:, None] - ts[None, :]) / 1000 * np.pi)  # 1 nearby, -1 at the far end
    adj, far = gradient_agreement(S, ts)
    assert adj == pytest.approx(np.cos(0.1 * np.pi)) and far < 0


def test_claims_table_verdicts(tmp_path, monkeypatch):
    """Synthetic features and analysis data whose verdicts are known (deme/stats.py decides every row)."""
    import json

    from deme.io import atomic_write_npz
    from deme.metrics.fid import Stats
    from deme.paths import Paths
    from deme.report.claims import evaluate_claims

    monkeypatch.chdir(tmp_path)
    cfg = config_from_mapping(preset("tiny"))
    paths = Paths("tiny")
    ev = tmp_path / "metrics/tiny/evaluate"
    ev.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Stats.of(rng.normal(0, 1, (5000, 8))).save(paths.fid_ref("clean"))
    noise = [np.random.default_rng(s).normal(0, 1, (600, 8)) for s in range(3)]  # shared evaluation seeds
    for k, shift in {"pretrained": 0.8, "ensemble": 0.5, "merged": 0.1, "plain": 0.6}.items():
        seeds = 1 if k == "pretrained" else 3
        atomic_write_npz(paths.features(k), **{f"seed_{s}": noise[s] + shift + 0.01 * s for s in range(seeds)})
        (ev / f"{k}.json").write_text(json.dumps({"fid": 8 * shift ** 2, "training_seeds": seeds}))
    paths.analysis("x").parent.mkdir(parents=True)
    cos = np.array([[1, 0.05, 0.0, -0.02], [0.05, 1, 0.1, 0], [0, 0.1, 1, 0.03], [-0.02, 0, 0.03, 1]])
    np.savez(paths.analysis("taskvec"), cos=cos, floor=np.array([0.4, 0.45, 0.38, 0.42]),
             norms=np.array([1.0, 1.05, 2.0, 2.1]), intervals=np.array([[0, 250], [250, 500], [500, 750], [750, 1000]]))
    ts = np.arange(0, 1000, 100)
    np.savez(paths.analysis("gradsim"), S=np.cos(np.abs(ts[:, None] - ts[None, :]) / 1000 * np.pi), timesteps=ts,
             samples=np.asarray(8))
    rows = {r["claim"].split(" (")[0]: r for r in evaluate_claims(cfg, paths, runs=_factorial())}
    assert rows["Decoupling helps"]["verdict"] == "not resolved at this budget"  # one-seed sweep runs: no interval
    assert rows["The merged model beats the pretrained model"]["verdict"] == "holds"
    assert rows["The merged model beats the ensemble on DDPM"]["verdict"] == "holds"
    assert rows["The merged model beats the pretrained model"]["seeds"] == "3 / 1"
    assert rows["Every technique"]["verdict"] == "not resolved at this budget"
    assert rows["Task vectors of different intervals are nearly orthogonal"]["verdict"] == "holds"
    assert rows["Task vectors are larger at high noise, t in [T/2, T)"]["verdict"] == "holds"
    assert rows["Adjacent timesteps' gradients agree, distant ones conflict"]["verdict"] == "holds"
    # the reverse: the merged model worse than the ensemble; task vectors as aligned as the seed floor
    atomic_write_npz(paths.features("merged"), **{f"seed_{s}": noise[s] + 0.9 + 0.01 * s for s in range(3)})
    np.savez(paths.analysis("taskvec"), cos=np.full((4, 4), 0.6) + 0.01 * np.eye(4) * np.arange(4),
             floor=np.array([0.2, 0.25, 0.22, 0.21]), norms=np.array([1.0, 1.05, 2.0, 2.1]),
             intervals=np.array([[0, 250], [250, 500], [500, 750], [750, 1000]]))
    agree = np.ones((10, 10)) - 0.01 * rng.random((10, 10))  # every gradient about the same: nothing conflicts
    np.savez(paths.analysis("gradsim"), S=agree, timesteps=ts, samples=np.asarray(8))
    rows = {r["claim"].split(" (")[0]: r for r in evaluate_claims(cfg, paths, runs=_factorial())}
    assert rows["The merged model beats the ensemble on DDPM"]["verdict"] == "does not hold"
    assert rows["Task vectors of different intervals are nearly orthogonal"]["verdict"] == "does not hold"
    assert rows["Adjacent timesteps' gradients agree, distant ones conflict"]["verdict"] == "does not hold"
    none = {r["claim"].split(" (")[0]: r for r in evaluate_claims(cfg, paths, runs={})}
    assert none["Every technique"]["verdict"] == "not resolved at this budget"


def test_geometry_claims_rest_on_every_training_seed():
    """With every seed's geometry, each seed is one draw: the mean cross-interval cosine per seed against the
    floor over every pair of seeds, and the high-minus-low norm gap per seed (t over seeds)."""
    import numpy as np

    from deme.report.claims import _geometry_claims

    bounds = np.array([[0, 250], [250, 500], [500, 750], [750, 1000]])

    names = [f"I{i} s{a}-s{b}" for i in (1, 2, 3, 4) for a, b in ((0, 1), (0, 2), (1, 2))]

    def claims(off, floor_by_pair, norms):
        cos = np.stack([np.full((4, 4), c) + (1 - c) * np.eye(4) for c in off])
        floor = np.tile(floor_by_pair, 4)  # the same floor per seed pair in every interval
        rows = _geometry_claims({"cos": cos[0], "seed_cos": cos, "floor": floor, "floor_names": np.asarray(names),
                                 "intervals": bounds, "seed_norms": np.asarray(norms, np.float64),
                                 "norms": np.asarray(norms[0])}, 1000)
        return [(r["verdict"], r["seeds"]) for r in rows]

    larger_high = [[1.0, 1.1, 2.0, 2.1], [0.9, 1.0, 1.9, 2.2], [1.1, 1.0, 2.1, 1.9]]
    assert claims([0.05, 0.06, 0.04], [0.4, 0.42, 0.38], larger_high) == [("holds", 3), ("holds", 3)]
    larger_low = [n[::-1] for n in larger_high]
    assert claims([0.6, 0.62, 0.61], [0.2, 0.25, 0.22], larger_low) == [("does not hold", 3), ("does not hold", 3)]
    # seeds disagree on the sign: not resolved, even though seed 0 alone shows a clear gap
    mixed = [[1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 1.0, 1.0], [1.5, 1.5, 1.6, 1.6]]
    assert claims([0.05, 0.3, 0.6], [0.3, 0.31, 0.29], mixed) == [("not resolved at this budget", 3)] * 2
    # the floor counts once per seed, not once per interval: seed 0's pairs are as aligned as its intervals
    assert claims([0.30, 0.05, 0.06], [0.3, 0.3, 0.06], larger_high)[0] == ("not resolved at this budget", 3)
    # no spread over seeds: no interval; one interval: no cross-interval cosines
    same = [[1.0, 1.0, 2.0, 2.0]] * 3
    assert claims([0.05, 0.05, 0.05], [0.4, 0.4, 0.4], same) == [("not resolved at this budget", 3)] * 2
    one = _geometry_claims({"cos": np.ones((1, 1)), "floor": np.zeros(0), "intervals": bounds[:1]}, 1000)
    assert [r["verdict"] for r in one] == ["not resolved at this budget"]


@pytest.mark.parametrize("change", ["nothing", "pretrained", "data", "schedule", "threads"])
def test_a_finished_interval_model_is_reused_only_with_the_same_inputs(tmp_path, monkeypatch, change):
    """The sweep's and the analysis's extra interval models keep their finished weights in .ckpt/ across a
    kill; they are reused only when the settings, the pretrained weights, the schedule, the data, the code
    and the thread count are those they were trained with."""
    import dataclasses

    import numpy as np
    import torch

    from deme import sweep
    from tests.conftest import make_tiny_unet, randomize_

    cfg = config_from_mapping(preset("micro"))
    cfg = dataclasses.replace(cfg, deme=dataclasses.replace(cfg.deme, channel_projection=False,
                                                            consistency_loss=False))
    pretrained = {"seed": 0}
    monkeypatch.setattr("deme.models.load_pretrained", lambda c: randomize_(make_tiny_unet(), pretrained["seed"]))
    trained = []
    monkeypatch.setattr("deme.train.train", lambda model, *a, **k: trained.append(1) or model)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    sweep.train_interval(cfg, 1, images, "cpu", tmp_path / "ck")
    threads = torch.get_num_threads()
    if change == "pretrained":
        pretrained["seed"] = 1
    elif change == "data":
        images = images + 1
    elif change == "schedule":
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, beta_end=0.03))
    elif change == "threads":
        torch.set_num_threads(threads + 1)
    try:
        sweep.train_interval(cfg, 1, images, "cpu", tmp_path / "ck")
    finally:
        torch.set_num_threads(threads)
    assert len(trained) == (1 if change == "nothing" else 2)
