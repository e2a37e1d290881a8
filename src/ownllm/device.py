"""Device and precision: chosen once, passed everywhere.

`pick_device("auto")` gives CUDA when present, else the CPU. `pick_precision("auto", device)` gives bf16 where the
hardware multiplies bf16 natively (CUDA with bf16 support; CPUs with AMX or AVX512-BF16) and fp32 otherwise.
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


def pick_precision(name: str, device: torch.device) -> str:
    """Resolve "auto" to "bf16" or "fp32" for this device; reject bf16 where it cannot run."""
    if name not in ("auto", "bf16", "fp32"):
        raise OwnLLMError(f"--precision must be auto, bf16 or fp32, not {name!r}")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = device.type == "cpu" and cpu_has_native_bf16()
    if name == "auto":
        return "bf16" if supported else "fp32"
    return name


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
