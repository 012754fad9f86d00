"""What every stage CLI shares: ``--params``, validated config, one MLflow run, a summary, clean errors.

A stage script is ``run_stage(name, __doc__, body, add_args)`` where ``body(ctx)`` does the work and
records what it wrote with ``ctx.wrote(path)``. User errors (bad params, missing or corrupt inputs, a
non-finite loss) end with one line on stderr and exit status 2; nothing is written before validation.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deme.config import Config, ConfigError, load_config
from deme.memory import check_counts


TRAINING_STAGES = ("pretrain", "finetune", "sweep", "clip")  # MLflow system metrics and the data set as input


class StageError(RuntimeError):
    """A user-facing failure with a one-line explanation."""


@dataclass
class StageContext:
    cfg: Config
    args: argparse.Namespace
    run: Any  # deme.tracking.Run
    outputs: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def wrote(self, path: str | Path, note: str = "") -> None:
        self.outputs.append((Path(path), note))

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(text)

    @property
    def device(self):
        from deme.train import resolve_device

        device = resolve_device(self.cfg.runtime.device)
        if device.type == "cuda":  # one GPU per process under accelerate launch
            from deme.distributed import current
            import torch

            return torch.device("cuda", current().rank % torch.cuda.device_count())
        return device

    @property
    def is_main(self) -> bool:
        """False on the extra processes of `accelerate launch`: they compute, only the main one writes."""
        from deme.distributed import current

        return current().is_main


def _size(p: Path) -> str:
    if not p.exists():
        return ""
    n = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def run_stage(name: str, doc: str | None, body: Callable[[StageContext], None], *,
              add_args: Callable[[argparse.ArgumentParser], None] | None = None,
              item: Callable[[argparse.Namespace], str | None] = lambda a: None,
              params: Callable[[Config, argparse.Namespace], dict] | None = None,
              tags: Callable[[Config, argparse.Namespace], dict] | None = None,
              argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"stages/{name}.py", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    ap.add_argument("--t2i", action="store_true",
                    help="run for the text-to-image pipeline (the `t2i:` section of the parameters file)")
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.params, "t2i" if args.t2i else None)
        check_counts(cfg)
    except ConfigError as e:  # file-level errors (missing, not YAML) already start with the file's name
        where = "" if not e.key and str(e).startswith(f"{Path(args.params)}:") else f"{args.params}: "
        print(f"error: {where}{e}", file=sys.stderr)
        return 2

    import torch

    from deme.distributed import init
    from deme.models import CheckpointError
    from deme.tracking import TrackingError, flatten, null_run, stage_run
    from deme.numerics import KernelError, pin_cpu_kernels
    from deme.train import NonFiniteLossError, resolve_device, set_threads

    try:
        pin_cpu_kernels(cfg.runtime.cpu_kernels)
    except KernelError as e:
        print(f"error: {args.params}: {e}", file=sys.stderr)
        return 2
    set_threads(cfg.runtime.num_threads)
    torch.manual_seed(cfg.seed)
    dist = init(cpu=resolve_device(cfg.runtime.device).type == "cpu")
    it = item(args)
    label = f"{name}@{it}" if it else name
    t0 = time.perf_counter()
    try:
        stage_tags = {**(tags(cfg, args) if tags else {}), "num_processes": dist.world, "task": cfg.task}
        # every setting of the profile, so MLflow's compare view shows what differs between any two runs
        settings = {**flatten(cfg.to_dict()), **flatten(params(cfg, args) if params else {}),
                    "method": stage_tags.get("method", it or name)}
        training = name in TRAINING_STAGES
        opened = (stage_run(name, cfg.profile, item=it, params=settings, tags=stage_tags, system_metrics=training)
                  if dist.is_main else null_run())
        with opened as run:
            if training:
                from deme.paths import Paths

                train = Paths(cfg.profile).train
                if train.exists():
                    run.log_dataset(train, f"{cfg.profile}/train")
            ctx = StageContext(cfg, args, run)
            body(ctx)
            run.log_metrics({"stage_seconds": time.perf_counter() - t0})
    except (StageError, CheckpointError, NonFiniteLossError, TrackingError, FileNotFoundError, ValueError) as e:
        print(f"error: {label}{'' if dist.is_main else f' (process {dist.rank})'}: {e}", file=sys.stderr)
        return 2
    if not dist.is_main:
        return 0
    elapsed = time.perf_counter() - t0
    print(f"\n[{label}] done in {elapsed:.1f} s (profile {cfg.profile}, MLflow run {run.id[:8]})")
    for path, note in ctx.outputs:
        print(f"  wrote {path}  {_size(path)}" + (f"  ({note})" if note else ""))
    return 0
