"""Tolerances for comparing the floats two code paths compute from the same weights.

Two correct code paths (ours and transformers', merged and unmerged LoRA, a KV cache and a full forward, a batch and
a row alone) add the same numbers in different orders, and which order a machine uses depends on its CPU (AMX or not,
AVX-512 or not) and on the kernels PyTorch picks there. Their difference is rounding: about the dtype's machine
epsilon, times the size of the values, growing with each layer the error passes through. A tolerance set at the edge
of what one machine measured fails on the next, so every parity test takes its tolerance from here:

    atol = FACTOR * eps(dtype) * max(1, |expected|.max()) * (layers + 1),   rtol = 0

FACTOR leaves a margin of at least 10x over the largest difference any parity test measured (see docs/testing.md);
`pytest -v` prints, for each comparison, the largest difference seen against its tolerance, so a test that runs close
to its limit shows before it fails elsewhere. Comparisons of the same code path (a resumed run against an
uninterrupted one, a file written and read back) stay exact and do not use this module.
"""

from __future__ import annotations

import torch

# Measured on a 2-core CPU without AMX: the largest difference of any comparison was 1.05e-5, 4.7 eps x scale x
# (layers + 1) (test_hf's folded LoRA weights against transformers); 128 leaves a margin of 27x (`pytest -v`).
FACTOR = 128.0

current_tests: list = []  # the pytest item running now (set by conftest), whose report carries the margins


def parity_tolerance(expected: torch.Tensor, layers: int, dtype: torch.dtype | None = None) -> float:
    """The absolute tolerance for values computed through `layers` layers in `dtype` (default: expected's)."""
    eps = torch.finfo(dtype or expected.dtype).eps
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    return FACTOR * eps * scale * (layers + 1)


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, *, layers: int, dtype: torch.dtype | None = None,
                  what: str = "") -> None:
    """`actual` equals `expected` up to the rounding of `layers` layers in `dtype`; records the margin for `-v`."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = dtype or expected.dtype
    actual = actual.to(expected.dtype)  # values a JSON or numpy round trip widened compare in the computation's dtype
    atol = parity_tolerance(expected, layers, dtype)
    difference = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    if current_tests:
        current_tests[-1].user_properties.append(("parity", (what, difference, atol)))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{what or 'parity'}: {m}")
