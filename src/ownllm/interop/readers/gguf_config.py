"""What a GGUF header says about the open models' options, in ownllm's terms: RoPE scaling, Qwen3's q/k norms,
SmolLM3's layers without RoPE and Gemma 3's local layers.

llama.cpp writes some of these as keys and fixes others in its code, per architecture (src/llama-model.cpp):
- `llama` with Llama 3.x scaling: no key, a tensor `rope_freqs.weight` dividing each pair's frequency. Its llama3
  parameters are recovered as Meta set them for Llama 3.1 / 3.2 (low_freq_factor 1, high_freq_factor 4, an original
  context of 8192 unless `rope.scaling.original_context_length` says otherwise, factor the largest divisor) and
  checked against the tensor; a file whose divisors follow another rule is refused. `rope.scaling.type` linear /
  yarn are keys. A file ownllm wrote also carries `ownllm.rope_scaling` (the exact parameters, JSON).
- `smollm3`: no key; every fourth layer has no RoPE (llama.cpp's `n_no_rope_layer_step = 4`).
- `gemma3`: the sliding window is a key; five local layers of every six, local RoPE base 10000, queries scaled by
  1/sqrt(head size) (1/sqrt(n_embd / n_head) for the 62-layer 27B) are fixed, and the norm gains are stored whole
  (1 + Hugging Face's weight).
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

from torch import Tensor

from ownllm.errors import OwnLLMError
from ownllm.rope import inverse_frequencies, scaling_problem

GEMMA3_PATTERN = 6  # llama.cpp: layer i is local unless (i + 1) % 6 == 0
GEMMA3_LOCAL_THETA = 10000.0
SMOLLM3_NOPE_STEP = 4  # llama.cpp: layer i has no RoPE where (i + 1) % 4 == 0
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
OWNLLM_ROPE_SCALING = "ownllm.rope_scaling"


class Keys(Protocol):
    path: Any

    def get(self, key: str, default: Any = None) -> Any: ...

    def refuse(self, key: str, why: str) -> OwnLLMError: ...


def gemma3_local_layers(n_layer: int) -> tuple[int, ...]:
    return tuple(i for i in range(n_layer) if (i + 1) % GEMMA3_PATTERN)


def smollm3_nope_layers(n_layer: int) -> tuple[int, ...]:
    return tuple(i for i in range(n_layer) if (i + 1) % SMOLLM3_NOPE_STEP == 0)


def gemma3_query_scalar(n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
    return float(n_embd // n_head if n_layer == 62 else head_dim)


def family_fields(arch: str, keys: Keys, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> dict[str, Any]:
    """The ModelConfig fields an architecture adds to the Llama layout."""
    if arch == "qwen3":
        return dict(qk_norm=True, qk_norm_gain=True)
    if arch == "smollm3":
        return dict(nope_layers=smollm3_nope_layers(n_layer))
    if arch != "gemma3":
        if keys.get(f"{arch}.attention.sliding_window"):
            raise keys.refuse(f"{arch}.attention.sliding_window", f"ownllm reads sliding windows of gemma3 files")
        return {}
    window = keys.get("gemma3.attention.sliding_window")
    if not isinstance(window, int) or window <= 0:
        raise keys.refuse("gemma3.attention.sliding_window", "a positive window size expected")
    softcap = keys.get("gemma3.final_logit_softcapping")
    return dict(mlp="geglu", qk_norm=True, qk_norm_gain=True, norm_offset=1.0, sandwich_norm=True,
                scale_embeddings=True, sliding_window=window, local_layers=gemma3_local_layers(n_layer),
                local_rope_theta=GEMMA3_LOCAL_THETA,
                query_pre_attn_scalar=gemma3_query_scalar(n_layer, n_embd, n_head, head_dim),
                logit_softcap=float(softcap) if softcap else None)


def rope_scaling_from_gguf(keys: Keys, arch: str, head_dim: int, theta: float,
                           rope_freqs: Tensor | None) -> dict[str, Any] | None:
    """The RoPE scaling of a file (None for plain RoPE); one OwnLLMError naming the key or tensor otherwise."""
    exact = keys.get(OWNLLM_ROPE_SCALING)
    if isinstance(exact, str):
        scaling = json.loads(exact)
        problem = scaling_problem(scaling)
        if problem:
            raise keys.refuse(OWNLLM_ROPE_SCALING, problem)
        return scaling
    if rope_freqs is not None:
        return _llama3_from_divisors(keys, arch, head_dim, theta, rope_freqs)
    kind = keys.get(f"{arch}.rope.scaling.type", "none")
    factor = keys.get(f"{arch}.rope.scaling.factor")
    if kind in ("none", None) or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "yarn":
        raise keys.refuse(f"{arch}.rope.scaling.type", "ownllm computes linear, yarn and llama3 (rope_freqs)")
    scaling = {"rope_type": "yarn", "factor": float(factor or 1.0),
               "original_max_position_embeddings": keys.get(f"{arch}.rope.scaling.original_context_length")}
    for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if keys.get(f"{arch}.rope.scaling.{theirs}") is not None:
            scaling[ours] = float(keys.get(f"{arch}.rope.scaling.{theirs}"))
    problem = scaling_problem(scaling)
    if problem:
        raise keys.refuse(f"{arch}.rope.scaling.type", problem)
    return scaling


def llama3_divisors(head_dim: int, theta: float, scaling: dict[str, Any]) -> Tensor:
    """llama.cpp's `rope_freqs`: what each pair's frequency is divided by under `scaling`."""
    plain, _ = inverse_frequencies(head_dim, theta)
    scaled, _ = inverse_frequencies(head_dim, theta, scaling)
    return (plain / scaled).float()


def _llama3_from_divisors(keys: Keys, arch: str, head_dim: int, theta: float, divisors: Tensor) -> dict[str, Any]:
    if arch != "llama" or divisors.numel() != head_dim // 2:
        raise keys.refuse("rope_freqs.weight", f"per-pair RoPE divisors are read for llama files, {head_dim // 2} "
                                               "of them")
    context = keys.get(f"{arch}.rope.scaling.original_context_length") or \
        LLAMA3_DEFAULTS["original_max_position_embeddings"]
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **LLAMA3_DEFAULTS,
               "original_max_position_embeddings": int(context)}
    expected = llama3_divisors(head_dim, theta, scaling)
    if not math.isclose(float((expected - divisors.float()).abs().max()), 0.0, abs_tol=1e-3 * scaling["factor"]):
        raise OwnLLMError(f"{keys.path}: tensor rope_freqs.weight does not follow Llama 3's rule (low_freq_factor 1, "
                          f"high_freq_factor 4, original context {context}); ownllm cannot compute this RoPE")
    return scaling


__all__ = ["family_fields", "rope_scaling_from_gguf", "llama3_divisors", "gemma3_local_layers",
           "smollm3_nope_layers", "gemma3_query_scalar", "GEMMA3_LOCAL_THETA", "OWNLLM_ROPE_SCALING"]
