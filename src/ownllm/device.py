"""Device and precision: chosen once, passed everywhere.

`pick_device("auto")` gives CUDA when present, else the CPU. `pick_precision("auto", device, n_embd=...)` gives bf16
where it trains faster than fp32: CUDA with bf16 support, and CPUs with AMX-BF16 tiles for models at least
`CPU_BF16_MIN_EMBD` wide; fp32 otherwise. On a CPU with AVX512-BF16 but no AMX, bf16 matmuls measured about half the
speed of fp32, and on tiny models autocast's per-op casts cost more than the products save (docs/benchmarks.md).
`autocast(device, precision)` is the context the forward pass runs in. `matmul_peak_flops` measures the machine's
matrix-multiply throughput, the denominator of MFU.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from ownllm.errors import OwnLLMError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OwnLLMError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OwnLLMError(f"--device {name!r} is not a device torch knows (try cpu or cuda)") from None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 instructions (Linux: read from /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """True when the CPU exposes AMX-BF16 tiles (Linux: read from /proc/cpuinfo); VMs often hide them."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# On a CPU, bf16 autocast pays a cast per matmul input; below this width the products are too small for AMX to win
# that back (the 128-wide `baby` model trains about 2x slower in bf16 than in fp32).
CPU_BF16_MIN_EMBD = 512


def pick_precision(name: str, device: torch.device, n_embd: int | None = None) -> str:
    """Resolve "auto" to "bf16" or "fp32" for this device (and, on a CPU, the model width `n_embd` when known)."""
    if name not in ("auto", "bf16", "fp32"):
        raise OwnLLMError(f"--precision must be auto, bf16 or fp32, not {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    wide_enough = n_embd is None or n_embd >= CPU_BF16_MIN_EMBD
    return "bf16" if device.type == "cpu" and cpu_has_amx_bf16() and wide_enough else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The mixed-precision context for the forward pass (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def matmul_peak_flops(device_type: str, precision: str, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul at `size` in the given precision (best of `repeats`)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # Constant inputs: the timing does not depend on the values, and the global RNG stays untouched
    # (a resumed run must draw the same dropout masks as an uninterrupted one).
    a = torch.full((size, size), 0.5, device=device_type, dtype=dtype)
    b = torch.full((size, size), 0.25, device=device_type, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
