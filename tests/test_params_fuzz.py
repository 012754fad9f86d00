"""Bad input fuzz: every malformed params file fails before any work, with one line naming the key.

Table-driven (issue 8, part 3). Each case is one malformed input:

- MAPPING cases: overrides merged over a profile (wrong types at many keys, out-of-range values, bad enum
  strings, unknown keys with and without a "did you mean", unknown profiles, sweep.runs entries, analysis.*,
  the ``t2i:`` section). Each is checked in-process through ``config_from_mapping`` *and* written to a YAML
  file and read back through ``load_config``: a :class:`ConfigError` whose message is one line, whose
  ``key`` is the offending key (``t2i.``-prefixed for the text-to-image section) and which starts with it.
- FILE cases: what only a file can get wrong (YAML syntax errors, tabs, an empty file, a list or a scalar
  at the top level, a missing file, a directory, binary garbage, invalid UTF-8, NUL bytes, unsafe YAML
  tags, absurd nesting): one line naming the file (and the line, where the parser knows it).
- CLI cases: a subset through real stage scripts in a subprocess: exit status 2, stderr exactly one line
  starting with ``error:``, no traceback, and not one file under the working directory (``reports/``,
  ``metrics/``, ...) created, changed or touched. One more run from the repository root checks, with an
  audit hook in the stage process, that it opens nothing for writing there either.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from deme.config import ConfigError, config_from_mapping, load_config

REPO = Path(__file__).resolve().parents[1]


def case(id: str, raw: dict, key: str, *words: str, t2i: bool = False):
    """A malformed override. ``words``: substrings of the message ("!x": must not contain x)."""
    return pytest.param({"t2i": raw} if t2i else raw, "t2i" if t2i else None, key, words, id=id)


def t2i(id: str, raw: dict, key: str, *words: str):
    return case(f"t2i-{id}", raw, key, *words, t2i=True)


RUN = {"n": 4, "table3": True}  # a valid sweep run, to be broken one field at a time

MAPPING_CASES = [
    # ------------------------------------------------------------------ wrong types
    case("str-for-int", {"finetune": {"iterations": "100"}}, "finetune.iterations", "expected an integer"),
    case("merge-start-out-of-bounds", {"merge": {"start": 100}}, "merge.start", "within merge.bounds"),
    case("merge-coarse-out-of-bounds", {"merge": {"coarse": [0.0, 3.0]}}, "merge.coarse", "within merge.bounds"),
    case("str-for-int-pretrain", {"pretrain": {"batch_size": "64"}}, "pretrain.batch_size", "integer"),
    case("float-for-int", {"seed": 1.5}, "seed", "integer"),
    case("inf-for-int", {"sample": {"steps": float("inf")}}, "sample.steps", "integer"),
    case("list-for-int", {"data": {"resolution": [16]}}, "data.resolution", "integer"),
    case("list-for-float", {"deme": {"p": [0.4]}}, "deme.p", "number"),
    case("list-for-str", {"data": {"kind": ["shapes"]}}, "data.kind", "string"),
    case("mapping-for-list", {"finetune": {"betas": {"b1": 0.9, "b2": 0.99}}}, "finetune.betas", "list"),
    case("mapping-for-intervals", {"deme": {"intervals": {"a": 1}}}, "deme.intervals", "list"),
    case("str-for-list", {"fid": {"modes": "clean"}}, "fid.modes", "list of str"),
    case("csv-str-for-list", {"model": {"unet": {"block_out_channels": "16,32,64"}}},
         "model.unet.block_out_channels", "list of int"),
    case("bool-for-float", {"finetune": {"lr": True}}, "finetune.lr", "number"),
    case("bool-for-int", {"sample": {"steps": True}}, "sample.steps", "integer"),
    case("bool-for-weight", {"deme": {"consistency_weight": False}}, "deme.consistency_weight", "number"),
    case("int-for-bool", {"sample": {"save_images": 1}}, "sample.save_images", "true or false"),
    case("str-for-bool", {"deme": {"channel_projection": "yes"}}, "deme.channel_projection", "true or false"),
    case("null-for-int", {"finetune": {"iterations": None}}, "finetune.iterations", "NoneType"),
    case("null-for-float", {"pretrain": {"lr": None}}, "pretrain.lr", "NoneType"),
    case("null-for-str", {"data": {"kind": None}}, "data.kind", "string"),
    case("null-for-bool", {"deme": {"antithetic": None}}, "deme.antithetic", "true or false"),
    case("null-for-list", {"deme": {"intervals": None}}, "deme.intervals", "list"),
    case("null-in-list", {"deme": {"intervals": [1, None]}}, "deme.intervals[1]", "integer"),
    case("str-in-list", {"deme": {"intervals": [1, "2"]}}, "deme.intervals[1]", "integer"),
    case("nested-list-in-list", {"merge": {"coarse": [0.0, [0.5]]}}, "merge.coarse[1]", "number"),
    case("int-in-str-list", {"fid": {"modes": [1]}}, "fid.modes[0]", "string"),
    case("non-numeric-str", {"finetune": {"lr": "fast"}}, "finetune.lr", "number"),
    case("nan", {"finetune": {"eps": float("nan")}}, "finetune.eps", "finite"),
    case("inf-str", {"pretrain": {"weight_decay": "-inf"}}, "pretrain.weight_decay", "finite"),
    case("list-for-section", {"deme": [1, 2]}, "deme", "mapping"),
    case("str-for-section", {"finetune": "fast"}, "finetune", "mapping"),
    case("int-for-subsection", {"baselines": {"min_snr": 5}}, "baselines.min_snr", "mapping"),
    case("list-for-nested-section", {"model": {"unet": [16, 32]}}, "model.unet", "mapping"),
    # ------------------------------------------------------------------ out of range
    case("negative-iterations", {"finetune": {"iterations": -5}}, "finetune.iterations", ">= 1", "-5"),
    case("zero-iterations", {"pretrain": {"iterations": 0}}, "pretrain.iterations", ">= 1"),
    case("p-1.5", {"deme": {"p": 1.5}}, "deme.p", "[0, 1]"),
    case("lr-zero", {"finetune": {"lr": 0}}, "finetune.lr", "(0, 1)"),
    case("lr-negative", {"pretrain": {"lr": -1e-4}}, "pretrain.lr", "(0, 1)"),
    case("lr-one", {"featnet": {"lr": 1.0}}, "featnet.lr", "(0, 1)"),
    case("N3-not-dividing-T", {"deme": {"intervals": [1, 2, 3]}}, "deme.intervals", "N=3", "divide", "1000"),
    case("N7-not-dividing-T", {"deme": {"intervals": list(range(1, 8))}}, "deme.intervals", "N=7"),
    case("T998-not-divided-by-N4", {"schedule": {"num_train_timesteps": 998}}, "deme.intervals", "998"),
    case("intervals-from-0", {"deme": {"intervals": [0, 1]}}, "deme.intervals", "1..N"),
    case("intervals-repeated", {"deme": {"intervals": [1, 1]}}, "deme.intervals", "1..N"),
    case("intervals-empty", {"deme": {"intervals": []}}, "deme.intervals", "1..N"),
    case("merge-bounds-reversed", {"merge": {"bounds": [1.5, 0.0]}}, "merge.bounds", "low <= high"),
    case("merge-bounds-one-value", {"merge": {"bounds": [0.5]}}, "merge.bounds", "[low, high]"),
    case("sweep-merge-bounds-reversed", {"sweep": {"merge": {"bounds": [2, 1]}}}, "sweep.merge.bounds", "low"),
    case("merge-coarse-empty", {"merge": {"coarse": []}}, "merge.coarse", "at least one"),
    case("merge-refine-step-negative", {"merge": {"refine_step": -0.25}}, "merge.refine_step", ">= 0"),
    case("merge-proxy-samples", {"merge": {"proxy_samples": 8}}, "merge.proxy_samples", ">= 16"),
    case("betas-one-value", {"finetune": {"betas": [0.9]}}, "finetune.betas", "two numbers"),
    case("beta-1", {"finetune": {"betas": [0.9, 1.0]}}, "finetune.betas", "[0, 1)"),
    case("warmup-not-below-iterations", {"finetune": {"lr_warmup": 100}}, "finetune.lr_warmup", "iterations"),
    case("beta-end-above-1", {"schedule": {"beta_end": 1.5}}, "schedule.beta_start", "beta_end < 1"),
    case("T-1", {"schedule": {"num_train_timesteps": 1}}, "schedule.num_train_timesteps", ">= 2"),
    case("eta-2", {"sample": {"eta": 2}}, "sample.eta", "[0, 1]"),
    case("steps-0", {"sample": {"steps": 0}}, "sample.steps", "[1, 1000]"),
    case("resolution-20", {"data": {"resolution": 20}}, "data.resolution", "power of two"),
    case("num-train-below-64", {"data": {"num_train": 10}}, "data.num_train", ">= 64"),
    case("norm-groups-0", {"model": {"unet": {"norm_num_groups": 0}}}, "model.unet.norm_num_groups", ">= 1"),
    case("norm-groups-7", {"model": {"unet": {"norm_num_groups": 7}}}, "model.unet.norm_num_groups", "divide"),
    case("block-types-count", {"model": {"unet": {"down_block_types": ["DownBlock2D"]}}},
         "model.unet.down_block_types", "one entry per"),
    case("block-channels-zero", {"model": {"unet": {"block_out_channels": [0, 0, 0]}}},
         "model.unet.block_out_channels", "positive"),
    case("dropout-1", {"model": {"unet": {"dropout": 1.0}}}, "model.unet.dropout", "[0, 1)"),
    case("processes-0", {"runtime": {"num_processes": 0}}, "runtime.num_processes", "[1, 64]"),
    case("ant-tasks-3", {"baselines": {"ant_uw": {"num_tasks": 3}}}, "baselines.ant_uw.num_tasks", "divide"),
    case("ant-tasks-above-batch", {"baselines": {"ant_nash": {"num_tasks": 250}}}, "baselines.ant_nash.num_tasks",
         "micro-batch"),
    case("seeds-0", {"baselines": {"seeds": 0}}, "baselines.seeds", "[1, 100]"),
    case("buffer-steps-5000", {"baselines": {"difftuning": {"buffer_steps": 5000}}},
         "baselines.difftuning.buffer_steps", "[1, 1000]"),
    case("min-snr-gamma-0", {"baselines": {"min_snr": {"gamma": 0}}}, "baselines.min_snr.gamma", "> 0"),
    case("seed-2^31", {"seed": 2**31}, "seed", "2^31"),
    case("fid-modes-repeated", {"fid": {"modes": ["clean", "clean"]}}, "fid.modes", "repeats"),
    # ------------------------------------------------------------------ enum values
    case("sampler-unknown", {"sample": {"sampler": "fast"}}, "sample.sampler", "unknown sampler 'fast'"),
    case("sampler-not-ddim-for-image", {"sample": {"sampler": "pndm"}}, "sample.sampler", "ddim"),
    case("precision-fp64", {"finetune": {"precision": "fp64"}}, "finetune.precision", "fp32, fp16, bf16"),
    case("sample-precision-int8", {"sample": {"precision": "int8"}}, "sample.precision", "'int8'"),
    case("search-random", {"merge": {"search": "random"}}, "merge.search", "coordinate, grid"),
    case("budget-unlimited", {"sweep": {"budget": "unlimited"}}, "sweep.budget", "total, per_model"),
    case("data-kind", {"data": {"kind": "imagenet"}}, "data.kind", "cifar10"),
    case("data-crop", {"data": {"crop": "middle"}}, "data.crop", "random, center"),
    case("data-format", {"data": {"format": "zip"}}, "data.format", "parquet"),
    case("on-corrupt", {"data": {"on_corrupt": "ignore"}}, "data.on_corrupt", "skip, fail"),
    case("feature-net", {"fid": {"feature_net": "resnet"}}, "fid.feature_net", "featnet, inception"),
    case("fid-mode-for-featnet", {"fid": {"modes": ["legacy_tensorflow"]}}, "fid.modes[0]", "clean"),
    case("fid-builtin-missing", {"fid": {"reference": "builtin"}}, "fid.builtin", "<dataset>/<split>"),
    case("device-tpu", {"runtime": {"device": "tpu"}}, "runtime.device", "auto, cpu, cuda"),
    case("beta-schedule", {"schedule": {"beta_schedule": "cosine"}}, "schedule.beta_schedule", "linear"),
    case("prediction-type", {"schedule": {"prediction_type": "v_prediction"}}, "schedule.prediction_type", "epsilon"),
    case("lr-schedule", {"finetune": {"lr_schedule": "step"}}, "finetune.lr_schedule", "constant, cosine"),
    case("ps-granularity", {"deme": {"ps_granularity": "pixel"}}, "deme.ps_granularity", "batch, sample"),
    case("plane-pairs", {"analysis": {"plane_pairs": "none"}}, "analysis.plane_pairs", "all, default"),
    case("difftuning-variant", {"baselines": {"difftuning": {"variant": "both"}}},
         "baselines.difftuning.variant", "buffer, kd"),
    case("model-source", {"model": {"source": "s3"}}, "model.source", "train, hub"),
    case("hub-without-id", {"model": {"source": "hub", "local_path": ""}}, "model.pretrained_id", "local_path"),
    case("block-type", {"model": {"unet": {"up_block_types": ["UpBlock2D", "UpBlock3D", "UpBlock2D"]}}},
         "model.unet.up_block_types[1]", "'UpBlock3D'"),
    case("task-mismatch", {"task": "t2i"}, "task", "'image' profile"),
    # ------------------------------------------------------------------ unknown keys
    case("typo-top-level", {"finetunee": {"lr": 1e-4}}, "finetunee", "did you mean 'finetune'"),
    case("typo-top-level-scalar", {"sed": 3}, "sed", "did you mean 'seed'"),
    case("typo-nested", {"deme": {"interval": [1, 2]}}, "deme.interval", "did you mean 'intervals'"),
    case("typo-nested-2", {"finetune": {"batchsize": 8}}, "finetune.batchsize", "did you mean 'batch_size'"),
    case("typo-deep", {"model": {"unet": {"layers_per_blok": 2}}}, "model.unet.layers_per_blok",
         "did you mean 'layers_per_block'"),
    case("typo-baseline", {"baselines": {"min_snr": {"gama": 5}}}, "baselines.min_snr.gama", "did you mean 'gamma'"),
    case("typo-sweep-merge", {"sweep": {"merge": {"coarce": [0.0]}}}, "sweep.merge.coarce", "did you mean 'coarse'"),
    case("unknown-no-suggestion", {"zzz": 1}, "zzz", "unknown key", "!did you mean"),
    case("unknown-int-key", {1: 2}, "1", "unknown key"),
    case("unknown-key-with-newline", {"fine\ntune": 1}, "fine\\ntune", "unknown key"),
    case("unknown-key-with-tab", {"deme": {"p\t": 0.3}}, "deme.p\\t", "unknown key"),
    # ------------------------------------------------------------------ profiles
    case("profile-unknown", {"profile": "huge"}, "profile", "unknown image profile 'huge'", "tiny"),
    case("profile-of-other-task", {"profile": "sd14"}, "profile", "unknown image profile 'sd14'"),
    case("profile-int", {"profile": 3}, "profile", "unknown image profile 3"),
    case("profile-null", {"profile": None}, "profile", "None"),
    case("profile-list", {"profile": ["tiny"]}, "profile", "['tiny']"),
    # ------------------------------------------------------------------ sweep.runs
    case("run-bad-name", {"sweep": {"runs": {"bad name!": RUN}}}, "sweep.runs.bad name!", "run names may hold"),
    case("run-n-not-dividing-T", {"sweep": {"runs": {"r": {**RUN, "n": 3}}}}, "sweep.runs.r.n", "divide", "got 3"),
    case("run-n-zero", {"sweep": {"runs": {"r": {**RUN, "n": 0}}}}, "sweep.runs.r.n", "got 0"),
    case("run-n-str", {"sweep": {"runs": {"r": {**RUN, "n": "four"}}}}, "sweep.runs.r.n", "integer"),
    case("run-p-1.5", {"sweep": {"runs": {"r": {**RUN, "p": 1.5}}}}, "sweep.runs.r.p", "[0, 1] or null"),
    case("run-p-str", {"sweep": {"runs": {"r": {**RUN, "p": "half"}}}}, "sweep.runs.r.p", "'half'"),
    case("run-table3-str", {"sweep": {"runs": {"r": {**RUN, "table3": "yes"}}}}, "sweep.runs.r.table3", "true or false"),
    case("run-in-no-figure", {"sweep": {"runs": {"r": {"n": 4}}}}, "sweep.runs.r", "Table 3, Fig. 8"),
    case("run-typo", {"sweep": {"runs": {"r": {**RUN, "nn": 4}}}}, "sweep.runs.r.nn", "did you mean 'n'"),
    case("run-scalar", {"sweep": {"runs": {"r": 5}}}, "sweep.runs.r", "mapping"),
    case("runs-list", {"sweep": {"runs": [RUN]}}, "sweep.runs", "mapping"),
    case("sweep-num-samples", {"sweep": {"num_samples": 8}}, "sweep.num_samples", ">= 16"),
    case("sweep-table3-steps", {"sweep": {"table3_steps": 0}}, "sweep.table3_steps", ">= 1"),
    # ------------------------------------------------------------------ analysis.*
    case("activation-interval-above-N", {"analysis": {"activation_interval": 5}}, "analysis.activation_interval",
         "1..4"),
    case("activation-interval-negative", {"analysis": {"activation_interval": -1}}, "analysis.activation_interval",
         ">= 0"),
    case("floor-interval-0", {"analysis": {"floor_intervals": [0]}}, "analysis.floor_intervals", "start at 1"),
    case("floor-interval-above-N", {"analysis": {"floor_intervals": [1, 9]}}, "analysis.floor_intervals", "1..4"),
    case("floor-interval-above-N-micro", {"profile": "micro", "analysis": {"floor_intervals": [4]}},
         "analysis.floor_intervals", "1..2"),
    case("gradsim-timesteps-1", {"analysis": {"gradsim_timesteps": 1}}, "analysis.gradsim_timesteps", ">= 2"),
    case("sketch-dim-negative", {"analysis": {"sketch_dim": -1}}, "analysis.sketch_dim", ">= 0"),
    case("analysis-samples-0", {"analysis": {"samples": 0}}, "analysis.samples", ">= 1"),
    case("landscape-span-0", {"analysis": {"landscape_span": 0}}, "analysis.landscape_span", "> 0"),
    case("plane-margin-negative", {"analysis": {"plane_margin": -0.1}}, "analysis.plane_margin", ">= 0"),
    # ------------------------------------------------------------------ the t2i section
    t2i("profile-image", {"profile": "tiny"}, "t2i.profile", "unknown t2i profile 'tiny'", "tiny_t2i"),
    t2i("typo", {"pipline": {}}, "t2i.pipline", "did you mean 'pipeline'"),
    t2i("guidance-100", {"pipeline": {"guidance_scale": 100}}, "t2i.pipeline.guidance_scale", "[0, 50]"),
    t2i("guidance-str", {"pipeline": {"guidance_scale": "high"}}, "t2i.pipeline.guidance_scale", "number"),
    t2i("vae-groups-0", {"pipeline": {"vae": {"norm_num_groups": 0}}}, "t2i.pipeline.vae.norm_num_groups", ">= 1"),
    t2i("cond-block-type", {"pipeline": {"unet": {"down_block_types": ["Foo", "DownBlock2D"]}}},
        "t2i.pipeline.unet.down_block_types[0]", "CrossAttnDownBlock2D"),
    t2i("hidden-size-mismatch", {"pipeline": {"text_encoder": {"hidden_size": 48}}},
        "t2i.pipeline.text_encoder.hidden_size", "cross_attention_dim"),
    t2i("template-without-slot", {"benchmarks": {"imagenet_template": "a photo"}},
        "t2i.benchmarks.imagenet_template", "{}"),
    t2i("context-length-100", {"clip": {"context_length": 100}}, "t2i.clip.context_length", "[4, 77]"),
    t2i("clip-width-not-divisible", {"clip": {"width": 63}}, "t2i.clip.width", "divisible by heads"),
    t2i("sampler-unknown", {"sample": {"sampler": "fast"}}, "t2i.sample.sampler", "unknown sampler"),
    t2i("difftuning-buffer", {"baselines": {"difftuning": {"variant": "buffer"}}},
        "t2i.baselines.difftuning.variant", "'kd'"),
    t2i("eval-every", {"finetune": {"eval_every": 10}}, "t2i.finetune.eval_every", "use 0"),
    t2i("N3", {"deme": {"intervals": [1, 2, 3]}}, "t2i.deme.intervals", "N=3"),
    t2i("resolution-12", {"data": {"resolution": 12}}, "t2i.data.resolution", "power of two"),
    t2i("caption-dropout-1", {"pipeline": {"caption_dropout": 1.0}}, "t2i.pipeline.caption_dropout", "[0, 1)"),
    t2i("task-image", {"task": "image"}, "t2i.task", "'t2i' profile"),
    pytest.param({"profile": "tiny"}, "t2i", "t2i", ("section missing",), id="t2i-section-missing"),
    pytest.param({"t2i": [1, 2]}, "t2i", "t2i", ("section missing",), id="t2i-section-list"),
]


def _check_error(err: ConfigError, key: str, words) -> str:
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert err.key == key, msg
    assert msg.startswith(f"{key}: "), msg
    for w in words:
        if w.startswith("!"):
            assert w[1:] not in msg, msg
        else:
            assert w in msg, msg
    return msg


@pytest.mark.parametrize("raw, section, key, words", MAPPING_CASES)
def test_malformed_mapping_names_the_key(tmp_path, raw, section, key, words):
    with pytest.raises(ConfigError) as e:
        config_from_mapping(raw, section)
    _check_error(e.value, key, words)
    # the same override as a params file (YAML 1.2 reading of what a user or PyYAML writes)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_config(p, section)
    _check_error(e.value, key, words)


# ------------------------------------------------------------------------------------------- files

MISSING, DIRECTORY = object(), object()


def fcase(id: str, content, *words: str, key: str = "", line: int | None = None):
    """A malformed file. ``key``: the offending key when the YAML parses; else the message names the file
    (and ``line``, where the parser knows it)."""
    return pytest.param(content, key, line, words, id=id)


FILE_CASES = [
    fcase("empty", b"", "empty", "profile: <name>"),
    fcase("only-comments", b"# profile: tiny\n", "empty"),
    fcase("only-whitespace", b"  \n\n   \n", "empty"),
    fcase("only-null", b"~\n", "empty"),
    fcase("top-level-list", b"- profile\n- tiny\n", "mapping", "got list"),
    fcase("top-level-int", b"42\n", "mapping", "got int"),
    fcase("top-level-string", b"profile tiny\n", "mapping", "got str"),
    fcase("bad-indent-deeper", b"profile: tiny\nfinetune:\n  lr: 0.1\n    batch_size: 3\n", "not valid YAML", line=4),
    fcase("bad-indent-shallower", b"profile: tiny\nfinetune:\n    lr: 0.1\n  batch_size: 3\n", "not valid YAML",
          line=4),
    fcase("unclosed-bracket", b"profile: tiny\ndeme:\n  intervals: [1, 2\nseed: 0\n", "not valid YAML", line=4),
    fcase("unclosed-brace", b"profile: tiny\ndeme: {p: 0.3\n", "not valid YAML", line=3),
    fcase("unclosed-quote", b"profile: 'tiny\n", "not valid YAML", line=2),
    fcase("tab-indent", b"profile: tiny\nfinetune:\n\tlr: 0.1\n", "not valid YAML", "'\\t'", line=3),
    fcase("duplicate-key", b"profile: tiny\nseed: 1\nseed: 2\n", "duplicate key", line=3),
    fcase("two-documents", b"profile: tiny\n---\nprofile: micro\n", "not valid YAML", line=2),
    fcase("undefined-alias", b"profile: *name\n", "undefined alias", line=1),
    fcase("python-tag", b"profile: !!python/object/apply:os.system ['touch @MARKER@']\n", "could not determine a constructor",
          line=1),
    fcase("custom-tag", b"profile: !env PROFILE\n", "!env", line=1),
    fcase("nul-byte", b"profile: tiny\nseed: 0\x00\n", "not valid YAML", "U+0000", line=2),
    fcase("binary-garbage", bytes(range(256)) * 8, "not UTF-8"),
    fcase("invalid-utf8", b"profile: tiny\nseed: 0\ndata:\n  path: caf\xe9\n", "not UTF-8", "0xe9", line=4),
    fcase("utf16", "profile: tiny\n".encode("utf-16"), "not UTF-8", line=1),
    fcase("deep-nesting", b"profile: tiny\ndeme: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    fcase("huge-integer", b"profile: tiny\nseed: 1" + b"0" * 5000 + b"\n", "not valid YAML"),
    fcase("missing-file", MISSING, "file not found"),
    fcase("directory", DIRECTORY, "cannot read"),
    # the YAML parses; the values do not
    fcase("yaml11-yes-for-bool", b"profile: tiny\ndeme:\n  antithetic: yes\n", "true or false", key="deme.antithetic"),
    fcase("date-for-path", b"profile: tiny\ndata:\n  path: 2024-01-01\n", "string", key="data.path"),
    fcase("binary-for-path", b"profile: tiny\ndata:\n  path: !!binary aGVsbG8=\n", "bytes", key="data.path"),
    fcase("set-for-section", b"profile: tiny\nfinetune: !!set {a, b}\n", "mapping", key="finetune"),
    fcase("complex-key", b"profile: tiny\n? [a, b]\n: 1\n", "unknown key", key="('a', 'b')"),
    fcase("bad-number", b"profile: tiny\nfinetune:\n  lr: 1e-4x\n", "number", key="finetune.lr"),
    fcase("empty-profile-value", b"profile:\n", "unknown image profile None", key="profile"),
]


def _write(tmp_path: Path, content) -> Path:
    p = tmp_path / "params.yaml"
    if content is DIRECTORY:
        p.mkdir()
    elif content is not MISSING:
        p.write_bytes(content.replace(b"@MARKER@", str(tmp_path / "pwned").encode()))
    return p


@pytest.mark.parametrize("content, key, line, words", FILE_CASES)
def test_malformed_file_one_line_naming_file_or_key(tmp_path, content, key, line, words):
    p = _write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    if key:
        _check_error(e.value, key, words)
    else:
        assert msg.startswith(f"{p}: "), msg
        if line is not None:
            assert f"line {line}," in msg, msg
        for w in words:
            assert w in msg, msg
    assert not (tmp_path / "pwned").exists()


def test_at_least_sixty_malformed_inputs():
    assert len(MAPPING_CASES) + len(FILE_CASES) >= 60


# ------------------------------------------------------------------------------------------- stage CLIs

ENV = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")

CLI_CASES = [  # (stage args, params file, what stderr names)
    pytest.param(["report"], b"profile: tiny\nfinetune:\n  iterations: -5\n", "finetune.iterations", id="report-range"),
    pytest.param(["report"], b"profile: tiny\ndeme:\n  intervals: [1, 2, 3]\n", "deme.intervals", id="report-N3"),
    pytest.param(["report"], b"profile: tiny\nfinetunee:\n  lr: 0.1\n", "did you mean 'finetune'", id="report-typo"),
    pytest.param(["report"], b"profile: tiny\nmerge:\n  bounds: [1.5, 0.0]\n", "merge.bounds", id="report-bounds"),
    pytest.param(["report", "--t2i"], b"profile: tiny\nt2i:\n  profile: tiny_t2i\n  pipeline:\n    guidance_scale: x\n",
                 "t2i.pipeline.guidance_scale", id="report-t2i-type"),
    pytest.param(["report", "--sweep"], b"profile: tiny\nsweep:\n  runs:\n    r: {n: 3, table3: true}\n",
                 "sweep.runs.r.n", id="report-sweep-run"),
    pytest.param(["report"], b"profile: tiny\nfinetune:\n\tlr: 0.1\n", "line 3", id="report-tab"),
    pytest.param(["report"], b"", "empty", id="report-empty"),
    pytest.param(["report"], b"profile: caf\xe9\n", "not UTF-8", id="report-latin1"),
    pytest.param(["report"], b"- a\n- b\n", "mapping", id="report-list"),
    pytest.param(["prepare"], b"profile: huge\n", "profile", id="prepare-profile"),
    pytest.param(["featnet"], b"profile: tiny\nfeatnet:\n  lr: null\n", "featnet.lr", id="featnet-null"),
    pytest.param(["merge"], b"profile: tiny\nmerge:\n  search: random\n", "merge.search", id="merge-enum"),
    pytest.param(["sweep", "--run", "r"], b"profile: tiny\nanalysis:\n  activation_interval: 9\n",
                 "analysis.activation_interval", id="sweep-analysis"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: (mtime_ns, size)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working directory that looks like a pipeline's: reports/, metrics/, models/, a valid params.yaml."""
    work = tmp_path_factory.mktemp("work")
    for rel, text in {"params.yaml": "profile: tiny\n", "reports/tiny/report.md": "# report\n",
                      "reports/tiny_t2i/report.md": "# report\n", "metrics/tiny/merge.json": "{}\n",
                      "metrics/tiny/evaluate/merged.json": '{"fid": 1.0}\n', "models/tiny/pretrained/x": "x"}.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    return work


def _run(args: list[str], params: Path, cwd: Path, wrapper: list[str] = ()) -> subprocess.CompletedProcess:
    stage, *rest = args
    cmd = [sys.executable, *wrapper, str(REPO / "stages" / f"{stage}.py"), "--params", str(params), *rest]
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{params.parent / 'mlflow.db'}")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _assert_clean_failure(proc: subprocess.CompletedProcess, named: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert named in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("args, content, named", CLI_CASES)
def test_stage_cli_rejects_bad_params_and_touches_nothing(tmp_path, workspace, args, content, named):
    params = tmp_path / "bad.yaml"
    params.write_bytes(content)
    before = _snapshot(workspace)
    proc = _run(args, params, workspace)
    _assert_clean_failure(proc, named)
    assert str(params) in proc.stderr
    assert _snapshot(workspace) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no mlflow.db next to it either


# An audit hook in the stage process logs every open for writing and every file-system change; the stage
# runs as a script (runpy, __main__) exactly as `python stages/<stage>.py` would.
AUDIT = textwrap.dedent("""
    import os, runpy, sys
    log = open(sys.argv[1], "w")
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    CHANGES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.utime",
               "os.symlink", "os.link", "os.chmod", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "sqlite3.connect"}
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
            if writes:
                log.write(f"open {path!r} {mode!r}\\n"); log.flush()
        elif event in CHANGES:
            log.write(f"{event} {args!r}\\n"); log.flush()
    sys.addaudithook(hook)
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_stage_cli_from_the_repository_root_writes_nothing(tmp_path):
    """As a user runs it (cwd = the repository): the audit log of the stage process stays empty, i.e. it
    opens nothing for writing and changes nothing, anywhere (reports/, metrics/, mlflow.db, ...)."""
    cases = [(["report"], b"profile: tiny\ndeme:\n  p: 1.5\n", "deme.p"),
             (["report", "--t2i"], b"t2i:\n  profile: tiny\n", "t2i.profile"),
             (["report"], b"profile: tiny\n  seed: [\n", "not valid YAML")]
    for i, (args, content, named) in enumerate(cases):
        params, log = tmp_path / f"bad{i}.yaml", tmp_path / f"audit{i}.log"
        params.write_bytes(content)
        proc = _run(args, params, REPO, wrapper=["-c", AUDIT, str(log)])
        _assert_clean_failure(proc, named)
        assert log.read_text() == "", log.read_text()
    # the hook is live: a script that writes a file is logged
    probe = tmp_path / "probe.py"
    probe.write_text("open(__import__('sys').argv[1], 'w').close()\n")
    log = tmp_path / "audit-probe.log"
    subprocess.run([sys.executable, "-c", AUDIT, str(log), str(probe), str(tmp_path / "written")], env=ENV,
                   check=True, timeout=60)
    assert "written" in log.read_text()


# ---------------------------------------------------------------------------------------------- memory
# Values that size memory, far beyond any machine: the validate stage refuses each with one line naming the
# key and the GiB it would need (deme/memory.py: data and sample counts; deme/validation.py: batches through
# the UNet, measured on fake tensors).

MEMORY_CASES = [
    pytest.param({"data": {"num_train": 10 ** 8}}, "data.num_train", id="num-train"),
    pytest.param({"sample": {"num_samples": 10 ** 9}}, "sample.num_samples", id="num-samples"),
    pytest.param({"fid": {"reference_samples": 10 ** 10}}, "fid.reference_samples", id="reference-samples"),
    pytest.param({"merge": {"proxy_samples": 10 ** 10}}, "merge.proxy_samples", id="proxy-samples"),
    pytest.param({"pretrain": {"batch_size": 10 ** 7}}, "pretrain.batch_size", id="pretrain-batch"),
    pytest.param({"finetune": {"batch_size": 10 ** 7}}, "finetune.batch_size", id="finetune-batch"),
    pytest.param({"sample": {"batch_size": 10 ** 8}}, "sample.batch_size", id="sample-batch"),
    pytest.param({"t2i": {"profile": "micro_t2i", "sample": {"batch_size": 10 ** 7}}}, "t2i.sample.batch_size",
                 id="t2i-sample-batch"),
    pytest.param({"t2i": {"profile": "micro_t2i", "finetune": {"batch_size": 10 ** 7}}}, "t2i.finetune.batch_size",
                 id="t2i-finetune-batch"),
]


@pytest.mark.parametrize("raw, key", MEMORY_CASES)
def test_a_value_that_cannot_fit_in_memory_is_refused_naming_it(tmp_path, raw, key):
    from deme import validation

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"profile": "micro", **raw}))
    with pytest.raises(ConfigError) as e:
        validation.check(params)
    assert e.value.key == key and str(e.value).startswith(key) and "\n" not in str(e.value)
    assert "GiB of memory" in str(e.value) and "this machine has" in str(e.value)


def test_the_measured_peak_grows_with_the_batch_and_is_measured_once(monkeypatch):
    from deme import validation

    cfg = config_from_mapping({"profile": "micro"})
    small, large = validation.training_bytes(cfg, 8), validation.training_bytes(cfg, 64)
    assert 0 < small < large and validation.sampling_bytes(cfg, 8) < small
    monkeypatch.setattr(validation, "_fake_peak", lambda *a: pytest.fail("measured again"))
    assert validation.training_bytes(cfg, 64) == large  # from $DEME_CACHE/unet-peaks.json


@pytest.mark.parametrize("name", ["tiny", "micro", "tiny_t2i", "micro_t2i",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("cifar10", "church", "sd14"))])
def test_every_preset_fits_the_machine_it_is_meant_for(name):
    """CPU profiles on this machine; the paper-scale profiles on one 80 GiB GPU (their runtime.device)."""
    from deme import validation
    from deme.profiles import PROFILES

    t2i = PROFILES[name].get("task") == "t2i"
    cfg = config_from_mapping({"profile": "tiny", "t2i": {"profile": name}}, "t2i") if t2i else \
        config_from_mapping({"profile": name})
    gpu = ("an 80 GiB GPU", int(0.9 * 80 * 2 ** 30)) if name in ("cifar10", "church", "sd14") else None
    validation.check_batches(cfg, gpu)
