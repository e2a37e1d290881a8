"""Hugging Face model directories in: GPT-2, Llama (3.x with RoPE scaling), Qwen2, Qwen3, SmolLM3 and Gemma 3
weights, config.json and the tokenizer.

    model = read_hf(Path("path/to/hf-model"))   # a ForeignModel; ownllm.runs.load_run builds the model from it
    import_hf("path/to/hf-model", "runs/base")   # ownllm import: the same, saved as an ownllm run directory

An HF directory is `config.json` (with `model_type`) + `model.safetensors` (or shards listed in
`model.safetensors.index.json`) + the tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`, with
`tokenizer_config.json` / `generation_config.json` naming eos/bos and the chat template).

How the layouts map onto `GPT` (ownllm's one model class; the names are ownllm.interop.names'):
- GPT-2 stores its attention and MLP weights as Conv1D, input-major: they are transposed. `attn.bias` and
  `attn.masked_bias` are causal-mask buffers, not weights, and are skipped.
- Llama and Qwen2 keep q/k/v and gate/up in separate matrices; ownllm fuses them as [q | k | v] and [gate | up].
  HF's q/k use the rotate-half RoPE layout, which is ownllm's own, so no permutation is needed. Qwen3 and Gemma 3
  add `q_norm` / `k_norm`; Gemma 3 has four norms per block (ownllm.interop.names.HF_GEMMA_NORMS), and an image-text
  Gemma 3 checkpoint keeps its language model under a prefix beside the vision tower, which is left out.
- config.json is mapped by ownllm.interop.readers.hf_config.
Anything the model cannot represent (another model_type, a rope scaling kind, a missing tensor or one of the
wrong shape, a tensor nobody asked for) is an OwnLLMError naming the file and key: never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ownllm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_json
from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.interop.names import (
    GENERATION_CONFIG_FILE,
    HF_GPT2_CONV1D,
    HF_GPT2_GLOBAL,
    HF_GPT2_NORMS,
    HF_GEMMA3_TEXT_PREFIXES,
    HF_GEMMA3_VISION_PREFIXES,
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
    template_section,
)
from ownllm.interop.readers.foreign import ForeignModel, save_as_run
from ownllm.interop.readers.hf_config import SUPPORTED_MODEL_TYPES, model_config_from_hf
from ownllm.model import GPT
from ownllm.outputs import check_output
from ownllm.tokenizer import Tokenizer, load_tokenizer, with_specials_from

log = logging.getLogger(__name__)

ST_MODULES_FILE = "modules.json"  # Sentence Transformers: the modules after the transformer (pooling, ...)
ST_CONFIG_FILE = "config_sentence_transformers.json"  # ... and the prompts for queries and documents
ST_POOLINGS = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}

INDEX_FILE = "model.safetensors.index.json"

_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # state-dict entries that are not weights


def is_hf_model_dir(path: str | Path) -> bool:
    """True for a directory whose config.json is a Hugging Face model config (has `model_type`), not an ownllm run."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "model_type" in data and "format" not in data


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise OwnLLMError(f"{directory}: no {CONFIG_FILE}; not a Hugging Face model directory")
    data = read_json(path)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OwnLLMError(f"{path}: model_type {model_type!r} is not supported "
                          f"(ownllm reads {', '.join(SUPPORTED_MODEL_TYPES)})")
    return data


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise OwnLLMError(f"{index}: not a safetensors index ({error}); re-download the model") from None
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files, weight_map = [WEIGHTS_FILE], None
    else:
        found = sorted(p.name for p in directory.glob("*.bin")) or ["nothing"]
        raise OwnLLMError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (found {', '.join(found)}); "
                          "ownllm reads safetensors weights only")
    tensors: dict[str, Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise OwnLLMError(f"{index}: lists shard {name}, which is missing")
        try:
            shard = load_file(str(path))
        except Exception as error:  # safetensors' own error type: bad header, truncated data
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OwnLLMError(f"{path}: not a readable safetensors file ({reason}); the download is corrupt") from None
        if weight_map is not None:
            absent = sorted(key for key, file in weight_map.items() if file == name and key not in shard)
            if absent:
                raise OwnLLMError(f"{path}: tensor {absent[0]} listed in {INDEX_FILE} is missing")
        tensors.update(shard)
    return tensors


class _Mapped(dict):
    """ownllm name -> tensor; each assignment records which HF tensors it was made from."""

    def __init__(self, src: _Tensors) -> None:
        super().__init__()
        self.src = src

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.src.origin[key], self.src.pending = self.src.pending, []
        super().__setitem__(key, value)


class _Tensors:
    """The HF tensors of a checkpoint, handed out by name; remembers which were used so leftovers are caught, and
    which HF names each ownllm parameter came from (`origin`), so a shape error can name the checkpoint's key."""

    def __init__(self, tensors: dict[str, Tensor], prefix: str, source: Path | str) -> None:
        self.prefix = prefix if any(key.startswith(prefix) for key in tensors) else ""  # "transformer." or none
        self.tensors = {key.removeprefix(self.prefix): value for key, value in tensors.items()}
        self.source, self.used = source, set()
        self.pending: list[str] = []
        self.origin: dict[str, list[str]] = {}

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise OwnLLMError(f"{self.source}: tensor {self.prefix}{name} is missing from the checkpoint")
        self.used.add(name)
        self.pending.append(self.prefix + name if name != HF_LM_HEAD else name)
        return self.tensors[name].float()

    def join(self, names: list[str]) -> Tensor:
        """The named tensors stacked along the output dimension (q|k|v, gate|up)."""
        parts = [self.take(name) for name in names]
        if len({part.shape[1:] for part in parts}) != 1:
            shapes = ", ".join(f"{self.prefix}{n} {tuple(p.shape)}" for n, p in zip(names, parts))
            raise OwnLLMError(f"{self.source}: tensors of different widths cannot be fused: {shapes}")
        return torch.cat(parts)

    def take_if_present(self, name: str) -> Tensor | None:
        return self.take(name) if name in self.tensors else None

    def check_all_used(self) -> None:
        left = sorted(k for k in self.tensors if k not in self.used and not k.endswith(_BUFFERS))
        if left:
            raise OwnLLMError(f"{self.source}: tensor {self.prefix}{left[0]} does not fit the model config "
                              f"({len(left)} unused tensor(s)); is config.json the one of these weights?")


def state_dict_from_hf(tensors: dict[str, Tensor], hf: dict[str, Any], config: ModelConfig,
                       source: Path | str = "checkpoint") -> dict[str, Tensor]:
    """ownllm parameter names -> tensors (contiguous, float32), from the HF checkpoint's tensors, checked against the
    model's names and shapes."""
    if hf["model_type"] == "gpt2":
        src = _Tensors(tensors, HF_GPT2_PREFIX, source)
        state = _from_gpt2(src, config, _Mapped(src))
    else:
        if hf["model_type"] == "gemma3":
            tensors = _gemma3_text_tensors(tensors)
        src = _Tensors(tensors, HF_LLAMA_PREFIX, source)
        state = _from_llama(src, config, _Mapped(src))
    with torch.device("meta"):
        expected = {name: t.shape for name, t in GPT(config).state_dict().items()}
    for name, tensor in state.items():
        if expected.get(name) != tensor.shape:
            what = " + ".join(src.origin.get(name, [name]))
            raise OwnLLMError(f"{source}: tensor {what} has shape {_shape_of(src, name)}, config.json implies "
                              f"{_shape_of_expected(src, name, expected[name], config)}")
    tied = {HF_LM_HEAD} if config.tie_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise OwnLLMError(f"{source}: no tensor for {missing[0]}")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _gemma3_text_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Gemma 3 image-text checkpoint's language model under the text model's names; the vision tower dropped."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith(HF_GEMMA3_VISION_PREFIXES):
            continue
        prefix = next((p for p in HF_GEMMA3_TEXT_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            name = HF_LLAMA_PREFIX + name.removeprefix(prefix)
        out[name.replace("language_model.lm_head.", "lm_head.")] = tensor
    return out


def _shape_of(src: _Tensors, name: str) -> str:
    names = src.origin.get(name, [])
    return " + ".join(str(tuple(src.tensors[n.removeprefix(src.prefix)].shape)) for n in names) or "?"


def _shape_of_expected(src: _Tensors, name: str, shape: torch.Size, config: ModelConfig) -> str:
    shape = tuple(shape)
    parts = len(src.origin.get(name, [])) or 1
    conv1d = len(shape) == 2 and config.position == "learned" and name.startswith("blocks.")
    if conv1d:
        shape = shape[::-1]
    return str(shape) if parts == 1 else f"{shape} in total"


def _from_gpt2(src: _Tensors, config: ModelConfig, out: _Mapped) -> _Mapped:
    for hf_name, ours in HF_GPT2_GLOBAL.items():
        out[ours] = src.take(hf_name)
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for hf_norm, our_norm in HF_GPT2_NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{ours}{our_norm}.{kind}"] = src.take(f"{hf}{hf_norm}.{kind}")
        for hf_name, our_name in HF_GPT2_CONV1D.items():
            out[f"{ours}{our_name}.weight"] = src.take(f"{hf}{hf_name}.weight").t()  # Conv1D is [in, out]
            out[f"{ours}{our_name}.bias"] = src.take(f"{hf}{hf_name}.bias")
    _take_head(src, config, out)
    return out


def _from_llama(src: _Tensors, config: ModelConfig, out: _Mapped) -> _Mapped:
    for hf_name, ours in HF_LLAMA_GLOBAL.items():
        out[ours] = src.take(hf_name)
    norms = {**(HF_GEMMA_NORMS if config.sandwich_norm else HF_LLAMA_NORMS),
             **(HF_QK_NORMS if config.qk_norm_gain else {})}
    for i in range(config.n_layer):
        hf, ours = f"layers.{i}.", f"blocks.{i}."
        for hf_norm, our_norm in norms.items():
            out[f"{ours}{our_norm}.weight"] = src.take(f"{hf}{hf_norm}.weight")
        qkv = [f"{hf}{name}" for name in HF_LLAMA_QKV]
        out[f"{ours}attn.qkv.weight"] = src.join([f"{name}.weight" for name in qkv])
        if config.use_qkv_bias:
            out[f"{ours}attn.qkv.bias"] = src.join([f"{name}.bias" for name in qkv])
        out[f"{ours}attn.proj.weight"] = src.take(f"{hf}{HF_LLAMA_ATTN_OUT}.weight")
        if config.bias:
            out[f"{ours}attn.proj.bias"] = src.take(f"{hf}{HF_LLAMA_ATTN_OUT}.bias")
        gate_up = [f"{hf}{name}" for name in HF_LLAMA_GATE_UP]
        out[f"{ours}mlp.fc.weight"] = src.join([f"{name}.weight" for name in gate_up])
        out[f"{ours}mlp.proj.weight"] = src.take(f"{hf}{HF_LLAMA_DOWN}.weight")
        if config.use_mlp_bias:
            out[f"{ours}mlp.fc.bias"] = src.join([f"{name}.bias" for name in gate_up])
            out[f"{ours}mlp.proj.bias"] = src.take(f"{hf}{HF_LLAMA_DOWN}.bias")
    _take_head(src, config, out)
    return out


def _take_head(src: _Tensors, config: ModelConfig, out: _Mapped) -> None:
    """The LM head, then the check that every tensor was used: a tied checkpoint may still carry a copy of the
    head (taken and dropped); an untied one must have it."""
    head = src.take_if_present(HF_LM_HEAD)
    if not config.tie_embeddings:
        out[HF_LM_HEAD] = head if head is not None else src.take(HF_LM_HEAD)
    src.check_all_used()


def load_hf_tokenizer(directory: Path, hf: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of an HF directory, with eos from generation_config.json (else tokenizer_config.json, else
    config.json), bos, add_bos and the chat template."""
    directory = Path(directory)
    hf = hf if hf is not None else read_hf_config(directory)
    tok = load_tokenizer(directory)
    eos_id = _first_id(_read_optional_json(directory / GENERATION_CONFIG_FILE).get("eos_token_id"))
    specials = _read_optional_json(directory / TOKENIZER_CONFIG_FILE)
    if eos_id is None and not specials.get("eos_token"):
        eos_id = _first_id(hf.get("eos_token_id"))
    if eos_id is not None and not 0 <= eos_id < tok.vocab_size:  # GPT2Config's default 50256 on a small vocabulary
        log.warning("%s: eos_token_id %d is outside the tokenizer's vocabulary (0..%d); ignored, as transformers "
                    "does (generation stops at the tokenizer's own end token, if any)", directory, eos_id,
                    tok.vocab_size - 1)
        eos_id = None
    return with_specials_from(directory, tok, eos_id=eos_id) if eos_id is not None else tok


def _first_id(value: Any) -> int | None:
    """eos_token_id may be one id or a list of them (Llama 3 instruct); decoding stops at the first."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def read_hf(directory: Path) -> ForeignModel:
    """Read an HF model directory (GPT-2, Llama, Qwen2/3, SmolLM3, Gemma 3) in ownllm's terms: config, float32 weights, tokenizer and
    the source record (ownllm.runs.load_run builds the model from them)."""
    hf = read_hf_config(directory)
    config = model_config_from_hf(hf, directory / CONFIG_FILE)
    tensors = read_hf_weights(directory)
    bare = all("For" not in name for name in hf.get("architectures") or ["ForCausalLM"])
    if bare and not config.tie_embeddings and not any(name.endswith(HF_LM_HEAD) for name in tensors):
        log.warning("%s: a model without a language-model head (%s, an embedding model); the token embeddings "
                    "stand in for it", directory, ", ".join(hf["architectures"]))
        config = dataclasses.replace(config, tie_embeddings=True)
    state = state_dict_from_hf(tensors, hf, config, source=directory)
    tokenizer = load_hf_tokenizer(directory, hf)
    return ForeignModel(config=config, state=state, tokenizer=tokenizer, format="hf",
                        sections={"source": _source_record(directory, hf), **template_section(tokenizer),
                                  **embedding_sections(directory, tokenizer)})


def embedding_sections(directory: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a Sentence Transformers model directory (Qwen3-Embedding) says about embedding texts, as run config
    sections: `embedding_pooling` (its Pooling module: mean or last token), `embedding_prefixes` (the text put before
    a query or a document, `config_sentence_transformers.json`'s prompts) and `embedding_suffix` (the token ids the
    tokenizer's post-processor ends every text with, Qwen3-Embedding's end-of-text, which last-token pooling reads)."""
    sections: dict[str, Any] = {}
    modules = read_json(directory / ST_MODULES_FILE) if (directory / ST_MODULES_FILE).is_file() else []
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            pooling = _read_optional_json(directory / str(module.get("path", "")) / CONFIG_FILE)
            modes = [ours for key, ours in ST_POOLINGS.items() if pooling.get(key)]
            if modes:
                sections["embedding_pooling"] = modes[0]
    prompts = _read_optional_json(directory / ST_CONFIG_FILE).get("prompts")
    if isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values()) and any(prompts.values()):
        sections["embedding_prefixes"] = {k: v for k, v in prompts.items() if k in ("query", "document")}
    if sections and tokenizer.hf is not None:
        plain = tokenizer.hf.encode("x", add_special_tokens=False).ids
        full = tokenizer.hf.encode("x", add_special_tokens=True).ids
        suffix = full[full.index(plain[-1]) + 1:] if plain and plain[-1] in full else []
        if suffix:
            sections["embedding_suffix"] = suffix
    return sections


def _source_record(directory: Path, hf: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "huggingface", "path": str(directory), "model_type": hf["model_type"],
            "architectures": hf.get("architectures")}


def import_hf(path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert an HF model directory into an ownllm run directory (config.json, model.safetensors, tokenizer/).
    An existing non-empty `out` is replaced only with `force`."""
    out = check_output(out, "dir", inputs=[path], force=force)
    return save_as_run(read_hf(Path(path)), out)


__all__ = ["is_hf_model_dir", "read_hf", "embedding_sections", "import_hf", "model_config_from_hf", "read_hf_config", "read_hf_weights",
           "state_dict_from_hf", "load_hf_tokenizer"]
