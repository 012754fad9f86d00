"""The training loop, shared by pretraining, DeMe interval finetuning, plain finetuning and baselines.

Read top to bottom: AdamW with constant LR, gradient accumulation and global-norm clipping through
accelerate, EMA with warm-up (decay(step) = min(max, 1 - (1 + step/inv_gamma)^-power), docs/paper.md §1.6), a
NaN guard that names the step and the loss terms, and resumable checkpoints.

Determinism: the data order and every random draw of step s come from seeds derived from (seed, s), so a
run resumed from a checkpoint continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deme.config import TrainConfig
from deme.io import atomic_dir, derive_seed, write_json
from deme.resume import saved

LogFn = Callable[[dict[str, float], int], None]
EvalFn = Callable[[nn.Module, int], dict[str, float]]  # (EMA model, step) -> metrics, e.g. proxy FID


class NonFiniteLossError(FloatingPointError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1] (the DDPM data range)."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class BatchStream:
    """Micro-batch m of a run is a pure function of (seed, m): shuffled epochs, no replacement within one.

    ``images`` is uint8 [n, H, W, 3], a tensor or a (memory-mapped) numpy array read batch by batch."""

    def __init__(self, images, batch_size: int, seed: int):
        if len(images) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the dataset size {len(images)}")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, m: int) -> torch.Tensor:
        epoch, k = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(len(self.images), generator=g)
        idx = self._perm[k * self.batch_size:(k + 1) * self.batch_size]
        if isinstance(self.images, torch.Tensor):
            return to_model_range(self.images[idx])
        return to_model_range(torch.from_numpy(np.ascontiguousarray(self.images[idx.numpy()])))


def lr_factor(step: int, schedule: str, warmup: int, iterations: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (the one LR schedule of the suite: model training
    and the CLIP stand-in): linear warm-up (step + 1) / warmup, then constant, cosine to 0 at ``iterations``, or
    rsqrt: 1/sqrt(step / warmup) (EDM2, Karras et al. 2024, Eq. 16), which does not depend on ``iterations``, so
    a longer run repeats a shorter one's steps exactly and its FID-vs-steps curve is one run.

    After the warm-up, constant and cosine equal diffusers' ``get_scheduler`` (tests/test_train.py). The suite
    does not call it: the installed diffusers has no rsqrt schedule, and its warm-up starts at LR 0 (step /
    warmup), one step behind this one, which would change the published pretraining's steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "rsqrt":
        return 1.0 / math.sqrt(max(step / warmup, 1.0))
    progress = (step - warmup) / max(1, iterations - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(model: nn.Module, objective, images, cfg: TrainConfig, *, seed: int,
          device: torch.device, ckpt_dir: str | Path | None = None, fingerprint: str = "",
          log: LogFn | None = None, desc: str = "train", evaluate: EvalFn | None = None,
          channels_last: bool = False, compile: bool = False,
          condition: Callable[[torch.Tensor], dict] | None = None, keep_final: bool = False) -> nn.Module:
    """Train ``model`` with ``objective`` for ``cfg.iterations`` optimizer steps; return the EMA model.

    ``images``: uint8 [n, H, W, 3] (tensor or memmap), or a stream factory ``(batch_size, seed) -> stream``
    whose micro-batches are ``(x0, token ids)`` (text-to-image latents, deme/text2image.py); ``condition``
    turns the token ids (on the device) into the model's keyword arguments (``encoder_hidden_states``).

    Under ``accelerate launch`` every process trains on its own data stream (seeded by its rank) and
    gradients are averaged (DDP); only the main process logs and writes checkpoints. ``evaluate`` is called
    on every process with the EMA weights every ``cfg.eval_every`` steps (e.g. the FID-5K curve of
    docs/paper.md §1.6); its metrics are logged at that step. ``keep_final``: also checkpoint the last step, so a
    longer run with the same settings (a schedule that does not depend on ``iterations``) continues from it.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if cfg.precision == "fp32" else cfg.precision,
                      gradient_accumulation_steps=cfg.grad_accum)
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    params += getattr(objective, "param_groups", lambda: [])()  # e.g. ANT-UW log-variances
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.lr_schedule, cfg.lr_warmup, cfg.iterations))
    model.to(acc.device)
    if channels_last and acc.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    ema = EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True,
                   inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power)
    model, optimizer = acc.prepare(model, optimizer)
    forward_model = torch.compile(model) if compile else model
    if isinstance(objective, nn.Module):
        objective.to(acc.device)
    if getattr(objective, "teacher", None) is not None:
        objective.teacher.to(acc.device)
    data_seed = derive_seed(seed, "data", acc.process_index)
    stream = images(cfg.batch_size, data_seed) if callable(images) else BatchStream(images, cfg.batch_size, data_seed)

    ckpt_dir = Path(ckpt_dir) if ckpt_dir and cfg.ckpt_every else None
    start = (_load_checkpoint(ckpt_dir, fingerprint, acc.unwrap_model(model), ema, optimizer, objective,
                              acc.scaler) if ckpt_dir else 0)
    # what went to `log` up to the checkpoint: replayed on resume, so the curve of a resumed run is complete
    # and the loss terms of the steps since the last logged one, so the next logged average is the same too
    history, window = _load_history(ckpt_dir) if start else ([], {})
    if log is not None and acc.is_main_process:
        for past_step, metrics in history:
            log(metrics, past_step)
    with warnings.catch_warnings():  # fast-forward the LR schedule on resume (it is a function of the step)
        warnings.simplefilter("ignore")
        for _ in range(start):
            scheduler.step()

    model.train()
    t0, seen = time.perf_counter(), 0
    bar = tqdm(range(start, cfg.iterations), desc=desc, initial=start, total=cfg.iterations,
               disable=not acc.is_main_process, dynamic_ncols=True)
    for step in bar:
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            x0, extra = stream(m), {}
            if isinstance(x0, tuple):  # (latents, token ids): the prompt condition of a text-to-image model
                x0, ids = x0
                extra = {"cond": condition(ids.to(acc.device))}
            x0 = x0.to(acc.device)
            gen = torch.Generator().manual_seed(derive_seed(seed, "step", m, acc.process_index))
            with acc.accumulate(model), acc.autocast():
                loss, terms = objective(forward_model, x0, gen, **extra)
                if not torch.isfinite(loss):
                    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                    last = f"; last good checkpoint: {ckpt_dir}" if ckpt_dir and ckpt_dir.exists() else ""
                    raise NonFiniteLossError(f"{desc}: non-finite loss at step {step + 1} ({shown}){last}")
                acc.backward(loss)
                if acc.sync_gradients and cfg.clip_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                optimizer.step()
                if acc.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                window.setdefault(k, []).append(float(v))
            seen += x0.shape[0]
        ema.step(acc.unwrap_model(model).parameters())
        done = step + 1
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0:
            t_eval = time.perf_counter()
            scores = _evaluate_ema(evaluate, acc.unwrap_model(model), ema, done)
            model.train()
            if log is not None and acc.is_main_process:
                log(scores, done)
                history.append((done, scores))
            t0 += time.perf_counter() - t_eval  # keep images/s a training throughput
        if done % cfg.log_every == 0 or done == cfg.iterations:
            metrics = {k: sum(v) / len(v) for k, v in window.items()}
            metrics["ema_decay"] = ema.cur_decay_value or 0.0
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["images_per_s"] = seen * acc.num_processes / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if log is not None and acc.is_main_process:
                log(metrics, done)
                history.append((done, metrics))
            window, t0, seen = {}, time.perf_counter(), 0
        if (ckpt_dir and acc.is_main_process and ((done % cfg.ckpt_every == 0 and done < cfg.iterations)
                                                   or (keep_final and done == cfg.iterations))):
            _save_checkpoint(ckpt_dir, done, fingerprint, acc.unwrap_model(model), ema, optimizer, objective,
                             acc.scaler, history, window)
    bar.close()

    acc.wait_for_everyone()
    final = acc.unwrap_model(model)
    ema.copy_to(final.parameters())  # task vectors are computed from the EMA weights (docs/paper.md §1.6)
    return final.eval()


def _evaluate_ema(evaluate: EvalFn, model: nn.Module, ema, step: int) -> dict[str, float]:
    """Run ``evaluate`` on the EMA weights, then put the training weights back."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        model.eval()
        return evaluate(model, step)
    finally:
        ema.restore(model.parameters())


# ----------------------------------------------------------------------------------------------------
# Resumable checkpoints: safetensors for weights, weights_only torch.load for optimizer state.


def _save_checkpoint(path: Path, step: int, fingerprint: str, model: nn.Module, ema, optimizer,
                     objective=None, scaler=None, history=(), window=None) -> None:
    """Model, EMA, optimiser, fp16 loss scaler, step, the objective's own state and the logged curve so far,
    with the settings' fingerprint, the digest of the stage's code (deme/codedeps.py) and the thread count (on CPU
    the floats depend on it). No RNG state is needed: every draw of step s comes from a generator seeded by (seed, s), see the module
    docstring."""
    from safetensors.torch import save_file

    from deme.resume import run_context

    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)},
                  str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        extra = getattr(objective, "extra_state", None)  # e.g. ANT's Nash weights and step counter
        write_json(tmp / "history.json", {"log": [[s, {k: float(v) for k, v in m.items()}] for s, m in history],
                                           "window": window or {}})
        write_json(tmp / "state.json", {"step": step, "fingerprint": fingerprint, **run_context(),
                                         "ema_optimization_step": ema.optimization_step,
                                         "objective": extra() if extra else None})
    saved(f"{path} step {step}")


def _load_history(path: Path) -> tuple[list[tuple[int, dict[str, float]]], dict[str, list[float]]]:
    """What was logged before the checkpoint, as (step, metrics) pairs, and the loss terms of the steps
    since the last logged one (empty for a checkpoint without them)."""
    from deme.io import read_json
    from deme.models import CheckpointError

    if not (path / "history.json").exists():
        return [], {}
    num = lambda v: float("nan") if v is None else float(v)  # noqa: E731 (JSON has no NaN)
    try:
        data = read_json(path / "history.json")
        return ([(int(s), {k: num(v) for k, v in m.items()}) for s, m in data["log"]],
                {k: [num(v) for v in vs] for k, vs in data["window"].items()})
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{path / 'history.json'}: corrupt training log ({e}); delete {path} to start the "
                              f"stage over") from None


def _load_checkpoint(path: Path, fingerprint: str, model: nn.Module, ema, optimizer, objective=None,
                     scaler=None) -> int:
    from safetensors.torch import load_file

    from deme.resume import run_context, why_stale

    state_file = path / "state.json"
    if not state_file.exists():
        return 0
    try:
        state = json.loads(state_file.read_text())
        new = run_context()
        why = why_stale({"inputs": state.get("fingerprint"), **{k: state.get(k) for k in new}},
                        {"inputs": fingerprint, **new})
        if why:
            print(f"[resume] {path}: checkpoint was made with {why}; starting over")
            shutil.rmtree(path)
            return 0
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        shadow = load_file(str(path / "ema.safetensors"))
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(shadow[str(i)].to(p.device))
        ema.optimization_step = state["ema_optimization_step"]
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        if scaler is not None and (path / "scaler.pt").exists():
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        if state.get("objective") is not None:
            objective.load_extra_state(state["objective"])
    except Exception as e:  # one line: the first line of the loader's message (torch's can run to pages)
        from deme.models import CheckpointError

        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{path}: corrupt, truncated or unsafe training checkpoint ({type(e).__name__}: "
                              f"{reason}); delete the folder to start the stage over") from None
    print(f"[resume] {path}: resuming at step {state['step']}")
    return int(state["step"])


def clear_checkpoint(path: str | Path | None) -> None:
    if path and Path(path).exists():
        shutil.rmtree(path)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)

