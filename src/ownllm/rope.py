"""Rotary position embeddings (RoPE): the frequency of each pair of dimensions, its scaled variants, and the rotation.

    cos, sin = rope_tables(head_size=64, max_positions=2048, theta=500000.0,
                           scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    q = apply_rope(q, cos[positions], sin[positions])

Pair i of a head of size d turns by `position * theta ** (-2i / d)`. A `scaling` dict (the keys Hugging Face's
`rope_scaling` / `rope_parameters` use) stretches those frequencies so a model reaches past the context it was
pretrained on:
- `linear`: every frequency divided by `factor` (position interpolation);
- `llama3` (Llama 3.1 / 3.2): low frequencies (wavelengths above `original_max_position_embeddings /
  low_freq_factor`) divided by `factor`, high ones (below `... / high_freq_factor`) kept, a smooth blend between;
- `yarn`: the same idea with a linear ramp over dimensions set by `beta_fast` / `beta_slow`, and cos/sin scaled by
  an attention factor (`0.1 ln(factor) + 1` unless given).
The tables use the rotate-half layout of Hugging Face Llama: dimension j and j + d/2 form a pair.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

SCALING_KINDS = ("linear", "llama3", "yarn")
REQUIRED_KEYS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "yarn": ("factor", "original_max_position_embeddings")}


def scaling_problem(scaling: dict[str, Any] | None) -> str | None:
    """Why `scaling` is not one ownllm computes (a line naming the key), or None when it is."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type")
    if kind not in SCALING_KINDS:
        return f"rope_scaling rope_type={kind!r} is not supported (ownllm computes {', '.join(SCALING_KINDS)})"
    missing = [key for key in REQUIRED_KEYS[kind] if scaling.get(key) is None]
    if missing:
        return f"rope_scaling of rope_type {kind!r} needs {missing[0]}"
    if float(scaling["factor"]) <= 0:
        return f"rope_scaling factor must be positive, not {scaling['factor']}"
    return None


def inverse_frequencies(head_size: int, theta: float, scaling: dict[str, Any] | None = None) -> tuple[Tensor, float]:
    """(the turn per position of each of the head_size/2 pairs [float64], the factor cos and sin are scaled by)."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.float64) / head_size
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(inv_freq, head_size, theta, scaling)


def _llama3(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow pairs, 1: fast pairs
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(wavelength > context / low, inv_freq / factor,
                       torch.where(wavelength < context / high, inv_freq, blended))


def _yarn(inv_freq: Tensor, head_size: int, theta: float, scaling: dict[str, Any]) -> tuple[Tensor, float]:
    factor = float(scaling["factor"])
    context = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return head_size * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_size - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_size // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
    kept = 1 - ramp  # 1: the pair keeps its frequency (fast pairs), 0: divided by factor
    inv_freq = inv_freq / factor * (1 - kept) + inv_freq * kept
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)


def rope_tables(head_size: int, max_positions: int, theta: float,
                scaling: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables [max_positions, head_size] in the rotate-half layout used by Hugging Face Llama."""
    inv_freq, attention_factor = inverse_frequencies(head_size, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k [batch, heads, time, head_size] by position; cos/sin are [batch, 1, time, head_size]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


__all__ = ["rope_tables", "apply_rope", "inverse_frequencies", "scaling_problem", "SCALING_KINDS"]
