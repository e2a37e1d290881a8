"""GGUF in: a llama.cpp model file read back into ownllm's config, float32 weights and tokenizer.

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # a ForeignModel: .config, .state (fp32), .tokenizer
    import_gguf("model.gguf", "runs/smol")                  # ownllm import model.gguf --out runs/smol
    ownllm.runs.load_run("model.gguf")                      # a LoadedRun, built from read_gguf's ForeignModel

What is read (the `gguf` package parses the file; it is memory-mapped and dequantized one tensor at a time, so
a 135M model needs its float32 weights plus one tensor's scratch space, not a copy of the file):
- architectures `llama` (SmolLM, TinyLlama, Llama 2/3 layouts, Llama 3.x RoPE scaling), `qwen2`, `qwen3`, `smollm3`,
  `gemma3` and `gpt2`, with the hyperparameters under `{arch}.*` (what llama.cpp fixes per architecture rather than
  writes, and RoPE scaling: ownllm.interop.readers.gguf_config). llama.cpp rotates adjacent pairs of q/k dimensions for `llama` (its converter reorders the q/k
  rows of every head); ownllm and Hugging Face rotate the two halves of each head, so those rows are put back.
  `qwen2` is stored in the rotate-half layout already, `gpt2` has no RoPE.
- every tensor type `gguf.quants.dequantize` knows (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants, the
  IQ types) becomes float32: a quantized file does not get smaller or faster here, it becomes an ordinary model.
- the tokenizer from `tokenizer.ggml.*`: a byte-level BPE (`tokenizer.ggml.model` = `gpt2`) rebuilt with the
  `tokenizers` library: tokens, merges, control tokens as special tokens, user-defined ones as added tokens,
  and the `tokenizer.ggml.pre` name mapped to the split rule llama.cpp applies before BPE; bos/eos/pad ids,
  whether prompts start with bos, and the Jinja chat template. SentencePiece vocabularies (`llama`: Llama 2,
  TinyLlama) become a BPE with byte fallback whose merges are recovered from the token scores.
- `{arch}.pooling_type` mean (1) or last (3), kept in the run config as `embedding_pooling`: the pooling
  `ownllm embed`, `ownllm index` and the server's /v1/embeddings use when none is asked for (other types are
  ignored with a warning: ownllm has no cls or rank pooling).
Anything ownllm cannot represent (another architecture, tokenizer or tensor type, rope scaling, a missing or
extra tensor, a truncated file) is an OwnLLMError naming the key or tensor, raised before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
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
    deinterleave_rope_rows,
    template_section,
)
from ownllm.interop.readers.foreign import ForeignModel, save_as_run
from ownllm.interop.readers.gguf_blocks import group_quantized
from ownllm.interop.readers.gguf_config import family_fields, rope_scaling_from_gguf
from ownllm.interop.readers.gguf_tokenizer import byte_level_bpe, sentencepiece_bpe
from ownllm.outputs import check_output
from ownllm.quantize import GroupQuantized
from ownllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    import gguf

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "gpt2", "qwen3", "smollm3", "gemma3")
PERMUTED = ("llama", "smollm3")  # llama.cpp interleaves the q/k rows of these (its converter permutes them)
GGUF_MAGIC = b"GGUF"


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise OwnLLMError("reading a .gguf file needs the gguf package: pip install 'ownllm[gguf]'") from None
    return gguf


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def is_gguf_path(path: str | Path) -> bool:
    """True for a GGUF file, or a path named *.gguf (whose absence or damage `read_gguf` then reports)."""
    return Path(path).suffix.lower() == ".gguf" or is_gguf_file(path)


# ---- the file -----------------------------------------------------------------------------------------------------

def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The memory-mapped file; a missing, foreign, corrupt or truncated file is one OwnLLMError."""
    gguf = _gguf_package()
    path = Path(path)
    if not path.is_file():
        raise OwnLLMError(f"{path}: no such file")
    if not is_gguf_file(path):
        raise OwnLLMError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError/KeyError/IndexError on a damaged header
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OwnLLMError(f"{path}: not a readable GGUF file ({reason}); the file is truncated or corrupt") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise OwnLLMError(f"{path}: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes:,} "
                              f"but the file has {size:,} bytes; the file is truncated")
    return reader


def read_metadata(reader: gguf.GGUFReader, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every key/value of the header as Python values (strings, numbers, lists)."""
    return {name: value.contents() for name, value in reader.fields.items()
            if not name.startswith("GGUF.") and name not in skip}


# ---- the model config ---------------------------------------------------------------------------------------------

class _Keys:
    """The header's values, looked up with the key named in every error."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.metadata, self.path = metadata, path

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise OwnLLMError(f"{self.path}: metadata key {key} is missing")
        return self.metadata[key]

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self.require(key) if default is None and key not in self.metadata else self.get(key, default)
        if value is not None and not isinstance(value, int):
            raise OwnLLMError(f"{self.path}: {key}={_short(value)} is not supported (one integer expected; "
                              "per-layer values are not implemented)")
        return value

    def refuse(self, key: str, why: str) -> OwnLLMError:
        return OwnLLMError(f"{self.path}: {key}={_short(self.get(key))} is not supported ({why})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_config_from_gguf(keys: _Keys, tensor_names: set[str], vocab_rows: int,
                           rope_freqs: Tensor | None = None) -> tuple[str, ModelConfig]:
    """(architecture, ModelConfig) from the header (and llama.cpp's `rope_freqs` tensor, where the file has one);
    settings ownllm cannot compute are refused by key."""
    arch = keys.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise keys.refuse("general.architecture", f"ownllm reads {', '.join(ARCHITECTURES)}")
    n_embd, n_head = keys.integer(f"{arch}.embedding_length"), keys.integer(f"{arch}.attention.head_count")
    n_layer = keys.integer(f"{arch}.block_count")
    common = dict(vocab_size=vocab_rows, block_size=keys.integer(f"{arch}.context_length"), n_layer=n_layer,
                  n_head=n_head, n_embd=n_embd, mlp_hidden=keys.integer(f"{arch}.feed_forward_length"),
                  tie_embeddings="output.weight" not in tensor_names)
    if keys.get(f"{arch}.expert_count", 0):
        raise keys.refuse(f"{arch}.expert_count", "mixture-of-experts models are not implemented")
    if arch == "gpt2":
        return arch, ModelConfig(**common, bias=True, norm="layernorm", mlp="gelu", position="learned",
                                 norm_eps=float(keys.require("gpt2.attention.layer_norm_epsilon")))
    head_dim = keys.integer(f"{arch}.attention.key_length", 0) or n_embd // n_head
    if keys.integer(f"{arch}.attention.value_length", 0) not in (0, head_dim):
        raise keys.refuse(f"{arch}.attention.value_length", "values and keys must have the same head size")
    rope_dims = keys.integer(f"{arch}.rope.dimension_count", 0) or head_dim
    if rope_dims != head_dim:
        raise keys.refuse(f"{arch}.rope.dimension_count", f"RoPE on part of the {head_dim}-wide heads is not "
                                                          "implemented")
    theta = float(keys.get(f"{arch}.rope.freq_base", 10000.0))
    fields = {"mlp": "swiglu", **family_fields(arch, keys, n_layer, n_embd, n_head, head_dim)}
    return arch, ModelConfig(**common, n_kv_head=keys.integer(f"{arch}.attention.head_count_kv", n_head),
                             head_dim=head_dim if head_dim * n_head != n_embd else None,
                             bias="blk.0.attn_output.bias" in tensor_names,
                             qkv_bias="blk.0.attn_q.bias" in tensor_names,
                             mlp_bias="blk.0.ffn_down.bias" in tensor_names, norm="rmsnorm",
                             norm_eps=float(keys.require(f"{arch}.attention.layer_norm_rms_epsilon")),
                             position="rope", rope_theta=theta,
                             rope_scaling=rope_scaling_from_gguf(keys, arch, head_dim, theta, rope_freqs), **fields)


def embedding_pooling_from_gguf(keys: _Keys, arch: str) -> str | None:
    """ownllm's name for `{arch}.pooling_type` (mean or last); None when absent, `none`, or a type ownllm lacks."""
    gguf = _gguf_package()
    key = f"{arch}.pooling_type"
    value = keys.get(key)
    if value is None or value == gguf.PoolingType.NONE.value:
        return None
    names = {gguf.PoolingType[member].value: ours for ours, member in POOLING_TYPES.items()}
    if value not in names:
        log.warning("%s: %s=%s is a pooling ownllm does not implement (it pools mean or last); ignored",
                    keys.path, key, _short(value))
    return names.get(value)


# ---- the tensors --------------------------------------------------------------------------------------------------

def tensor_plan(arch: str, config: ModelConfig, names: set[str], path: Path) -> dict[str, list[str]]:
    """ownllm parameter -> the GGUF tensors it is made of, stacked in this order; a missing or unused tensor is an
    OwnLLMError naming it."""
    plan: dict[str, list[str]] = {ours: [theirs] for theirs, ours in GGUF_GLOBAL.items() if theirs in names}
    for i in range(config.n_layer):
        blk, block = f"blk.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            if arch == "gpt2":
                plan.update({f"{block}{ours}.{kind}": [f"{blk}{theirs}.{kind}"]
                             for theirs, ours in GGUF_GPT2_LAYER.items()})
                continue
            for theirs, ours in _layer_names(config).items():
                if f"{blk}{theirs}.{kind}" in names or kind == "weight":
                    plan[f"{block}{ours}.{kind}"] = [f"{blk}{theirs}.{kind}"]
            for ours, parts in GGUF_LLAMA_FUSED.items():
                if f"{blk}{parts[0]}.{kind}" in names or kind == "weight":
                    plan[f"{block}{ours}.{kind}"] = [f"{blk}{part}.{kind}" for part in parts]
    wanted = {name for parts in plan.values() for name in parts} | ({GGUF_ROPE_FREQS} & names)
    missing = sorted(wanted - names, key=_natural)
    if missing:
        raise OwnLLMError(f"{path}: tensor {missing[0]} is missing ({arch} with {config.n_layer} layers needs it)")
    unused = sorted(names - wanted, key=_natural)
    if unused:
        raise OwnLLMError(f"{path}: tensor {unused[0]} is not part of a {arch} model ownllm can build "
                          f"({len(unused)} unused tensor(s))")
    return plan


def _layer_names(config: ModelConfig) -> dict[str, str]:
    """GGUF's per-layer tensor -> ownllm's module, besides the fused q|k|v and gate|up."""
    norms = GGUF_GEMMA_NORMS if config.sandwich_norm else {"attn_norm": "norm1", "ffn_norm": "norm2"}
    layer = {**GGUF_LLAMA_LAYER, **norms}
    return {**layer, **GGUF_QK_NORMS} if config.qk_norm_gain else layer


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def check_tensor_types(reader: gguf.GGUFReader, path: Path) -> None:
    """Every tensor's type must be one the gguf package dequantizes (tried on its first block)."""
    gguf = _gguf_package()
    for tensor in reader.tensors:
        block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        probe = np.ascontiguousarray(tensor.data.reshape(-1).view(np.uint8)[:block_bytes])
        try:
            gguf.quants.dequantize(probe, tensor.tensor_type)
        except NotImplementedError:
            raise OwnLLMError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which ownllm "
                              "cannot dequantize") from None


def dequantized(tensor: Any) -> Tensor:
    """One GGUF tensor as a float32 torch tensor in PyTorch's [rows, cols] order (its own memory, not the file's)."""
    gguf = _gguf_package()
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = np.asarray(values, dtype=np.float32)
    if not values.flags.writeable or not values.flags.c_contiguous or values.base is not None:
        values = np.array(values, dtype=np.float32, order="C")  # F32 tensors are views of the memory map
    return torch.from_numpy(values.reshape(tuple(int(d) for d in reversed(tensor.shape))))


def read_state(reader: gguf.GGUFReader, arch: str, config: ModelConfig, path: Path, progress: bool = False,
               convert: Convert | None = None) -> dict[str, Any]:
    """The model's float32 weights under ownllm's names, dequantized tensor by tensor (q/k rows of `llama` put
    back in the rotate-half layout), each checked against the shape ownllm's model has for `config`.

    With `convert`, a tensor stored in blocks an int kernel takes (Q8_0, Q4_0, Q4_1, Q4_K) is read as integers and
    scales (`GroupQuantized`, no float32 copy), and every tensor goes through `convert(name, value, was_quantized)`
    as soon as it is read, so that only one tensor at a time is held in another form."""
    from ownllm.model import GPT

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    plan = tensor_plan(arch, config, set(tensors), path)
    check_tensor_types(reader, path)
    with torch.device("meta"):
        expected = {name: t.shape for name, t in GPT(config).state_dict().items()}
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(set(expected) - set(plan) - tied, key=_natural)
    if missing:
        raise OwnLLMError(f"{path}: no tensor for ownllm's {missing[0]} (the header describes a model with it)")
    state: dict[str, Any] = {}
    for ours, parts in _progress(plan.items(), progress, path):
        pieces = [_read_piece(tensors[name], arch, config, path, keep_blocks=convert is not None) for name in parts]
        value = _joined(pieces)
        shape = value.values.shape if isinstance(value, GroupQuantized) else value.shape
        if expected.get(ours) != shape:
            shapes = " + ".join(f"{n} {tuple(p.shape)}" for n, p in zip(parts, pieces))
            raise OwnLLMError(f"{path}: tensor {shapes} does not fit the header's model "
                              f"(ownllm's {ours} is {tuple(expected[ours])})")
        stored_quantized = any(tensors[name].tensor_type.name not in FLOAT_TYPES for name in parts)
        state[ours] = value if convert is None else convert(ours, value, stored_quantized)
    return state


FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
Convert = Callable[[str, Any, bool], Any]


def _read_piece(tensor: Any, arch: str, config: ModelConfig, path: Path, keep_blocks: bool) -> Any:
    """One GGUF tensor: its blocks (`keep_blocks` and a type with an int kernel) or float32, rows unpermuted."""
    piece = group_quantized(tensor) if keep_blocks else None
    if piece is None:
        piece = dequantized(tensor)
    kind = tensor.name.split(".")[-2]
    if config.norm_offset and kind.endswith("norm") and not isinstance(piece, GroupQuantized):
        piece = piece - config.norm_offset  # llama.cpp stores Gemma's gains whole: 1 + weight
    if arch in PERMUTED and kind in ("attn_q", "attn_k"):
        heads = config.n_head if kind == "attn_q" else config.kv_heads
        rows = piece.values.shape[0] if isinstance(piece, GroupQuantized) else piece.shape[0]
        order = _unpermuted(torch.arange(rows).view(rows, 1), heads, tensor.name, path).view(-1)
        piece = piece.select_rows(order) if isinstance(piece, GroupQuantized) else piece[order]
    return piece


def _joined(pieces: list[Any]) -> Any:
    """Pieces stacked by rows (q, k, v into qkv): blocks stay blocks when they all have the same kind."""
    if len(pieces) == 1:
        return pieces[0]
    blocks = [p for p in pieces if isinstance(p, GroupQuantized)]
    same = len(blocks) == len(pieces) and len({(p.bits, p.group, p.offsets is None) for p in blocks}) == 1
    if same:
        offsets = None if blocks[0].offsets is None else torch.cat([p.offsets for p in blocks])
        return GroupQuantized(torch.cat([p.values for p in blocks]), torch.cat([p.scales for p in blocks]),
                              offsets, blocks[0].bits)
    return torch.cat([p.dequantize() if isinstance(p, GroupQuantized) else p for p in pieces])


def _unpermuted(piece: Tensor, heads: int, name: str, path: Path) -> Tensor:
    if piece.shape[0] % heads or (piece.shape[0] // heads) % 2:
        raise OwnLLMError(f"{path}: tensor {name} has {piece.shape[0]} rows, not a whole number of "
                          f"{heads} heads of even size")
    return deinterleave_rope_rows(piece, heads)


def _progress(items, enabled: bool, path: Path):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(list(items), desc=f"dequantizing {path.name}", unit="tensor", leave=False)


# ---- the tokenizer ------------------------------------------------------------------------------------------------

def tokenizer_from_gguf(keys: _Keys) -> tuple[Tokenizer, int | None]:
    """(Tokenizer with eos/bos/add_bos/chat template, pad id) from `tokenizer.ggml.*`."""
    kind = keys.require("tokenizer.ggml.model")
    if kind == "gpt2":
        hf = byte_level_bpe(keys.require("tokenizer.ggml.tokens"), keys.require("tokenizer.ggml.merges"),
                            keys.get("tokenizer.ggml.token_type"), keys.get("tokenizer.ggml.pre", "default"),
                            keys.path)
    elif kind == "llama":
        if keys.get("tokenizer.ggml.merges"):
            raise keys.refuse("tokenizer.ggml.model", "a SentencePiece vocabulary with stored merges is not "
                                                      "implemented")
        hf = sentencepiece_bpe(keys.require("tokenizer.ggml.tokens"), keys.require("tokenizer.ggml.scores"),
                               keys.get("tokenizer.ggml.token_type"),
                               bool(keys.get("tokenizer.ggml.add_space_prefix", True)),
                               keys.get("tokenizer.ggml.unknown_token_id"), keys.path)
    else:
        raise keys.refuse("tokenizer.ggml.model", "ownllm reads byte-level BPE ('gpt2') and SentencePiece "
                                                  "('llama') vocabularies")
    size = hf.get_vocab_size(with_added_tokens=True)
    ids = {name: _token_id(keys, f"tokenizer.ggml.{name}_token_id", size) for name in ("bos", "eos", "padding")}
    template = keys.get("tokenizer.chat_template")
    tokenizer = Tokenizer(hf, eos_id=ids["eos"], bos_id=ids["bos"],
                          add_bos=bool(keys.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                          chat_template=template if isinstance(template, str) else None)
    return tokenizer, ids["padding"]


def _token_id(keys: _Keys, key: str, size: int) -> int | None:
    value = keys.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < size:
        log.warning("%s: %s=%s is outside the vocabulary (0..%d); ignored", keys.path, key, value, size - 1)
        return None
    return value


# ---- the whole file -----------------------------------------------------------------------------------------------

def read_gguf(path: str | Path, progress: bool = False, convert: Convert | None = None) -> ForeignModel:
    """Read a GGUF file into ownllm's terms (config, float32 state dict, tokenizer, source sections); nothing is
    written. `progress` shows a bar while the tensors are dequantized; `convert` (see `read_state`) keeps
    quantized blocks as integers and turns each tensor into what the caller stores (ownllm.runs: int8/int4
    layers), and then the state holds its results."""
    path = Path(path)
    reader = open_gguf(path)
    keys = _Keys(read_metadata(reader), path)
    reader.fields.clear()  # the header as numpy parts (~100 MB for a 49k vocabulary): read into `keys` already
    names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise OwnLLMError(f"{path}: tensor token_embd.weight is missing")
    rope_freqs = next((dequantized(t) for t in reader.tensors if t.name == GGUF_ROPE_FREQS), None)
    arch, config = model_config_from_gguf(keys, names, vocab_rows=int(embedding.shape[-1]), rope_freqs=rope_freqs)
    tokenizer, pad_id = tokenizer_from_gguf(keys)
    if tokenizer.vocab_size > config.vocab_size:
        raise OwnLLMError(f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} tokens but token_embd.weight "
                          f"only {config.vocab_size} rows")
    state = read_state(reader, arch, config, path, progress=progress, convert=convert)
    pooling = embedding_pooling_from_gguf(keys, arch)
    sections = {"source": _source_record(path, keys, arch, pad_id), **template_section(tokenizer),
                **({"embedding_pooling": pooling} if pooling else {})}
    return ForeignModel(config=config, state=state, tokenizer=tokenizer, format="gguf", sections=sections)


def _source_record(path: Path, keys: _Keys, arch: str, pad_id: int | None) -> dict[str, Any]:
    """What the run config says about where the weights came from."""
    general = ("general.name", "general.file_type", "general.license", "general.organization")
    record = {"kind": "gguf", "path": str(Path(path).resolve()), "architecture": arch,
              **{key.removeprefix("general."): value for key, value in keys.metadata.items()
                 if key in general and isinstance(value, (str, int, float))}}
    if pad_id is not None:
        record["pad_token_id"] = pad_id
    return record


def import_gguf(path: str | Path, out: str | Path, progress: bool = True, force: bool = False) -> Path:
    """Write a GGUF file as an ownllm run directory (model.safetensors, config.json, tokenizer/); the directory
    appears whole or not at all, and an existing non-empty `out` is replaced only with `force`."""
    path = Path(path)
    out = check_output(out, "dir", inputs=[path], force=force)
    return save_as_run(read_gguf(path, progress=progress), out)


__all__ = ["read_gguf", "import_gguf", "is_gguf_file", "is_gguf_path", "open_gguf", "read_metadata"]
