"""Hugging Face model directories in and out: GPT-2, Llama and Qwen2 weights, config.json and the tokenizer.

    model, tokenizer, config, run_config = read_hf_model(Path("path/to/hf-model"))   # ownllm.runs.load_run uses it
    import_hf("path/to/hf-model", "runs/base")   # ownllm import: the same, saved as an ownllm run directory
    export_hf(load_run("runs/mine"), "exported/hf")   # ownllm export --to hf: loads with AutoModelForCausalLM

An HF directory is `config.json` (with `model_type`) + `model.safetensors` (or shards listed in
`model.safetensors.index.json`) + the tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`, with
`tokenizer_config.json` / `generation_config.json` naming eos/bos and the chat template).

How the layouts map onto `GPT` (ownllm's one model class):
- GPT-2 stores its attention and MLP weights as Conv1D, input-major: they are transposed. `attn.bias` and
  `attn.masked_bias` are causal-mask buffers, not weights, and are skipped.
- Llama and Qwen2 keep q/k/v and gate/up in separate matrices; ownllm fuses them as [q | k | v] and [gate | up].
  HF's q/k use the rotate-half RoPE layout, which is ownllm's own, so no permutation is needed.
Anything the model cannot represent (another model_type, a rope scaling kind, a missing tensor or one of the
wrong shape, a tensor nobody asked for) is an OwnLLMError naming the file and key: never a silent partial load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ownllm.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    read_json,
    save_safetensors,
    save_weights,
    weights_state_dict,
    write_json_atomic,
    write_run_config,
)
from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.outputs import check_output, replaced_dir
from ownllm.tokenizer import Tokenizer, _with_specials_from, load_tokenizer

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2")
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# transformers writes only the values that differ from its config class defaults, so a missing key means these.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                  mlp_bias=False, head_dim=None),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
                  head_dim=None),
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the same function, written three ways
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # state-dict entries that are not weights


# ---- reading an HF directory --------------------------------------------------------------------------------------

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


def model_config_from_hf(hf: dict[str, Any], source: Path | str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig equal to an HF config.json (a dict); unsupported settings are an OwnLLMError naming the key."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OwnLLMError(f"{source}: model_type {model_type!r} is not supported "
                          f"(ownllm reads {', '.join(SUPPORTED_MODEL_TYPES)})")
    values = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k == "n_inner"}}

    def unsupported(key: str, why: str) -> OwnLLMError:
        return OwnLLMError(f"{source}: {key}={values.get(key)!r} is not supported ({why})")

    if model_type == "gpt2":
        if values["activation_function"] not in _GELU_TANH:
            raise unsupported("activation_function", f"ownllm's GPT-2 MLP uses {_GELU_TANH[0]}")
        if values["scale_attn_by_inverse_layer_idx"] or not values["scale_attn_weights"]:
            key = "scale_attn_weights" if not values["scale_attn_weights"] else "scale_attn_by_inverse_layer_idx"
            raise unsupported(key, "attention is always scaled by 1/sqrt(head size)")
        if values["add_cross_attention"]:
            raise unsupported("add_cross_attention", "ownllm models are decoder-only")
        return ModelConfig(vocab_size=values["vocab_size"], block_size=values["n_positions"],
                           n_layer=values["n_layer"], n_head=values["n_head"], n_embd=values["n_embd"],
                           mlp_hidden=values["n_inner"], bias=True, norm="layernorm",
                           norm_eps=values["layer_norm_epsilon"], mlp="gelu", position="learned",
                           tie_embeddings=bool(values["tie_word_embeddings"]))

    if values["hidden_act"] != "silu":
        raise unsupported("hidden_act", "the Llama MLP is SwiGLU with silu")
    rope_theta = _rope_theta(values, source)
    if model_type == "qwen2":  # sliding windows apply from layer max_window_layers on, or as layer_types says
        layer_types = values.get("layer_types")
        if layer_types and any(kind != "full_attention" for kind in layer_types):
            raise unsupported("layer_types", "sliding-window attention is not implemented")
        windowed = values["use_sliding_window"] and values["num_hidden_layers"] > values.get("max_window_layers", 28)
        if not layer_types and windowed:
            raise unsupported("use_sliding_window", "sliding-window attention is not implemented")
        bias, qkv_bias, mlp_bias = False, True, False
    else:
        attention_bias = bool(values["attention_bias"])
        bias, qkv_bias, mlp_bias = attention_bias, attention_bias, bool(values["mlp_bias"])
    return ModelConfig(vocab_size=values["vocab_size"], block_size=values["max_position_embeddings"],
                       n_layer=values["num_hidden_layers"], n_head=values["num_attention_heads"],
                       n_embd=values["hidden_size"], n_kv_head=values["num_key_value_heads"],
                       head_dim=values["head_dim"], mlp_hidden=values["intermediate_size"], bias=bias,
                       qkv_bias=qkv_bias, mlp_bias=mlp_bias, norm="rmsnorm", norm_eps=values["rms_norm_eps"],
                       mlp="swiglu", position="rope", rope_theta=rope_theta,
                       tie_embeddings=bool(values["tie_word_embeddings"]))


def _rope_theta(values: dict[str, Any], source: Path | str) -> float:
    """rope_theta from the top level (transformers v4) or `rope_parameters` (v5); only plain RoPE is implemented."""
    theta = values.get("rope_theta", 10000.0)
    for key in ("rope_parameters", "rope_scaling"):
        params = values.get(key)
        if not params:
            continue
        if not isinstance(params, dict):
            raise OwnLLMError(f"{source}: {key} must be a JSON object")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise OwnLLMError(f"{source}: {key}.rope_type={kind!r} is not supported "
                              "(ownllm implements plain RoPE, rope_type 'default')")
        theta = params.get("rope_theta", theta)
    return float(theta)


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
        self.pending.append(self.prefix + name if not name.startswith("lm_head") else name)
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
    """ownllm parameter names -> tensors, from the HF checkpoint's tensors, checked against the model's shapes."""
    if hf["model_type"] == "gpt2":
        src = _Tensors(tensors, "transformer.", source)
        state = _from_gpt2(src, config, _Mapped(src))
    else:
        src = _Tensors(tensors, "model.", source)
        state = _from_llama(src, config, _Mapped(src))
    with torch.device("meta"):
        expected = {name: t.shape for name, t in GPT(config).state_dict().items()}
    for name, tensor in state.items():
        if expected.get(name) != tensor.shape:
            what = " + ".join(src.origin.get(name, [name]))
            raise OwnLLMError(f"{source}: tensor {what} has shape {_shape_of(src, name)}, config.json implies "
                              f"{_shape_of_expected(src, name, expected[name], config)}")
    return dict(state)


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
    out["tok_emb.weight"] = src.take("wte.weight")
    out["pos_emb.weight"] = src.take("wpe.weight")
    out["norm.weight"] = src.take("ln_f.weight")
    out["norm.bias"] = src.take("ln_f.bias")
    conv1d = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for hf_norm, our_norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            for kind in ("weight", "bias"):
                out[f"{ours}{our_norm}.{kind}"] = src.take(f"{hf}{hf_norm}.{kind}")
        for hf_name, our_name in conv1d.items():
            out[f"{ours}{our_name}.weight"] = src.take(f"{hf}{hf_name}.weight").t()  # Conv1D is [in, out]
            out[f"{ours}{our_name}.bias"] = src.take(f"{hf}{hf_name}.bias")
    head = src.take_if_present("lm_head.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = head if head is not None else src.take("lm_head.weight")
    src.check_all_used()
    return out


def _from_llama(src: _Tensors, config: ModelConfig, out: _Mapped) -> _Mapped:
    out["tok_emb.weight"] = src.take("embed_tokens.weight")
    out["norm.weight"] = src.take("norm.weight")
    for i in range(config.n_layer):
        hf, ours = f"layers.{i}.", f"blocks.{i}."
        out[f"{ours}norm1.weight"] = src.take(f"{hf}input_layernorm.weight")
        out[f"{ours}norm2.weight"] = src.take(f"{hf}post_attention_layernorm.weight")
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        out[f"{ours}attn.qkv.weight"] = src.join([f"{name}.weight" for name in qkv])
        if config.use_qkv_bias:
            out[f"{ours}attn.qkv.bias"] = src.join([f"{name}.bias" for name in qkv])
        out[f"{ours}attn.proj.weight"] = src.take(f"{hf}self_attn.o_proj.weight")
        if config.bias:
            out[f"{ours}attn.proj.bias"] = src.take(f"{hf}self_attn.o_proj.bias")
        gate_up = [f"{hf}mlp.gate_proj", f"{hf}mlp.up_proj"]
        out[f"{ours}mlp.fc.weight"] = src.join([f"{name}.weight" for name in gate_up])
        out[f"{ours}mlp.proj.weight"] = src.take(f"{hf}mlp.down_proj.weight")
        if config.use_mlp_bias:
            out[f"{ours}mlp.fc.bias"] = src.join([f"{name}.bias" for name in gate_up])
            out[f"{ours}mlp.proj.bias"] = src.take(f"{hf}mlp.down_proj.bias")
    head = src.take_if_present("lm_head.weight")  # a tied checkpoint may still carry a copy; an untied one must
    if not config.tie_embeddings:
        out["lm_head.weight"] = head if head is not None else src.take("lm_head.weight")
    src.check_all_used()
    return out


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
    return _with_specials_from(directory, tok, eos_id=eos_id) if eos_id is not None else tok


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


def read_hf_model(directory: Path) -> tuple[GPT, Tokenizer, ModelConfig, dict[str, Any]]:
    """Read an HF model directory (GPT-2, Llama, Qwen2) as an ownllm model on the CPU, in float32: the model, its
    tokenizer, its config and a run config recording the source (ownllm.runs.load_run wraps them in a LoadedRun)."""
    hf = read_hf_config(directory)
    config = model_config_from_hf(hf, directory / CONFIG_FILE)
    tensors = read_hf_weights(directory)
    state = state_dict_from_hf(tensors, hf, config, source=directory)
    del tensors
    model = GPT(config)
    _load_checked(model, state, directory)
    model.eval()
    tokenizer = load_hf_tokenizer(directory, hf)
    run_config = {"format": "hf", "model": config.to_dict(), "source": _source_record(directory, hf),
                  **template_section(tokenizer)}
    return model, tokenizer, config, run_config


def template_section(tokenizer: Tokenizer) -> dict[str, str]:
    """{"template": "chatml"} when the model's own chat template is ChatML (so `ownllm chat` renders prompts the way
    the model was trained to read them), else nothing."""
    chat = tokenizer.chat_template or ""
    return {"template": "chatml"} if "<|im_start|>" in chat and "<|im_end|>" in chat else {}


def _load_checked(model: torch.nn.Module, state: dict[str, Tensor], source: Path) -> None:
    expected = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise OwnLLMError(f"{source}: no tensor for {missing[0]}")
    model.load_state_dict(state, strict=False)


def _source_record(directory: Path, hf: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "huggingface", "path": str(directory), "model_type": hf["model_type"],
            "architectures": hf.get("architectures")}


def import_hf(path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert an HF model directory into an ownllm run directory (config.json, model.safetensors, tokenizer/).
    An existing non-empty `out` is replaced only with `force`."""
    out = check_output(out, "dir", inputs=[path], force=force)
    model, tokenizer, config, run_config = read_hf_model(Path(path))
    with replaced_dir(out) as staging:
        save_weights(model, staging / WEIGHTS_FILE)
        tokenizer.save(staging / TOKENIZER_DIR)
        write_run_config(staging, config, source=run_config["source"], **template_section(tokenizer))
    return out


# ---- writing an HF directory --------------------------------------------------------------------------------------

def hf_model_type(config: ModelConfig) -> str:
    """The transformers architecture that computes the same function as `config`, or an OwnLLMError saying why none."""
    recipe = [name for name, used in (("--mlp relu2", config.mlp == "relu2"), ("--qk-norm", config.qk_norm),
                                      ("--logit-softcap", config.logit_softcap is not None)) if used]
    if recipe:
        raise OwnLLMError(f"cannot export: this model uses {', '.join(recipe)}, which Hugging Face GPT-2/Llama and "
                          f"llama.cpp's gpt2/llama cannot express (train without it to export)")
    gpt2 = (config.position == "learned", config.norm == "layernorm", config.mlp == "gelu")
    llama = (config.position == "rope", config.norm == "rmsnorm", config.mlp == "swiglu")
    if all(gpt2) and config.kv_heads == config.n_head and config.head_size * config.n_head == config.n_embd:
        return "gpt2"
    if all(llama):
        qwen2_biases = config.use_qkv_bias and not config.bias and not config.use_mlp_bias
        return "qwen2" if qwen2_biases else "llama"
    raise OwnLLMError(f"no Hugging Face architecture matches this model (position={config.position}, "
                      f"norm={config.norm}, mlp={config.mlp}): export needs the GPT-2 or the Llama flavour")


def hf_config_dict(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """config.json for transformers (no custom code)."""
    model_type = hf_model_type(config)
    eos = tokenizer.eot_id if tokenizer is not None else None
    bos = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else eos
    common = dict(model_type=model_type, vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
                  bos_token_id=bos, eos_token_id=eos, dtype="float32", torch_dtype="float32", use_cache=True)
    if model_type == "gpt2":
        return dict(common, architectures=["GPT2LMHeadModel"], n_positions=config.block_size, n_ctx=config.block_size,
                    n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_size,
                    activation_function="gelu_new", layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout,
                    embd_pdrop=config.dropout, attn_pdrop=config.dropout)
    values = dict(common, hidden_size=config.n_embd, intermediate_size=config.mlp_size,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.kv_heads, head_dim=config.head_size, hidden_act="silu",
                  max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                  rope_theta=config.rope_theta,  # transformers v4 reads this, v5 rope_parameters
                  rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                  attention_dropout=config.dropout)
    if model_type == "qwen2":
        return dict(values, architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                    max_window_layers=config.n_layer, layer_types=["full_attention"] * config.n_layer)
    return dict(values, architectures=["LlamaForCausalLM"], attention_bias=config.use_qkv_bias or config.bias,
                mlp_bias=config.use_mlp_bias)


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
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def bias_or_zeros(state: dict[str, Tensor], name: str, size: int) -> Tensor:
    """`state[name]`, or zeros of `size` where ownllm's layer has no bias but the target format wants one."""
    return state[name] if name in state else torch.zeros(size)


def _to_gpt2(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm.weight"],
           "transformer.ln_f.bias": bias_or_zeros(state, "norm.bias", config.n_embd)}
    conv1d = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for our_norm, hf_norm in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{hf}{hf_norm}.weight"] = state[f"{ours}{our_norm}.weight"]
            out[f"{hf}{hf_norm}.bias"] = bias_or_zeros(state, f"{ours}{our_norm}.bias", config.n_embd)
        for our_name, hf_name in conv1d.items():
            weight = state[f"{ours}{our_name}.weight"]
            out[f"{hf}{hf_name}.weight"] = weight.t()
            out[f"{hf}{hf_name}.bias"] = bias_or_zeros(state, f"{ours}{our_name}.bias", weight.shape[0])
    return out


def _to_llama(state: dict[str, Tensor], config: ModelConfig, model_type: str) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    q_size, kv_size = config.n_head * config.head_size, config.kv_heads * config.head_size
    attention_bias = model_type == "qwen2" or config.use_qkv_bias or config.bias
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        out[f"{hf}input_layernorm.weight"] = state[f"{ours}norm1.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{ours}norm2.weight"]
        qkv = state[f"{ours}attn.qkv.weight"].split([q_size, kv_size, kv_size])
        qkv_bias = bias_or_zeros(state, f"{ours}attn.qkv.bias", q_size + 2 * kv_size).split([q_size, kv_size, kv_size])
        for part, weight, bias in zip("qkv", qkv, qkv_bias):
            out[f"{hf}self_attn.{part}_proj.weight"] = weight
            if attention_bias:
                out[f"{hf}self_attn.{part}_proj.bias"] = bias
        out[f"{hf}self_attn.o_proj.weight"] = state[f"{ours}attn.proj.weight"]
        if attention_bias and model_type == "llama":
            out[f"{hf}self_attn.o_proj.bias"] = bias_or_zeros(state, f"{ours}attn.proj.bias", config.n_embd)
        gate, up = state[f"{ours}mlp.fc.weight"].chunk(2)
        out[f"{hf}mlp.gate_proj.weight"], out[f"{hf}mlp.up_proj.weight"] = gate, up
        out[f"{hf}mlp.down_proj.weight"] = state[f"{ours}mlp.proj.weight"]
        if config.use_mlp_bias:
            gate_bias, up_bias = state[f"{ours}mlp.fc.bias"].chunk(2)
            out[f"{hf}mlp.gate_proj.bias"], out[f"{hf}mlp.up_proj.bias"] = gate_bias, up_bias
            out[f"{hf}mlp.down_proj.bias"] = state[f"{ours}mlp.proj.bias"]
    return out


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
        Tokenizer(tokenizer.hf).save(staging)  # tokenizer.json alone; the specials go in tokenizer_config.json
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
    state = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
    state["score.weight"] = run.model.score.weight.detach().float().cpu().contiguous()
    return config_dict, state


__all__ = ["is_hf_model_dir", "read_hf_model", "import_hf", "export_hf", "model_config_from_hf", "read_hf_weights",
           "state_dict_from_hf", "hf_state_dict", "hf_config_dict", "hf_model_type", "load_hf_tokenizer"]
