"""A Hugging Face config.json in ownllm's terms: the `ModelConfig` that computes the same function.

    model_config_from_hf(json.load(open("config.json")), "config.json")   # a ModelConfig, or one OwnLLMError

Families (`model_type`): `gpt2`; `llama` (with `rope_scaling` linear / llama3 / yarn: Llama 3.1 / 3.2), `qwen2`,
`qwen3` (q/k norms with a gain), `smollm3` (layers without RoPE, `no_rope_layers`), `gemma3_text` (GeGLU, four
norms per block with (1 + weight), embeddings times sqrt(d), `query_pre_attn_scalar`, sliding-window layers with
their own RoPE base, final logit soft-capping; transformers' Gemma 3 ignores `attn_logit_softcapping`, and so does
ownllm) and `gemma3`, an image-text checkpoint whose `text_config` is read (the vision tower is left
out). transformers writes only the values that differ from its config class's defaults, so a missing key means the
default below; v4 spells RoPE settings `rope_theta` / `rope_scaling`, v5 `rope_parameters` (per layer type for
Gemma 3): both are read. Anything the model cannot compute (a mixture of experts, a vision tower in another family,
an activation or RoPE kind ownllm lacks) is one OwnLLMError naming the file and key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ownllm.checkpoint import CONFIG_FILE
from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.rope import SCALING_KINDS, scaling_problem

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "smollm3", "gemma3_text", "gemma3")

_LLAMA_LIKE = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                   attention_bias=False, mlp_bias=False, head_dim=None, num_key_value_heads=None)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
    "llama": dict(_LLAMA_LIKE, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048),
    "qwen2": dict(_LLAMA_LIKE, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(_LLAMA_LIKE, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "smollm3": dict(_LLAMA_LIKE, vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                    tie_word_embeddings=True, rope_theta=2000000.0, use_sliding_window=False, sliding_window=None,
                    no_rope_layers=None, no_rope_layer_interval=4),
    "gemma3_text": dict(_LLAMA_LIKE, vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                        tie_word_embeddings=True, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        final_logit_softcapping=None, attn_logit_softcapping=None,
                        use_bidirectional_attention=False),
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the same function, written three ways
# Settings of models ownllm's one class cannot compute: a true value is refused, naming the key.
_REFUSED = {"num_experts": "mixture-of-experts layers", "num_local_experts": "mixture-of-experts layers",
            "n_routed_experts": "mixture-of-experts layers", "moe_intermediate_size": "mixture-of-experts layers",
            "vision_config": "a vision tower", "audio_config": "an audio tower",
            "use_bidirectional_attention": "bidirectional attention (an encoder)"}
_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                 "beta_slow", "attention_factor", "truncate")


def unsupported(source: Path | str, key: str, value: Any, why: str) -> OwnLLMError:
    return OwnLLMError(f"{source}: {key}={value!r} is not supported ({why})")


def text_config(hf: dict[str, Any], source: Path | str = CONFIG_FILE) -> dict[str, Any]:
    """The language model's config: `text_config` of a Gemma 3 image-text checkpoint, else the config itself."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise OwnLLMError(f"{source}: model_type 'gemma3' without a text_config object")
    log.warning("%s: a Gemma 3 image-text checkpoint; ownllm reads its language model and leaves the vision tower "
                "out", source)
    return {"model_type": "gemma3_text", **{k: v for k, v in text.items() if k != "model_type"}}


def model_config_from_hf(hf: dict[str, Any], source: Path | str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig equal to an HF config.json (a dict); unsupported settings are an OwnLLMError naming the key."""
    hf = text_config(hf, source)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OwnLLMError(f"{source}: model_type {model_type!r} is not supported "
                          f"(ownllm reads {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key, what in _REFUSED.items():
        if hf.get(key):
            raise unsupported(source, key, _short(hf[key]), f"ownllm's model has no {what}")
    values = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k == "n_inner"}}
    if model_type == "gpt2":
        return _gpt2(values, source)
    return _llama_like(model_type, values, source)


def _short(value: Any) -> Any:
    return "{...}" if isinstance(value, dict) else value


def _gpt2(values: dict[str, Any], source: Path | str) -> ModelConfig:
    if values["activation_function"] not in _GELU_TANH:
        raise unsupported(source, "activation_function", values["activation_function"],
                          f"ownllm's GPT-2 MLP uses {_GELU_TANH[0]}")
    if values["scale_attn_by_inverse_layer_idx"] or not values["scale_attn_weights"]:
        key = "scale_attn_weights" if not values["scale_attn_weights"] else "scale_attn_by_inverse_layer_idx"
        raise unsupported(source, key, values[key], "attention is always scaled by 1/sqrt(head size)")
    if values["add_cross_attention"]:
        raise unsupported(source, "add_cross_attention", True, "ownllm models are decoder-only")
    return ModelConfig(vocab_size=values["vocab_size"], block_size=values["n_positions"], n_layer=values["n_layer"],
                       n_head=values["n_head"], n_embd=values["n_embd"], mlp_hidden=values["n_inner"], bias=True,
                       norm="layernorm", norm_eps=values["layer_norm_epsilon"], mlp="gelu", position="learned",
                       tie_embeddings=bool(values["tie_word_embeddings"]))


def _llama_like(model_type: str, values: dict[str, Any], source: Path | str) -> ModelConfig:
    """llama, qwen2, qwen3, smollm3 and gemma3_text: one layout with a few switches."""
    gemma = model_type == "gemma3_text"
    activation = values.get("hidden_activation") if gemma else values["hidden_act"]
    if activation != ("gelu_pytorch_tanh" if gemma else "silu") and not (gemma and activation in _GELU_TANH):
        key = "hidden_activation" if gemma else "hidden_act"
        raise unsupported(source, key, activation, "the MLP is SwiGLU with silu (GeGLU with gelu-tanh for Gemma)")
    theta, scaling = rope_settings(values, source, "full_attention")
    attention_bias = bool(values["attention_bias"])
    head_dim = values["head_dim"]
    if head_dim is not None and head_dim * values["num_attention_heads"] == values["hidden_size"]:
        head_dim = None  # the default, spelt out
    fields: dict[str, Any] = dict(
        vocab_size=values["vocab_size"], block_size=values["max_position_embeddings"],
        n_layer=values["num_hidden_layers"], n_head=values["num_attention_heads"], n_embd=values["hidden_size"],
        n_kv_head=values["num_key_value_heads"], head_dim=head_dim, mlp_hidden=values["intermediate_size"],
        bias=attention_bias, qkv_bias=attention_bias, mlp_bias=bool(values["mlp_bias"]), norm="rmsnorm",
        norm_eps=values["rms_norm_eps"], mlp="geglu" if gemma else "swiglu", position="rope", rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(values["tie_word_embeddings"]))
    if model_type == "qwen2":
        fields.update(bias=False, qkv_bias=True, mlp_bias=False)
    if model_type in ("qwen3", "gemma3_text"):
        fields.update(qk_norm=True, qk_norm_gain=True)
    if model_type == "smollm3":
        fields["nope_layers"] = _nope_layers(values, source)
    fields.update(_windows(model_type, values, source))
    if gemma:
        fields.update(_gemma(values, source))
    return ModelConfig(**fields)


def _gemma(values: dict[str, Any], source: Path | str) -> dict[str, Any]:
    local_theta, local_scaling = rope_settings(values, source, "sliding_attention")
    if local_scaling is not None:
        raise unsupported(source, "rope_parameters.sliding_attention", local_scaling["rope_type"],
                          "the local layers' RoPE is unscaled")
    return dict(norm_offset=1.0, sandwich_norm=True, scale_embeddings=True,
                query_pre_attn_scalar=float(values["query_pre_attn_scalar"]), local_rope_theta=local_theta,
                logit_softcap=values["final_logit_softcapping"])  # attn_logit_softcapping: unused by Gemma 3


def _nope_layers(values: dict[str, Any], source: Path | str) -> tuple[int, ...]:
    """SmolLM3's `no_rope_layers`: 1 where a layer uses RoPE, 0 where it has no positional encoding."""
    flags = values.get("no_rope_layers")
    n_layer = values["num_hidden_layers"]
    if flags is None:
        interval = values["no_rope_layer_interval"]
        return tuple(i for i in range(n_layer) if (i + 1) % interval == 0)
    if not isinstance(flags, list) or len(flags) < n_layer:
        raise unsupported(source, "no_rope_layers", _short(flags), f"one 0/1 flag per layer ({n_layer}) expected")
    return tuple(i for i in range(n_layer) if not flags[i])


def _windows(model_type: str, values: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """local_layers and sliding_window from `layer_types` (or the older use_sliding_window / max_window_layers /
    sliding_window_pattern)."""
    n_layer = values["num_hidden_layers"]
    kinds = values.get("layer_types")
    if kinds is None and model_type == "gemma3_text":
        pattern = values.get("sliding_window_pattern") or values.get("_sliding_window_pattern") or 6
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
    elif kinds is None and model_type in ("qwen2", "qwen3") and values["use_sliding_window"]:
        kinds = ["sliding_attention" if i >= values["max_window_layers"] else "full_attention"
                 for i in range(n_layer)]
    elif kinds is None and model_type == "smollm3" and values["use_sliding_window"] and values["sliding_window"]:
        nope = set(_nope_layers(values, source))
        kinds = ["sliding_attention" if i in nope else "full_attention" for i in range(n_layer)]
    if not kinds:
        return {}
    odd = [kind for kind in kinds if kind not in ("full_attention", "sliding_attention")]
    if odd or len(kinds) < n_layer:
        raise unsupported(source, "layer_types", odd[0] if odd else len(kinds),
                          f"full_attention or sliding_attention for each of the {n_layer} layers")
    local = tuple(i for i in range(n_layer) if kinds[i] == "sliding_attention")
    if model_type in ("qwen2", "qwen3", "smollm3") and not values.get("use_sliding_window", True):
        local = ()  # transformers applies these layer types only with use_sliding_window
    if local and not values.get("sliding_window"):
        raise unsupported(source, "sliding_window", values.get("sliding_window"), "sliding layers need a window")
    return dict(local_layers=local, sliding_window=values["sliding_window"] if local else None)


def rope_settings(values: dict[str, Any], source: Path | str, layer_type: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from the top level and `rope_scaling` (transformers v4) or
    `rope_parameters` (v5; per layer type for Gemma 3); only kinds ownllm.rope computes are accepted."""
    local = layer_type == "sliding_attention"
    theta = float(values.get("rope_local_base_freq" if local else "rope_theta", 10000.0))
    params: dict[str, Any] | None = None if local else values.get("rope_scaling")
    key = "rope_scaling"
    v5 = values.get("rope_parameters")
    if isinstance(v5, dict) and isinstance(v5.get(layer_type), dict):
        params, key = v5[layer_type], f"rope_parameters.{layer_type}"
    elif isinstance(v5, dict) and v5 and not local:
        params, key = v5, "rope_parameters"
    if params is None:
        return theta, None
    if not isinstance(params, dict):
        raise OwnLLMError(f"{source}: {key} must be a JSON object")
    theta = float(params.get("rope_theta", theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in SCALING_KINDS:
        raise unsupported(source, f"{key}.rope_type", kind, f"ownllm computes default, {', '.join(SCALING_KINDS)}")
    extra = sorted(set(params) - set(_SCALING_KEYS) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise unsupported(source, f"{key}.{extra[0]}", params[extra[0]], f"rope_type {kind!r} without it")
    scaling = {"rope_type": kind, **{k: params[k] for k in _SCALING_KEYS if params.get(k) is not None}}
    problem = scaling_problem(scaling)
    if problem:
        raise OwnLLMError(f"{source}: {key}: {problem}")
    return theta, scaling


__all__ = ["model_config_from_hf", "rope_settings", "text_config", "unsupported", "SUPPORTED_MODEL_TYPES"]
