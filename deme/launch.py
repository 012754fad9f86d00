"""Run a stage on ``runtime.num_processes`` processes: ``python -m deme.launch stages/<stage>.py [args]``.

With one process (every CPU profile) the stage runs directly, with no launcher overhead. With N > 1 it
becomes ``accelerate launch --multi_gpu --num_processes N stages/<stage>.py [args]`` (one process per GPU;
on a machine without GPUs the processes share the CPU through gloo). dvc.yaml uses this for the stages that
train, sample or extract features; the stage code splits work with deme/distributed.py.
"""
from __future__ import annotations

import os
import shutil
import sys


def command(script: str, args: list[str], num_processes: int) -> list[str]:
    from deme.distributed import launched

    if num_processes == 1 or launched():
        return [sys.executable, script, *args]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        raise SystemExit("error: runtime.num_processes > 1 needs the `accelerate` command (pip install accelerate)")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]


def num_processes(args: list[str]) -> int:
    """runtime.num_processes of the stage's parameters (the `t2i:` section for a --t2i stage)."""
    from deme.config import load_config

    params = args[args.index("--params") + 1] if "--params" in args[:-1] else "params.yaml"
    return load_config(params, "t2i" if "--t2i" in args else None).runtime.num_processes


def main(argv: list[str] | None = None) -> int:
    from deme.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    script, args = argv[0], argv[1:]
    try:
        n = num_processes(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = command(script, args, n)
    if n > 1:
        print(f"[launch] {' '.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
