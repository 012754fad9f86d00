"""runtime.cpu_kernels (deme/numerics.py): `portable` pins torch's ATen, MKL and oneDNN kernels to AVX2 so a
result is bit for bit the same on every x86-64 CPU; a stage run under it reports AVX2; a bad value is one line."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from deme.config import ConfigError, config_from_mapping

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _kernels_in_fresh_process(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    code = ("from deme.numerics import pin_cpu_kernels, cpu_kernels; import torch; "
            f"pin_cpu_kernels({mode!r}); torch.ones(3).sum(); print(cpu_kernels())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not X86, reason="the pin is for x86-64 CPUs")
def test_portable_pins_all_three_libraries_to_avx2():
    assert _kernels_in_fresh_process("portable") == "AVX2/MKL_CBWR=AVX2,STRICT/ONEDNN_MAX_CPU_ISA=AVX2"


@pytest.mark.skipif(not X86, reason="the pin is for x86-64 CPUs")
def test_native_leaves_the_choice_to_torch():
    import torch

    env_pinned = os.environ.get("ATEN_CPU_CAPABILITY")
    got = _kernels_in_fresh_process("native")
    assert got.split("/")[0] == (torch.backends.cpu.get_cpu_capability() if not env_pinned else got.split("/")[0])
    assert "MKL_CBWR" not in got


def test_a_bad_value_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"runtime\.cpu_kernels.*portable.*native"):
        config_from_mapping({"profile": "micro", "runtime": {"cpu_kernels": "avx512"}})


def test_the_embedded_profiles_are_portable():
    from deme.profiles import PROFILES

    assert {n for n, p in PROFILES.items() if p["runtime"]["cpu_kernels"] == "portable"} == {"tiny", "tiny_t2i"}
