"""Which CPU kernels torch runs: a setting (`runtime.cpu_kernels`), because the floats depend on it.

torch picks the code paths of its own kernels (ATen), of MKL (matrix products) and of oneDNN (convolutions)
by the CPU it runs on: AVX2, AVX-512, AMX. Each path sums in its own order, so one training step gives other
bits on two x86-64 machines of other generations. `portable` pins all three to AVX2, which every x86-64 CPU
since 2013 runs (MKL in its strict conditional-reproducibility mode, independent of memory alignment), so a
result is bit for bit the same on any such machine at one `runtime.num_threads`. `native` lets torch choose:
faster on AVX-512 machines (the tiny UNet's training step about 1.7x; docs/reliability.md), bits that depend
on the CPU model. Off x86-64 (and on GPUs, for the GPU's own work) the setting changes nothing.
"""
from __future__ import annotations

import os
import platform

PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MODES = ("portable", "native")


class KernelError(RuntimeError):
    """The pinned kernels cannot be had in this process."""


def pin_cpu_kernels(mode: str) -> None:
    """Apply ``runtime.cpu_kernels`` to this process; call it before the first torch operation (the three
    libraries read their variable once, on first use)."""
    if mode != "portable" or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    os.environ.update(PORTABLE)
    import torch

    got = torch.backends.cpu.get_cpu_capability()
    if got != "AVX2":
        raise KernelError(f"runtime.cpu_kernels: portable needs torch's AVX2 kernels, this process runs {got} "
                          "(a CPU without AVX2, or torch ran before the pin); allowed: portable, native")


def cpu_kernels() -> str:
    """The kernels this process runs, as resume records and metrics note them."""
    import torch

    return "/".join([torch.backends.cpu.get_cpu_capability(),
                     *(f"{k}={os.environ[k]}" for k in PORTABLE if k != "ATEN_CPU_CAPABILITY" and k in os.environ)])
