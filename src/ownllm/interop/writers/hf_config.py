"""Which Hugging Face architecture computes an ownllm model, and its config.json (the reverse of
ownllm.interop.readers.hf_config).

    hf_model_type(config)                 # "gpt2", "llama", "qwen2", "qwen3", "smollm3" or "gemma3_text"
    hf_config_dict(config, tokenizer)     # config.json for AutoModelForCausalLM, no custom code

A model that no transformers class computes (a speedrun recipe option, a mix of families' options) is an
OwnLLMError saying which option, raised before anything is written.
"""

from __future__ import annotations

from typing import Any

from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import Tokenizer

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _gemma_options(config: ModelConfig) -> list[bool]:
    return [config.mlp == "geglu", config.sandwich_norm, config.norm_offset == 1.0, config.scale_embeddings,
            config.qk_norm_gain]


def _refused_options(config: ModelConfig) -> list[str]:
    """The options that keep a Llama-layout model from being any of transformers' families."""
    gemma = all(_gemma_options(config))
    checks = [("--mlp relu2", config.mlp == "relu2"), ("--qk-norm (without a gain)", config.qk_norm and
                                                       not config.qk_norm_gain),
              ("--logit-softcap", config.logit_softcap is not None and not gemma),
              ("query_pre_attn_scalar", config.query_pre_attn_scalar is not None and not gemma),
              ("local_layers", bool(config.local_layers) and not gemma),
              ("nope_layers with qk norms or sandwich norms", bool(config.nope_layers) and
               (config.qk_norm or config.sandwich_norm)),
              ("part of Gemma 3's options", any(_gemma_options(config)[:4]) and not gemma)]
    return [name for name, used in checks if used]


def hf_model_type(config: ModelConfig) -> str:
    """The transformers architecture that computes the same function as `config`, or an OwnLLMError saying why none."""
    refused = _refused_options(config)
    if refused:
        raise OwnLLMError(f"cannot export: this model uses {', '.join(refused)}, which no Hugging Face architecture "
                          f"(GPT-2, Llama, Qwen2/3, SmolLM3, Gemma 3) nor llama.cpp expresses (train without it)")
    gpt2 = (config.position == "learned", config.norm == "layernorm", config.mlp == "gelu")
    llama = (config.position == "rope", config.norm == "rmsnorm", config.mlp in ("swiglu", "geglu"))
    if all(gpt2) and config.kv_heads == config.n_head and config.head_size * config.n_head == config.n_embd:
        return "gpt2"
    if not all(llama):
        raise OwnLLMError(f"no Hugging Face architecture matches this model (position={config.position}, "
                          f"norm={config.norm}, mlp={config.mlp}): export needs the GPT-2 or the Llama flavour")
    if config.mlp == "geglu":
        return "gemma3_text"
    if config.qk_norm_gain:
        return "qwen3"
    if config.nope_layers:
        return "smollm3"
    qwen2_biases = config.use_qkv_bias and not config.bias and not config.use_mlp_bias
    return "qwen2" if qwen2_biases else "llama"


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}


def hf_config_dict(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """config.json for transformers (no custom code)."""
    model_type = hf_model_type(config)
    eos = tokenizer.eot_id if tokenizer is not None else None
    bos = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else eos
    common = dict(model_type=model_type, architectures=[ARCHITECTURES[model_type]], vocab_size=config.vocab_size,
                  tie_word_embeddings=config.tie_embeddings, bos_token_id=bos, eos_token_id=eos, pad_token_id=None,
                  dtype="float32", torch_dtype="float32", use_cache=True)
    if model_type == "gpt2":
        return dict(common, n_positions=config.block_size, n_ctx=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_size,
                    activation_function="gelu_new", layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout,
                    embd_pdrop=config.dropout, attn_pdrop=config.dropout)
    values = dict(common, hidden_size=config.n_embd, intermediate_size=config.mlp_size,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.kv_heads, head_dim=config.head_size, hidden_act="silu",
                  max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                  rope_theta=config.rope_theta,  # transformers v4 reads this and rope_scaling, v5 rope_parameters
                  rope_scaling=config.rope_scaling, rope_parameters=_rope_parameters(config),
                  attention_dropout=config.dropout, attention_bias=config.use_qkv_bias or config.bias)
    full = ["full_attention"] * config.n_layer
    if model_type == "qwen2":
        del values["attention_bias"]
        return dict(values, use_sliding_window=False, max_window_layers=config.n_layer, layer_types=full)
    if model_type == "qwen3":
        return dict(values, use_sliding_window=False, max_window_layers=config.n_layer, layer_types=full)
    if model_type == "smollm3":
        return dict(values, mlp_bias=config.use_mlp_bias, use_sliding_window=False, layer_types=full,
                    no_rope_layers=[int(i not in config.nope_layers) for i in range(config.n_layer)])
    if model_type == "gemma3_text":
        return _gemma3_config(config, values)
    return dict(values, mlp_bias=config.use_mlp_bias)


def _whole(value: float) -> float | int:
    """An int where the value is whole (transformers' strict config classes type query_pre_attn_scalar int)."""
    return int(value) if float(value).is_integer() else value


def _gemma3_config(config: ModelConfig, values: dict[str, Any]) -> dict[str, Any]:
    local_theta = config.local_rope_theta if config.local_rope_theta is not None else config.rope_theta
    layer_types = ["sliding_attention" if i in config.local_layers else "full_attention"
                   for i in range(config.n_layer)]
    values = {k: v for k, v in values.items() if k != "hidden_act"}
    return dict(values, hidden_activation="gelu_pytorch_tanh", layer_types=layer_types,
                sliding_window=config.sliding_window or config.block_size,
                query_pre_attn_scalar=_whole(config.query_pre_attn_scalar or config.head_size),
                final_logit_softcapping=config.logit_softcap, attn_logit_softcapping=None,
                rope_local_base_freq=local_theta,
                rope_parameters={"full_attention": _rope_parameters(config),
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}})


__all__ = ["hf_model_type", "hf_config_dict", "ARCHITECTURES"]
