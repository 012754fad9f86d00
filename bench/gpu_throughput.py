"""Benchmark: GPU throughput of the paper-scale profiles (cifar10, church = LSUN-256 UNet), one table, one run.

For each ``--arch`` (the UNet of deme/profiles.py, random init, synthetic random data; no checkpoint or
dataset is read) it measures, in this one process:

1. Training images/s of the suite's loop, ``deme.train.train`` with the profile's finetune TrainConfig
   (precision fp16 unless ``--precision``, channels_last from ``runtime``, ``--compile`` optional; AdamW,
   clipping, EMA, accelerate, the suite's CPU-side data path), plain EpsObjective on all timesteps, against
   a naive fp32 eager loop written inline here (AdamW, eps-MSE, same model, micro-batch and accumulation;
   no autocast, no channels_last, no compile, no EMA, no clipping) and the ratio. Target: >= 2x.
2. The DeMe-step overhead: the suite loop with the DeMe objective of interval 1 (probabilistic sampling
   with the profile's p, consistency loss against a frozen teacher, channel-wise projections on the
   student) against the suite loop with the plain objective (same precision). Reported as the cost ratio
   plain img/s / DeMe img/s (bench/step_overhead.py's target: <= 1.40).
3. Sampling images/s: ``deme.sample.sample_batch`` (DDIM, ``--ddim-steps``, eta from the profile (0),
   fp16 autocast, ``--sample-batch``), noise generation and the copy of the uint8 result to the host included.
4. Inception feature images/s: ``deme.metrics.fid.batch_features`` with ``inception_space("clean")`` and
   ``("legacy_pytorch")`` on uint8 images at the profile resolution. This includes clean-fid's per-image
   resize to 299x299 on the CPU (PIL bicubic for clean, torch bilinear for legacy_pytorch) and the
   host-to-device copy, as the evaluate stage does it; the network-only rate on device-resident
   pre-resized 299x299 inputs is reported beside it.
5. The projected wall time of a FID-50K as the evaluate stage runs it (every sampled batch goes through
   both feature spaces, serially): 50000 / sampling rate + 50000 / feature rate, summed over both modes,
   in minutes. The reference statistics (fid_ref stage) are precomputed and not included. Target (the
   issue): CIFAR10 FID-50K under 5 minutes on one H100.

How the suite loop is timed. ``train()`` has no per-step hook, so the objective passed to it is wrapped
(``StepClock``): the wrapper forwards every attribute to the real objective and, at the start of the first
micro-batch of optimizer step ``--warmup`` and of step ``--warmup + --steps``, synchronises the device and
reads the clock. The interval between the two stamps is exactly ``--steps`` whole optimizer steps of the
loop (data batch to device, objective, backward, clipping, optimizer, EMA, the loop's own syncs), with
set-up (Accelerator, EMA copy, compile of step 0) and teardown outside. ``train()`` therefore runs
``warmup + steps + 1`` iterations. ``--timing diff`` instead times whole ``train()`` calls of ``warmup``
and ``warmup + steps`` iterations (after one untimed priming call, skipped with --quick) and takes the
difference.

Run it on the lent GPU (one H100) from the repository root:

    python bench/gpu_throughput.py --out bench/gpu_throughput.json
    python bench/gpu_throughput.py --arch cifar10 --compile --precision bf16

Check that it works on a CPU (tiny step counts and batches, resolution kept; PASS/MISS then is not a
verdict; the profile's fp16 becomes fp32 on a CPU unless --precision / --sample-precision are given):

    python bench/gpu_throughput.py --quick --arch cifar10
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deme.config import config_from_mapping  # noqa: E402
from deme.models import build_unet, count_parameters  # noqa: E402
from deme.objectives import EpsObjective  # noqa: E402
from deme.projection import add_channel_projection  # noqa: E402
from deme.schedule import alphas_cumprod, interval_bounds  # noqa: E402
from deme.train import resolve_device, to_model_range, train  # noqa: E402

ARCHS = ("cifar10", "church")
FID_MODES = ("clean", "legacy_pytorch")
FID_N = 50_000
TARGET_TRAIN_RATIO = 2.0  # suite loop img/s >= 2x the naive fp32 eager loop
TARGET_FID_MIN = {"cifar10": 5.0}  # FID-50K wall time on one H100, minutes
TARGET_DEME_OVERHEAD = 1.40  # bench/step_overhead.py: DeMe step cost <= 1.4x a plain step

# (full run, --quick). None: the profile's value.
DEFAULTS = {"steps": (30, 2), "warmup": (5, 1), "train_batch": (None, 2), "grad_accum": (None, 1),
            "sample_batch": (None, 4), "sample_batches": (2, 1), "ddim_steps": (50, 2),
            "feature_batch": (None, 4), "feature_batches": (2, 1)}


# ----------------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def quiet_progress() -> None:
    """Hide train()'s tqdm bar (display only; the loop is unchanged). --progress keeps it."""
    import deme.train as dt

    real = dt.tqdm

    def quiet(*a, **k):
        k["disable"] = True
        return real(*a, **k)

    dt.tqdm = quiet


class StepClock:
    """An objective that stamps a synchronised clock at the start of micro-batch ``start`` and ``stop``.

    Every other attribute (teacher, param_groups, ...) is the wrapped objective's, so train() treats it
    exactly like the objective itself."""

    def __init__(self, objective, start: int, stop: int, device: torch.device):
        self.objective, self.start, self.stop, self.device = objective, start, stop, device
        self.calls, self.stamps = 0, {}

    def __getattr__(self, name):
        return getattr(self.__dict__["objective"], name)

    def __call__(self, model, x0, generator):
        if self.calls in (self.start, self.stop):
            sync(self.device)
            self.stamps[self.calls] = time.perf_counter()
        self.calls += 1
        return self.objective(model, x0, generator)

    def elapsed(self) -> float:
        return self.stamps[self.stop] - self.stamps[self.start]


# ----------------------------------------------------------------------------------------------------
# 1-2. training


def suite_rate(make_model, objective, images, tcfg, a, device: torch.device, channels_last: bool,
               compile_: bool) -> dict:
    """img/s of deme.train.train over ``a.steps`` optimizer steps after ``a.warmup`` (see module docstring)."""
    imgs_per_step = tcfg.batch_size * tcfg.grad_accum

    def call(iterations: int, obj) -> float:
        model = make_model()
        cfg = dataclasses.replace(tcfg, iterations=iterations)
        sync(device)
        t0 = time.perf_counter()
        out = train(model, obj, images, cfg, seed=a.seed, device=device, channels_last=channels_last,
                    compile=compile_, desc="bench")
        sync(device)
        wall = time.perf_counter() - t0
        del model, out
        return wall

    reset_peak(device)
    if a.timing == "stamp":
        clock = StepClock(objective, a.warmup * tcfg.grad_accum, (a.warmup + a.steps) * tcfg.grad_accum, device)
        call(a.warmup + a.steps + 1, clock)
        seconds = clock.elapsed()
    else:
        if not a.quick:
            call(a.warmup, objective)  # priming: one-time costs (lazy CUDA init, compile caches) go here
        short = call(a.warmup, objective)
        long = call(a.warmup + a.steps, objective)
        seconds = long - short
    peak = peak_gib(device)
    free(device)
    ok = seconds > 0
    return {"images_per_s": a.steps * imgs_per_step / seconds if ok else float("nan"),
            "s_per_step": seconds / a.steps if ok else float("nan"), "timed_steps": a.steps,
            "warmup_steps": a.warmup, "images_per_step": imgs_per_step, "timing": a.timing, "peak_gib": peak}


def naive_rate(base, images, tcfg, a, ab: torch.Tensor, device: torch.device) -> dict:
    """The naive baseline: plain fp32 eager loop (AdamW, eps-MSE, uniform t), same model and batches."""
    model = copy.deepcopy(base).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.eps,
                            weight_decay=tcfg.weight_decay)
    ab = ab.to(device)
    T = len(ab)
    g = torch.Generator().manual_seed(a.seed)
    b, accum = tcfg.batch_size, tcfg.grad_accum
    reset_peak(device)
    t0 = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync(device)
            t0 = time.perf_counter()
        for _ in range(accum):
            idx = torch.randint(0, len(images), (b,), generator=g)
            x0 = to_model_range(images[idx]).to(device)  # the same CPU-side data path as the suite
            t = torch.randint(0, T, (b,), device=device)
            noise = torch.randn_like(x0)
            abt = ab[t].view(-1, 1, 1, 1)
            xt = abt.sqrt() * x0 + (1 - abt).sqrt() * noise
            loss = F.mse_loss(model(xt, t).sample, noise)
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_gib(device)
    del model, opt
    free(device)
    return {"images_per_s": a.steps * b * accum / seconds, "s_per_step": seconds / a.steps,
            "timed_steps": a.steps, "warmup_steps": a.warmup, "images_per_step": b * accum, "peak_gib": peak}


# ----------------------------------------------------------------------------------------------------
# 3. sampling


def sampling_rate(base, cfg, device: torch.device, precision: str, bs: int, batches: int, ddim_steps: int) -> dict:
    from deme.sample import sample_batch

    model = copy.deepcopy(base).to(device).eval()
    if cfg.runtime.channels_last and device.type == "cuda":  # as deme.evaluation.sample_features does
        model = model.to(memory_format=torch.channels_last)
    scfg = dataclasses.replace(cfg.sample, batch_size=bs, steps=ddim_steps, precision=precision)
    r = cfg.data.resolution
    reset_peak(device)
    # warm-up batch (lazy CUDA/cuDNN init), 2 DDIM steps
    sample_batch(model, list(range(bs)), cfg.schedule, scfg, (3, r, r), device, steps=min(2, ddim_steps))
    sync(device)
    t0 = time.perf_counter()
    for k in range(batches):
        seeds = list(range((k + 1) * bs, (k + 2) * bs))
        sample_batch(model, seeds, cfg.schedule, scfg, (3, r, r), device, steps=ddim_steps)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_gib(device)
    del model
    free(device)
    n = bs * batches
    return {"images_per_s": n / seconds, "images": n, "batch": bs, "ddim_steps": ddim_steps,
            "eta": scfg.eta, "precision": precision, "peak_gib": peak}


# ----------------------------------------------------------------------------------------------------
# 4. Inception features


def feature_rate(space, resolution: int, batch: int, batches: int, seed: int, device: torch.device) -> float:
    """img/s of batch_features on uint8 [b, 3, r, r] (per-image resize to 299 on the CPU included)."""
    from deme.metrics.fid import batch_features

    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, generator=g)
    batch_features(imgs, space)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch_features(imgs, space)  # returns numpy: synchronised
    return batch * batches / (time.perf_counter() - t0)


def network_rate(space, batch: int, batches: int, seed: int, device: torch.device) -> float:
    """img/s of the feature network alone on device-resident float [b, 3, 299, 299] in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 3, 299, 299, generator=g) * 255).to(device)
    net = space.net.to(device).eval()
    with torch.no_grad():
        net(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            net(x)
        sync(device)
    return batch * batches / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# one architecture


def bench_arch(arch: str, a, device: torch.device, spaces: dict, net_rates: dict) -> dict:
    cfg = config_from_mapping({"profile": arch})
    r = cfg.data.resolution
    ft = cfg.finetune
    tcfg = dataclasses.replace(ft, precision=a.precision, batch_size=a.train_batch or ft.batch_size,
                               grad_accum=a.grad_accum or ft.grad_accum, ckpt_every=0, eval_every=0)
    sb = a.sample_batch or cfg.sample.batch_size
    fb = a.feature_batch or cfg.fid.batch_size
    channels_last = cfg.runtime.channels_last
    compile_ = a.compile or cfg.runtime.compile
    T = cfg.schedule.num_train_timesteps
    ab = alphas_cumprod(cfg.schedule).float()

    torch.manual_seed(a.seed)
    base = build_unet(cfg).train()
    n_images = max(2 * tcfg.batch_size * tcfg.grad_accum, tcfg.batch_size)
    g = torch.Generator().manual_seed(a.seed)
    images = torch.randint(0, 256, (n_images, r, r, 3), dtype=torch.uint8, generator=g)
    info = {"arch": arch, "resolution": r, "parameters": count_parameters(base),
            "train_micro_batch": tcfg.batch_size, "grad_accum": tcfg.grad_accum, "train_precision": a.precision,
            "channels_last": channels_last and device.type == "cuda", "compile": compile_,
            "lr": tcfg.lr, "clip_grad_norm": tcfg.clip_grad_norm, "ema_max_decay": tcfg.ema_max_decay}
    print(f"\n[{arch}] UNet {info['parameters'] / 1e6:.1f}M params, {r}x{r}; train micro-batch {tcfg.batch_size}"
          f" x accum {tcfg.grad_accum}, {a.steps} timed steps after {a.warmup}; sample batch "
          f"{sb} x {a.sample_batches}, DDIM-{a.ddim_steps}; Inception batch {fb} x {a.feature_batches}", flush=True)

    def stage(name):
        print(f"[{arch}] {name} ...", flush=True)

    out: dict = {"config": info}
    stage("naive fp32 eager loop")
    out["train_naive_fp32"] = naive_rate(base, images, tcfg, a, ab, device)
    stage(f"suite loop, plain objective ({a.precision})")
    plain = EpsObjective(ab, 0, T, antithetic=cfg.deme.antithetic)
    out["train_suite_plain"] = suite_rate(lambda: copy.deepcopy(base), plain, images, tcfg, a, device,
                                          channels_last, compile_)
    stage(f"suite loop, DeMe objective ({a.precision})")
    d = cfg.deme
    lo, hi = interval_bounds(1, d.n, T)
    teacher = copy.deepcopy(base).requires_grad_(False).eval()
    deme = EpsObjective(ab, lo, hi, p=d.p if d.probabilistic_sampling else 0.0, granularity=d.ps_granularity,
                        antithetic=d.antithetic, teacher=teacher, consistency_weight=d.consistency_weight)
    out["train_suite_deme"] = suite_rate(lambda: add_channel_projection(copy.deepcopy(base)), deme, images, tcfg,
                                         a, device, channels_last, compile_)
    out["train_suite_deme"]["objective"] = {"interval": [lo, hi], "p": deme.p, "consistency_weight": d.consistency_weight,
                                            "channel_projection": True}
    del teacher, deme
    free(device)
    naive, suite, dm = (out[k]["images_per_s"] for k in ("train_naive_fp32", "train_suite_plain", "train_suite_deme"))
    out["train_ratio_suite_over_naive"] = suite / naive
    out["deme_overhead_plain_over_deme"] = suite / dm

    stage(f"sampling ({a.sample_precision})")
    out["sampling"] = sampling_rate(base, cfg, device, a.sample_precision, sb, a.sample_batches, a.ddim_steps)
    base = None  # free the model before the Inception measurements
    free(device)

    out["features"] = {}
    for mode, space in spaces.items():
        stage(f"Inception {mode}")
        key = (mode, fb)  # the network-only rate does not depend on the arch: measured once per batch size
        if key not in net_rates:
            net_rates[key] = network_rate(space, fb, a.feature_batches, a.seed, device)
        out["features"][mode] = {"images_per_s": feature_rate(space, r, fb, a.feature_batches, a.seed, device),
                                 "network_only_images_per_s": net_rates[key], "batch": fb,
                                 "images": fb * a.feature_batches}
    free(device)

    minutes = {"sampling": FID_N / out["sampling"]["images_per_s"] / 60}
    minutes.update({f"features_{m}": FID_N / f["images_per_s"] / 60 for m, f in out["features"].items()})
    minutes["total"] = sum(minutes.values())
    out["fid50k_projected_minutes"] = minutes
    return out


# ----------------------------------------------------------------------------------------------------
# report


def num(v: float) -> str:
    """A rate or time with 3 significant digits at most below 100 (CPU rates are tiny)."""
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(results: dict, env: dict) -> tuple[list[list[str]], list[dict]]:
    rows, targets = [], []
    caveat = env["verdict_caveat"]
    for arch, res in results.items():
        c = res["config"]
        n, s, dm = res["train_naive_fp32"], res["train_suite_plain"], res["train_suite_deme"]
        ratio, over = res["train_ratio_suite_over_naive"], res["deme_overhead_plain_over_deme"]
        p = c["train_precision"]
        rows.append([arch, "train: naive fp32 eager loop (baseline)", num(n['images_per_s']), "img/s",
                     f"{n['s_per_step'] * 1e3:.1f} ms/step"])
        t_ok = ratio >= TARGET_TRAIN_RATIO
        rows.append([arch, f"train: suite loop, plain eps ({p})", num(s['images_per_s']), "img/s",
                     f"{ratio:.2f}x baseline; target >= {TARGET_TRAIN_RATIO:.2f}x: {verdict(t_ok)}"])
        targets.append({"arch": arch, "target": f"suite train img/s >= {TARGET_TRAIN_RATIO}x fp32 eager",
                        "measured": ratio, "verdict": verdict(t_ok), "valid": not caveat})
        o_ok = over <= TARGET_DEME_OVERHEAD
        rows.append([arch, f"train: suite loop, DeMe step ({p})", num(dm['images_per_s']), "img/s",
                     f"overhead {over:.2f}x (plain/DeMe); target <= {TARGET_DEME_OVERHEAD:.2f}x: {verdict(o_ok)}"])
        targets.append({"arch": arch, "target": f"DeMe step cost <= {TARGET_DEME_OVERHEAD}x plain (suite loop)",
                        "measured": over, "verdict": verdict(o_ok), "valid": not caveat})
        sm = res["sampling"]
        rows.append([arch, f"sample: DDIM-{sm['ddim_steps']} eta {sm['eta']:g} ({sm['precision']}), batch {sm['batch']}",
                     num(sm['images_per_s']), "img/s", ""])
        for mode, f in res["features"].items():
            rows.append([arch, f"inception {mode}: resize to 299 + net", num(f['images_per_s']), "img/s",
                         f"batch {f['batch']}"])
            rows.append([arch, f"inception {mode}: net only (299 input)", num(f['network_only_images_per_s']),
                         "img/s", ""])
        m = res["fid50k_projected_minutes"]
        parts = ", ".join(f"{k.replace('features_', '')} {num(v)}" for k, v in m.items() if k != "total")
        note = parts
        if arch in TARGET_FID_MIN:
            f_ok = m["total"] < TARGET_FID_MIN[arch]
            note += f"; target < {TARGET_FID_MIN[arch]:g} min: {verdict(f_ok)}"
            targets.append({"arch": arch, "target": f"FID-50K under {TARGET_FID_MIN[arch]:g} min on one H100",
                            "measured": m["total"], "verdict": verdict(f_ok), "valid": not caveat})
        rows.append([arch, "FID-50K projected: sample + both modes", num(m['total']), "min", note])
        for k, v in (("train peak (naive / plain / DeMe)", (n, s, dm)), ("sample peak", (sm,))):
            if all(x["peak_gib"] is not None for x in v):
                rows.append([arch, k, " / ".join(f"{x['peak_gib']:.1f}" for x in v), "GiB", ""])
    return rows, targets


def print_table(rows: list[list[str]]) -> None:
    head = ["arch", "measurement", "value", "unit", "ratio / target / note"]
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]

    def line(r):
        return f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:<{w[3]}}  {r[4]}"
    print(line(head))
    print("-" * (sum(w) + 8 + len(head[4])))
    for r in rows:
        print(line(r))


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS),
                    help="UNet architectures (profiles) to measure (default: both)")
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                    help="training precision of the suite loop (default: the profile's finetune.precision, fp16)")
    ap.add_argument("--sample-precision", choices=("fp16", "bf16", "fp32"), default=None,
                    help="sampling autocast precision (default: the profile's sample.precision, fp16)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet in the suite loop")
    ap.add_argument("--tf32", choices=("off", "on"), default="off",
                    help="torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 for the whole run "
                         "(default off: the baseline is true fp32; 'on' is the stricter comparison). "
                         "Inception always runs with cuDNN TF32 off (deme/metrics/inception.py)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per training measurement (default 30)")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps before them (default 5)")
    ap.add_argument("--train-batch", type=int, help="training micro-batch (default: the profile's finetune.batch_size)")
    ap.add_argument("--grad-accum", type=int, help="gradient accumulation (default: the profile's finetune.grad_accum)")
    ap.add_argument("--timing", choices=("stamp", "diff"), default="stamp",
                    help="how the suite loop is timed (see above; default stamp)")
    ap.add_argument("--sample-batch", type=int, help="sampling batch (default: the profile's sample.batch_size)")
    ap.add_argument("--sample-batches", type=int, help="timed sampling batches after one warm-up batch (default 2)")
    ap.add_argument("--ddim-steps", type=int, help="DDIM steps (default 50, as the paper)")
    ap.add_argument("--feature-batch", type=int, help="Inception batch (default: the profile's fid.batch_size)")
    ap.add_argument("--feature-batches", type=int, help="timed Inception batches after one warm-up batch (default 2)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's default; 1 with --quick on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes to check the script on a CPU: 1 warm-up + 2 timed steps, train batch 2, "
                         "sample batch 4, 2 DDIM steps, 4 Inception images per batch (explicit flags win)")
    ap.add_argument("--progress", action="store_true", help="show train()'s progress bars")
    ap.add_argument("--out", help="also write the results as JSON here (e.g. bench/gpu_throughput.json); "
                                  "default: print only")
    a = ap.parse_args(argv)
    for k, (full, quick) in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    for k in ("steps", "warmup", "sample_batches", "ddim_steps", "feature_batches"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    device = resolve_device(a.device)
    notes = []
    if a.quick and device.type == "cpu" and a.threads == 0:
        a.threads = 1
        notes.append("--quick on a CPU: 1 torch thread (stable timings when the cores are shared; --threads N)")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    profile = config_from_mapping({"profile": a.arch[0]})  # both profiles: fp16 training and sampling
    for k, default in (("precision", profile.finetune.precision), ("sample_precision", profile.sample.precision)):
        if getattr(a, k) is None:
            value = default
            if device.type == "cpu" and value != "fp32":  # CPU autocast: fp16 ~10x, bf16 ~2x slower than fp32 here
                value = "fp32"
                notes.append(f"{k.replace('_', ' ')}: fp32 instead of the profile's {default} on a CPU, where "
                             f"autocast only slows things down (pass --{k.replace('_', '-')} {default} to force)")
            setattr(a, k, value)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32 == "on"
    torch.backends.cudnn.allow_tf32 = a.tf32 == "on"
    if not a.progress:
        quiet_progress()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    is_h100 = "H100" in name
    caveats = [c for c, bad in (("--quick", a.quick), ("not an H100", not is_h100),
                                (f"DDIM-{a.ddim_steps}, not 50", a.ddim_steps != 50)) if bad]
    env = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "train_precision": a.precision,
           "sample_precision": a.sample_precision, "inception_precision": "fp32", "quick": a.quick,
           "timing": a.timing, "verdict_caveat": "; ".join(caveats), "notes": notes}
    print(f"device: {name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | CPU threads "
          f"{env['cpu_threads']} of {env['cpu_count']}")
    print(f"precision: train {a.precision} (naive baseline fp32), sample {a.sample_precision}, Inception fp32 | "
          f"tf32: matmul={env['tf32_matmul']} cudnn={env['tf32_cudnn']} | cudnn.benchmark={env['cudnn_benchmark']}"
          f" | compile={a.compile} | timing={a.timing}")
    for n in notes:
        print(f"note: {n}")

    from deme.metrics.inception import inception_space

    spaces = {m: inception_space(m, device) for m in FID_MODES}
    net_rates: dict = {}
    results = {}
    t_start = time.perf_counter()
    for arch in a.arch:
        results[arch] = bench_arch(arch, a, device, spaces, net_rates)
    env["wall_s"] = time.perf_counter() - t_start

    rows, targets = table(results, env)
    print()
    print_table(rows)
    print()
    for t in targets:
        print(f"{t['verdict']}  {t['arch']}: {t['target']} (measured {t['measured']:.2f})"
              + (f"  [not a verdict: {env['verdict_caveat']}]" if not t["valid"] else ""))
    print(f"\nbenchmark wall time {env['wall_s'] / 60:.1f} min")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"env": env, "args": vars(a), "results": results, "targets": targets},
                                          indent=2, default=str) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
