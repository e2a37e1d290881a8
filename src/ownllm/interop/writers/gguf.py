"""GGUF export for llama.cpp (and everything built on it: llama-cpp-python, Ollama, LM Studio).

    export_gguf(load_run("runs/mine"), "exported/mine.gguf", quant="q8_0")   # ownllm export --to gguf --quant q8_0

Needs the `gguf` package (`pip install 'ownllm[gguf]'`). What is written:
- architecture `gpt2` for the GPT-2 flavour, `llama` for the Llama flavour (Qwen2-style qkv biases included; Llama
  3.x scaling as the `rope_freqs` tensor), `qwen3`, `smollm3` and `gemma3` (`gguf_architecture`; what llama.cpp fixes
  in its code for these, a model must follow: ownllm.interop.readers.gguf_config), with the hyperparameters under
  `{arch}.*` (context_length, embedding_length, block_count, feed_forward_length, attention.head_count(_kv), norm
  eps, rope.freq_base, rope.dimension_count, rope.scaling.*, attention.sliding_window);
- every weight under llama.cpp's tensor names (`token_embd`, `blk.N.attn_qkv` or `blk.N.attn_q/k/v`, ...). llama.cpp
  rotates pairs of adjacent q/k dimensions (interleaved RoPE) for `llama`, where ownllm and Hugging Face rotate the
  two halves of each head, so the q/k rows of every head are reordered here: [x0..x(h/2-1), y0..] -> [x0, y0, x1, y1..];
- the byte-level BPE tokenizer: tokens, token types, merges, bos/eos, the pre-tokenizer name and the chat template;
- weight matrices as f32, f16, q8_0 or q4_0 (1-D tensors and position embeddings stay f32; a matrix whose rows are
  not a multiple of the 32-value quantization block falls back to f16);
- with `pooling="mean"` or `"last"` (`--pooling`), `{arch}.pooling_type`, which llama.cpp's embeddings pool by
  (ownllm's `weighted-mean` has no llama.cpp equivalent and is refused); without it, the run's own pooling if it has
  one (a GGUF imported with a pooling type keeps it, so a re-export does too), else no pooling key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.interop.names import (
    GGUF_GEMMA_NORMS,
    GGUF_GLOBAL,
    GGUF_GPT2_LAYER,
    GGUF_LLAMA_FUSED,
    GGUF_LLAMA_LAYER,
    GGUF_QK_NORMS,
    GGUF_ROPE_FREQS,
    POOLING_TYPES,
    interleave_rope_rows,
)
from ownllm.interop.readers.gguf_config import (
    GEMMA3_LOCAL_THETA,
    OWNLLM_ROPE_SCALING,
    gemma3_local_layers,
    gemma3_query_scalar,
    llama3_divisors,
    smollm3_nope_layers,
)
from ownllm.interop.writers.hf import bias_or_zeros, export_state_dict, hf_model_type
from ownllm.outputs import check_output, temporary_path
from ownllm.tokenizer import Tokenizer, merge_pair

if TYPE_CHECKING:
    import gguf

    from ownllm.runs import LoadedRun

QUANTS = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # values per q8_0 / q4_0 block

# Regex fragments that tell llama.cpp's known byte-level pre-tokenizers apart (see its convert_hf_to_gguf.py).
_PRE_TOKENIZERS = (("\\p{N}{1,3}", "llama-bpe"), ("\\p{N}|", "qwen2"))


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise OwnLLMError("export --to gguf needs the gguf package: pip install 'ownllm[gguf]'") from None
    return gguf


def export_gguf(run: LoadedRun, out: str | Path, quant: str = "f16", force: bool = False,
                pooling: str | None = None) -> Path:
    """Write a loaded run (`ownllm.runs.load_run`) as one GGUF file that llama.cpp loads. An existing `out` is
    replaced only with `force`; a classifier run is refused (GGUF has no classification head). `pooling` (mean or
    last) is written as `{arch}.pooling_type`, the pooling llama.cpp's embeddings use; without it, the run's own
    (`embedding_pooling`, which an imported GGUF keeps) if llama.cpp has it, else no pooling key."""
    gguf = _import_gguf()
    if pooling is None and run.run_config.get("embedding_pooling") in POOLING_TYPES:
        pooling = run.run_config["embedding_pooling"]  # the run's own, where llama.cpp can express it
    if quant not in QUANTS:
        raise OwnLLMError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    check_gguf_pooling(pooling)
    out = check_output(out, "file", inputs=[run.path], force=force)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{run.path}: is a classifier run; GGUF (llama.cpp) has no classification head, so its "
                          "head and labels would be lost: export it with --to hf")
    config, tokenizer = run.config, run.tokenizer
    arch = gguf_architecture(config)  # refuses what llama.cpp would compute otherwise
    vocab = _vocabulary(tokenizer, config, gguf)  # checks the tokenizer before anything is written
    state = export_state_dict(run.model)
    tensors = _gpt2_tensors(state, config) if arch == "gpt2" else _llama_tensors(state, config, arch)

    tmp = temporary_path(out)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            _write_metadata(writer, gguf, arch, config, quant, name=Path(run.path).name or "ownllm")
            if pooling is not None:
                writer.add_pooling_type(gguf.PoolingType[POOLING_TYPES[pooling]])
            _write_tokenizer(writer, gguf, tokenizer, vocab)
            for name, tensor in tensors.items():
                _add_tensor(writer, gguf, name, tensor, quant)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for the model (`gpt2`, `llama`, `qwen3`, `smollm3`, `gemma3`); an OwnLLMError where
    llama.cpp fixes in its code a setting this model has otherwise (ownllm.interop.readers.gguf_config)."""
    family = hf_model_type(config)
    arch = {"gpt2": "gpt2", "gemma3_text": "gemma3", "qwen3": "qwen3", "smollm3": "smollm3"}.get(family, "llama")
    fixed: list[tuple[str, bool]] = []
    if arch == "smollm3":
        fixed = [("no RoPE in every fourth layer", config.nope_layers == smollm3_nope_layers(config.n_layer))]
    if arch == "gemma3":
        scalar = gemma3_query_scalar(config.n_layer, config.n_embd, config.n_head, config.head_size)
        fixed = [("five local layers of every six", config.local_layers == gemma3_local_layers(config.n_layer)),
                 (f"local RoPE base {GEMMA3_LOCAL_THETA:g}", config.local_rope_theta == GEMMA3_LOCAL_THETA),
                 (f"query_pre_attn_scalar {scalar:g}", (config.query_pre_attn_scalar or scalar) == scalar),
                 ("no final logit soft-cap", config.logit_softcap is None)]
    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3" and arch != "llama":
        fixed.append(("llama3 RoPE scaling on llama files only", False))
    broken = [rule for rule, kept in fixed if not kept]
    if broken:
        raise OwnLLMError(f"cannot export to GGUF: llama.cpp's {arch} fixes {broken[0]}, which this model does not "
                          "follow (export it with --to hf)")
    return arch


def check_gguf_pooling(pooling: str | None) -> None:
    """An OwnLLMError for a pooling llama.cpp's `{arch}.pooling_type` cannot express."""
    if pooling is None or pooling in POOLING_TYPES:
        return
    if pooling == "weighted-mean":
        raise OwnLLMError("--pooling weighted-mean has no llama.cpp equivalent (its pooling_type knows mean and "
                          "last): export with --pooling mean or last, or without --pooling")
    raise OwnLLMError(f"--pooling must be one of {', '.join(POOLING_TYPES)}, not {pooling!r}")


# ---- metadata -----------------------------------------------------------------------------------------------------

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def _write_metadata(writer: gguf.GGUFWriter, gguf: Any, arch: str, config: ModelConfig, quant: str,
                    name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[quant])))
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_size)
    if config.head_size * config.n_head != config.n_embd or arch == "gemma3":
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    if config.sliding_window and config.local_layers:
        writer.add_sliding_window(config.sliding_window)
    _write_rope_scaling(writer, gguf, config.rope_scaling)


def _write_rope_scaling(writer: gguf.GGUFWriter, gguf: Any, scaling: dict[str, Any] | None) -> None:
    """linear / yarn as llama.cpp's keys (llama3 is the `rope_freqs` tensor); the exact parameters as
    `ownllm.rope_scaling`, which ownllm reads back."""
    if scaling is None:
        return
    writer.add_string(OWNLLM_ROPE_SCALING, json.dumps(scaling))
    kind = scaling["rope_type"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(getattr(gguf.RopeScalingType, kind.upper()))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        for ours, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                          ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(ours) is not None:
                add(float(scaling[ours]))


def _vocabulary(tokenizer: Tokenizer, config: ModelConfig, gguf: Any) -> dict[str, Any]:
    """Tokens, token types, merges and the pre-tokenizer name of a byte-level BPE tokenizer, padded to the model's
    vocabulary; an OwnLLMError for tokenizers llama.cpp's `gpt2` tokenizer model cannot reproduce."""
    if tokenizer.hf is None:
        raise OwnLLMError("export --to gguf needs a byte-level BPE tokenizer; this run uses a char tokenizer")
    spec = json.loads(tokenizer.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise OwnLLMError(f"export --to gguf supports byte-level BPE tokenizers, not {model.get('type')} "
                          f"{'with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}".strip())
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    size = tokenizer.vocab_size
    if size > config.vocab_size:
        raise OwnLLMError(f"the tokenizer has {size} tokens but the model only {config.vocab_size} embeddings")
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(size):
        tokens.append(tokenizer.token(index))
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for index in range(size, config.vocab_size):  # embedding rows no token uses (vocabularies padded for speed)
        tokens.append(f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [" ".join(merge_pair(merge)) for merge in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the split-before-BPE rule: `gpt-2` for a plain ByteLevel one (ownllm's own)."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    if ([step.get("type") for step in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"  # every digit alone, then GPT-2's rule (SmolLM2, StarCoder)
    splits = [step for step in steps if step.get("type") == "Split"]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if len(splits) == 1 and len(byte_level) == 1:
        pattern = (splits[0].get("pattern") or {}).get("Regex", "")
        for fragment, name in _PRE_TOKENIZERS:
            if fragment in pattern:
                return name
    kinds = "+".join(str(step.get("type")) for step in steps) or "none"
    raise OwnLLMError(f"export --to gguf: the tokenizer's pre-tokenizer ({kinds}) is not one llama.cpp knows "
                      "(GPT-2, SmolLM, Llama 3 or Qwen2 byte-level)")


def _write_tokenizer(writer: gguf.GGUFWriter, gguf: Any, tokenizer: Tokenizer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([int(t) for t in vocab["types"]])
    writer.add_token_merges(vocab["merges"])
    if tokenizer.eot_id is not None:
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_bos_token_id(tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---- tensors ------------------------------------------------------------------------------------------------------

def _global_tensors(state: dict[str, Tensor], config: ModelConfig, zero_biases: bool) -> dict[str, Tensor]:
    """Embeddings, final norm and (untied) output head; `zero_biases`: a final-norm bias of zeros where ownllm's
    norm has none (llama.cpp's gpt2 graph wants every bias)."""
    out = {}
    for theirs, ours in GGUF_GLOBAL.items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        if ours in state:
            out[theirs] = state[ours]
        elif zero_biases and ours.endswith(".bias"):
            out[theirs] = bias_or_zeros(state, ours, config.n_embd)
    return out


def _gpt2_tensors(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """llama.cpp's gpt2 graph: every norm and linear layer has a bias (zeros where ownllm has none)."""
    out = _global_tensors(state, config, zero_biases=True)
    for i in range(config.n_layer):
        for theirs, ours in GGUF_GPT2_LAYER.items():
            weight = state[f"blocks.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.weight"] = weight
            out[f"blk.{i}.{theirs}.bias"] = bias_or_zeros(state, f"blocks.{i}.{ours}.bias", weight.shape[0])
    return out


def _llama_tensors(state: dict[str, Tensor], config: ModelConfig, arch: str) -> dict[str, Tensor]:
    """llama.cpp's llama-like graphs: q/k/v and gate/up apart, the q/k rows of every head in its interleaved order
    for `llama` and `smollm3`; Gemma's norm gains whole (1 + weight); Llama 3's scaling as `rope_freqs`."""
    out = _global_tensors(state, config, zero_biases=False)
    layer = {**GGUF_LLAMA_LAYER, **(GGUF_GEMMA_NORMS if config.sandwich_norm else {}),
             **(GGUF_QK_NORMS if config.qk_norm_gain else {})}
    for i in range(config.n_layer):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            out.update({f"{blk}{theirs}.{kind}": state[f"{ours}{mine}.{kind}"]
                        for theirs, mine in layer.items() if f"{ours}{mine}.{kind}" in state})
            for mine, parts in GGUF_LLAMA_FUSED.items():
                fused = state.get(f"{ours}{mine}.{kind}")
                if fused is not None:
                    pieces = _unfused(mine, fused, config, permute=arch in ("llama", "smollm3"))
                    out.update({f"{blk}{part}.{kind}": piece for part, piece in zip(parts, pieces)})
    if config.norm_offset:
        out = {name: t + config.norm_offset if name.endswith("norm.weight") else t for name, t in out.items()}
    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3":
        out[GGUF_ROPE_FREQS] = llama3_divisors(config.head_size, config.rope_theta, config.rope_scaling)
    return out


def _unfused(name: str, fused: Tensor, config: ModelConfig, permute: bool) -> tuple[Tensor, ...]:
    """ownllm's fused q|k|v (q and k rows interleaved for llama.cpp's RoPE where `permute`) or gate|up, split."""
    if name == "mlp.fc":
        return fused.chunk(2)
    q_size, kv_size = config.n_head * config.head_size, config.kv_heads * config.head_size
    q, k, v = fused.split([q_size, kv_size, kv_size])
    if not permute:
        return q, k, v
    return interleave_rope_rows(q, config.n_head), interleave_rope_rows(k, config.kv_heads), v


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """The GGML type a tensor is stored as for a given --quant: matrices follow it, the rest stays f32."""
    if len(shape) < 2 or quant == "f32" or name == "position_embd.weight":
        return "F32"
    if quant == "f16" or shape[-1] % QUANT_BLOCK:
        return "F16"
    return quant.upper()


def _add_tensor(writer: gguf.GGUFWriter, gguf: Any, name: str, tensor: Tensor, quant: str) -> None:
    data = tensor.numpy().astype(np.float32)
    kind = tensor_type(name, tuple(data.shape), quant)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind in ("F32", "F16"):
        writer.add_tensor(name, gguf.quants.quantize(data, qtype))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


__all__ = ["export_gguf", "check_gguf_pooling", "gguf_architecture", "tensor_type", "QUANTS"]
