"""Hugging Face model directories out: a loaded run as GPT-2, Llama, Qwen2, Qwen3, SmolLM3 or Gemma 3 weights,
config.json (ownllm.interop.writers.hf_config) and tokenizer files that transformers loads without custom code.

    export_hf(load_run("runs/mine"), "exported/hf")   # ownllm export --to hf: loads with AutoModelForCausalLM

The weights are the reverse of ownllm.interop.readers.hf (the names are ownllm.interop.names'): GPT-2's attention
and MLP matrices transposed into Conv1D layout, Llama's fused [q | k | v] and [gate | up] split again, biases HF
needs but ownllm's layer lacks written as zeros, LoRA adapters folded into the weights they adapt. A classifier run
becomes `...ForSequenceClassification`. A model no transformers class computes (`hf_model_type` says why) is
refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ownllm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, weights_state_dict, write_json_atomic
from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.interop.names import (
    GENERATION_CONFIG_FILE,
    HF_GPT2_CONV1D,
    HF_GPT2_GLOBAL,
    HF_GPT2_NORMS,
    HF_GEMMA_NORMS,
    HF_GPT2_PREFIX,
    HF_LLAMA_ATTN_OUT,
    HF_LLAMA_DOWN,
    HF_LLAMA_GATE_UP,
    HF_LLAMA_GLOBAL,
    HF_LLAMA_NORMS,
    HF_LLAMA_PREFIX,
    HF_LLAMA_QKV,
    HF_LM_HEAD,
    HF_QK_NORMS,
    TOKENIZER_CONFIG_FILE,
)
from ownllm.interop.writers.hf_config import hf_config_dict, hf_model_type
from ownllm.outputs import check_output, replaced_dir, save_safetensors
from ownllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun


def export_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's float32 CPU weights under ownllm's names, LoRA adapters folded into the weights they adapt
    (W + B A * alpha/rank); `model` itself is not changed."""
    model = getattr(model, "_orig_mod", model)
    state = {name: tensor.detach().float().cpu() for name, tensor in weights_state_dict(model).items()}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "delta"):  # ownllm.lora.LoRALinear
            state[f"{name}.weight"] = state[f"{name}.weight"] + module.delta().detach().float().cpu()
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state


def hf_state_dict(model: torch.nn.Module, config: ModelConfig) -> dict[str, Tensor]:
    """The model's weights under transformers' names and layouts (biases HF needs but ownllm lacks are zeros)."""
    state = export_state_dict(model)
    model_type = hf_model_type(config)
    out = _to_gpt2(state, config) if model_type == "gpt2" else _to_llama(state, config, model_type)
    if not config.tie_embeddings:
        out[HF_LM_HEAD] = state["lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def bias_or_zeros(state: dict[str, Tensor], name: str, size: int) -> Tensor:
    """`state[name]`, or zeros of `size` where ownllm's layer has no bias but the target format wants one."""
    return state[name] if name in state else torch.zeros(size)


def _to_gpt2(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out = {HF_GPT2_PREFIX + hf_name: bias_or_zeros(state, ours, config.n_embd) if ours.endswith(".bias")
           else state[ours] for hf_name, ours in HF_GPT2_GLOBAL.items()}
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"{HF_GPT2_PREFIX}h.{i}."
        for hf_norm, our_norm in HF_GPT2_NORMS.items():
            out[f"{hf}{hf_norm}.weight"] = state[f"{ours}{our_norm}.weight"]
            out[f"{hf}{hf_norm}.bias"] = bias_or_zeros(state, f"{ours}{our_norm}.bias", config.n_embd)
        for hf_name, our_name in HF_GPT2_CONV1D.items():
            weight = state[f"{ours}{our_name}.weight"]
            out[f"{hf}{hf_name}.weight"] = weight.t()
            out[f"{hf}{hf_name}.bias"] = bias_or_zeros(state, f"{ours}{our_name}.bias", weight.shape[0])
    return out


def _to_llama(state: dict[str, Tensor], config: ModelConfig, model_type: str) -> dict[str, Tensor]:
    out = {HF_LLAMA_PREFIX + hf_name: state[ours] for hf_name, ours in HF_LLAMA_GLOBAL.items()}
    q_size, kv_size = config.n_head * config.head_size, config.kv_heads * config.head_size
    attention_bias = model_type == "qwen2" or config.use_qkv_bias or config.bias
    norms = {**(HF_GEMMA_NORMS if config.sandwich_norm else HF_LLAMA_NORMS),
             **(HF_QK_NORMS if config.qk_norm_gain else {})}
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"{HF_LLAMA_PREFIX}layers.{i}."
        for hf_norm, our_norm in norms.items():
            out[f"{hf}{hf_norm}.weight"] = state[f"{ours}{our_norm}.weight"]
        qkv = state[f"{ours}attn.qkv.weight"].split([q_size, kv_size, kv_size])
        qkv_bias = bias_or_zeros(state, f"{ours}attn.qkv.bias", q_size + 2 * kv_size).split([q_size, kv_size, kv_size])
        for name, weight, bias in zip(HF_LLAMA_QKV, qkv, qkv_bias):
            out[f"{hf}{name}.weight"] = weight
            if attention_bias:
                out[f"{hf}{name}.bias"] = bias
        out[f"{hf}{HF_LLAMA_ATTN_OUT}.weight"] = state[f"{ours}attn.proj.weight"]
        if attention_bias and model_type != "qwen2":
            out[f"{hf}{HF_LLAMA_ATTN_OUT}.bias"] = bias_or_zeros(state, f"{ours}attn.proj.bias", config.n_embd)
        for kind in ("weight", "bias") if config.use_mlp_bias else ("weight",):
            gate_up = state[f"{ours}mlp.fc.{kind}"].chunk(2)
            out.update({f"{hf}{name}.{kind}": part for name, part in zip(HF_LLAMA_GATE_UP, gate_up)})
            out[f"{hf}{HF_LLAMA_DOWN}.{kind}"] = state[f"{ours}mlp.proj.{kind}"]
    return out


def hf_tokenizer_json(tokenizer: Tokenizer) -> Any:
    """The `tokenizers` tokenizer to write as tokenizer.json: where prompts start with a begin-of-sequence token
    (Gemma, Llama), a post-processor that adds it, as the original tokenizer.json has, so transformers (and
    lm-evaluation-harness) encode `add_special_tokens=True` text the way the model reads it. ownllm's own encoding
    never applies it (it adds the token itself, `Tokenizer.starting_sequence`)."""
    if not tokenizer.add_bos or tokenizer.bos_id is None:
        return tokenizer.hf
    from tokenizers.processors import TemplateProcessing

    copy = tokenizer.hf.__class__.from_str(tokenizer.hf.to_str())
    bos = tokenizer.token(tokenizer.bos_id)
    copy.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                             special_tokens=[(bos, tokenizer.bos_id)])
    return copy


def hf_tokenizer_config(tokenizer: Tokenizer, block_size: int) -> dict[str, Any]:
    """tokenizer_config.json that AutoTokenizer reads with the generic fast tokenizer class (no custom code)."""
    record: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                              "clean_up_tokenization_spaces": False, "add_bos_token": tokenizer.add_bos,
                              "add_eos_token": False}
    if tokenizer.eot_id is not None:
        record["eos_token"] = tokenizer.token(tokenizer.eot_id)
    if tokenizer.bos_id is not None:
        record["bos_token"] = tokenizer.token(tokenizer.bos_id)
    if tokenizer.chat_template is not None:
        record["chat_template"] = tokenizer.chat_template
    return record


def export_hf(run: LoadedRun, out: str | Path, force: bool = False) -> Path:
    """Write a loaded run (`ownllm.runs.load_run`) as an HF directory: config.json, generation_config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json. A classifier run becomes a
    `...ForSequenceClassification` with its labels. An existing non-empty `out` is replaced only with `force`."""
    out = check_output(out, "dir", inputs=[run.path], force=force)
    tokenizer = run.tokenizer
    if tokenizer.hf is None:
        raise OwnLLMError("export --to hf needs a BPE tokenizer (tokenizer.json); this run uses a char tokenizer, "
                          "which transformers cannot load")
    config_dict = hf_config_dict(run.config, tokenizer)  # raises before anything is written
    state = hf_state_dict(run.model, run.config)
    classifier = run.run_config.get("task") == "classify"
    if classifier:
        config_dict, state = sequence_classifier(run, config_dict, state)
    with replaced_dir(out) as staging:
        save_safetensors(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json_atomic(staging / CONFIG_FILE, config_dict)
        if not classifier:
            generation = {"bos_token_id": config_dict["bos_token_id"], "eos_token_id": config_dict["eos_token_id"]}
            write_json_atomic(staging / GENERATION_CONFIG_FILE, {k: v for k, v in generation.items() if v is not None})
        Tokenizer(hf_tokenizer_json(tokenizer)).save(staging)  # the specials go in tokenizer_config.json
        write_json_atomic(staging / TOKENIZER_CONFIG_FILE, hf_tokenizer_config(tokenizer, run.config.block_size))
    return out


def sequence_classifier(run: LoadedRun, config_dict: dict[str, Any],
                        state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and weights of transformers' `...ForSequenceClassification` for a classifier run: the `score`
    head and id2label; no LM head. transformers reads the last token that is not padding, as ownllm's `last`
    pooling does; with the end-of-text token appended to each text (ownllm's default), no pad token is set, so
    texts are classified one at a time (or padded on the left)."""
    run_config = run.run_config
    if run_config.get("pooling", "last") != "last":
        raise OwnLLMError(f"{run.path}: a classifier with --pooling {run_config['pooling']} has no transformers "
                          "class (...ForSequenceClassification reads the last token); train one with --pooling last")
    labels = list(run_config["labels"])
    architecture = config_dict["architectures"][0].replace("LMHeadModel", "ForCausalLM")
    appends_eot = run_config.get("append_eot", True)
    config_dict = dict(config_dict, architectures=[architecture.replace("ForCausalLM", "ForSequenceClassification")],
                       id2label={str(i): label for i, label in enumerate(labels)},
                       label2id={label: i for i, label in enumerate(labels)},
                       problem_type="single_label_classification",
                       pad_token_id=None if appends_eot else run.tokenizer.eot_id)
    state = {name: tensor for name, tensor in state.items() if name != HF_LM_HEAD}
    state["score.weight"] = run.model.score.weight.detach().float().cpu().contiguous()
    return config_dict, state


__all__ = ["export_hf", "hf_state_dict", "hf_config_dict", "hf_model_type", "hf_tokenizer_config", "export_state_dict",
           "bias_or_zeros", "sequence_classifier"]
