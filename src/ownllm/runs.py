"""Loading: the one place that turns a path into a model ready to use (a `LoadedRun`).

    from ownllm.runs import load_run
    run = load_run("runs/my-model", device="cpu")          # run.model, run.tokenizer, run.config, run.run_config
    run = load_run("runs/my-model", quantize="int4")       # weight-only int4 layers, on the CPU (ownllm.quantize)
    run = load_run("path/to/hf-model")                     # a Hugging Face directory, converted in memory
    run = load_run("SmolLM2-135M-Instruct.Q4_1.gguf")      # a GGUF file; or "hf:ORG/NAME" from the Hub

What a path can be:
- an ownllm run directory (ownllm.checkpoint's layout): a language model, a classifier (`"task": "classify"`, a
  `GPTClassifier`), a full fine-tune, or a LoRA run (its base run with the adapters applied, not merged);
- a Hugging Face model directory (GPT-2, Llama, Qwen2), read by ownllm.interop.readers.hf;
- a GGUF file (llama.cpp's format, any quantization), read by ownllm.interop.readers.gguf; on the CPU its Q8_0 /
  Q4_0 / Q4_1 / Q4_K blocks stay quantized (int8 / int4 layers) unless `quantize="none"` asks for float32;
- `hf:ORG/NAME[@REVISION]`: a Hugging Face Hub model, downloaded into the HF cache (ownllm.interop.readers.hub)
  and read as a Hugging Face directory.

Each foreign source is one branch in `_read_foreign`: both `load_run` and `load_base` (the model a fine-tuning
stage starts from) go through it. A reader returns plain data (a `ForeignModel`: config, weights, tokenizer);
the model is built here. Exporters, evaluators, the server and the CLI start from a `LoadedRun`; storage
(ownllm.checkpoint) knows nothing of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ownllm.checkpoint import TOKENIZER_DIR, WEIGHTS_FILE, load_weights, read_run_config
from ownllm.config import ModelConfig
from ownllm.device import pick_device
from ownllm.errors import OwnLLMError
from ownllm.interop.readers.gguf import is_gguf_path, read_gguf
from ownllm.interop.readers.hf import is_hf_model_dir, read_hf
from ownllm.interop.readers.hub import local_model_path
from ownllm.lora import LoRAConfig, apply_lora, load_peft_adapter, merge_lora
from ownllm.model import GPT, GPTClassifier
from ownllm.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    RefinedHead,
    check_quantize_mode,
    inference_weight,
    quantize_model,
    refined_head,
)
from ownllm.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedRun:
    """A model ready to use: `model(ids) -> logits`, `tokenizer.encode/decode`, `config` (ModelConfig), and
    `run_config` (the run's config.json as a dict; for a foreign format, what it was read from)."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: ModelConfig
    run_config: dict[str, Any]


def load_run(path: str | Path, device: str | torch.device = "cpu", quantize: str = "auto") -> LoadedRun:
    """Load any model path (see the module docstring) for inference, in eval mode, on `device` ("auto" picks one).

    `quantize` (ownllm.quantize: auto | none | bf16 | int8 | int4) stores the weights in fewer bits; int8 and int4
    load on the CPU, where their kernels run, whatever `device` says. `auto` is `none`, except that a GGUF file
    loaded on the CPU keeps its quantized blocks quantized (Q8_0 as int8, Q4_0/Q4_1/Q4_K as int4, other quantized
    matrices as int8); with int8 / int4 a GGUF's 4-bit blocks stay as they are, its Q8_0 blocks become int8 /
    int4 (requantized) and its float matrices take that mode.
    `none` reads every weight as float32.
    """
    check_quantize_mode(quantize)
    if isinstance(device, str):
        device = pick_device("cpu" if quantize in ("int8", "int4") else device)
    keep_blocks = quantize in ("int8", "int4") or (quantize == "auto" and torch.device(device).type == "cpu")
    run = _read_foreign(path, quantize if keep_blocks else None) or _read_run_dir(Path(path))
    run.model.to(device).eval()
    run.model = quantize_model(run.model, quantize)
    return run


def load_base(path: str | Path | None) -> LoadedRun:
    """The language model a fine-tuning stage starts from, on the CPU, in train-ready float32: an ownllm run or a
    foreign model; a LoRA run is its base with the adapters merged in (so any stage chains on a LoRA run, with no
    `merge-lora` copy on disk); a classifier is refused. Never loaded through `load_run`."""
    if path is None:
        raise OwnLLMError("--model is required for a new run (the run directory of a pretrained model)")
    foreign = _read_foreign(path)
    if foreign is not None:
        return foreign
    run_dir = Path(path)
    run_config = read_run_config(run_dir)
    if run_config.get("task") == "classify":
        raise OwnLLMError(f"{path}: is a classifier run; fine-tune from a language model")
    if run_config.get("lora"):
        run = _read_lora(run_dir, run_config)
        merge_lora(run.model)
        run.run_config = {key: value for key, value in run_config.items() if key != "lora"}
        return run
    return _read_full_weights(run_dir, run_config)


def copy_base_weights(model: GPT, base: GPT) -> None:
    """Load the base model's tensors into `model` (a GPT or a subclass with extra modules such as a head)."""
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not name.startswith("score.") for name in missing):
        raise OwnLLMError(f"the base model's weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _read_foreign(path: str | Path, quantize: str | None = None) -> LoadedRun | None:
    """A model in another format, converted in memory on the CPU; None for an ownllm run directory.
    `hf:ORG/NAME[@REV]` is downloaded (or found in the HF cache) first. With `quantize`, a GGUF file's tensors
    become int8/int4 layers as they are read (`quantize.inference_weight`), never all float32 at once."""
    path = local_model_path(path)
    if is_gguf_path(path):
        convert = None if quantize is None else partial(inference_weight, mode=quantize)
        foreign = read_gguf(Path(path), convert=convert)
    elif is_hf_model_dir(path):
        foreign = read_hf(Path(path))
    else:
        return None
    model = _model_from_state(foreign.config, foreign.state, Path(path), quantize)
    return LoadedRun(path=Path(path), model=model, tokenizer=foreign.tokenizer, config=foreign.config,
                     run_config=foreign.run_config)


def _model_from_state(config: ModelConfig, state: dict[str, Any], source: Path, quantize: str | None = None) -> GPT:
    """A GPT in eval mode whose parameters ARE the tensors of `state` (no second copy of the weights is made), or
    its quantized layers (`quantize`: the mode they were made in; a tied head is made here from the embedding)."""
    with torch.device("meta"):
        model = GPT(config)
    state = _install_layers(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.tok_emb, QuantizedEmbedding):
        model.lm_head = refined_head(model.tok_emb.table(), None, "int4" if quantize == "int4" else "int8",
                                     rows=model.tok_emb)
    elif config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if config.position == "rope":
        model.make_rope_tables()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise OwnLLMError(f"{source}: no tensor for {left[0]}")
    return model.eval()


def _install_layers(model: GPT, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Put the quantized layers of `state` (`quantize.inference_weight`) into `model`, with their biases; the rest
    of the state, plain tensors, is returned."""
    state = dict(state)
    for name in [name for name, value in state.items() if isinstance(value, torch.nn.Module)]:
        layer, path = state.pop(name), name.removesuffix(".weight")
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        if isinstance(layer, (QuantizedLinear, RefinedHead)):
            layer.cap = getattr(getattr(owner, child), "cap", None)
            bias = state.pop(f"{path}.bias", None)
            linear = layer.fast if isinstance(layer, RefinedHead) else layer
            linear.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        setattr(owner, child, layer)
    return state


def _read_run_dir(run_dir: Path) -> LoadedRun:
    run_config = read_run_config(run_dir)
    if run_config.get("lora"):
        return _read_lora(run_dir, run_config)
    return _read_full_weights(run_dir, run_config)


def _empty_model(run_config: dict[str, Any]) -> GPT:
    model_config = ModelConfig.from_dict(run_config["model"])
    if run_config.get("task") == "classify":
        return GPTClassifier(model_config, len(run_config["labels"]), run_config.get("pooling", "last"))
    return GPT(model_config)


def _loaded(run_dir: Path, model: GPT, run_config: dict[str, Any]) -> LoadedRun:
    return LoadedRun(path=run_dir, model=model, tokenizer=load_tokenizer(run_dir / TOKENIZER_DIR),
                     config=model.config, run_config=run_config)


def _read_full_weights(run_dir: Path, run_config: dict[str, Any]) -> LoadedRun:
    """A run that publishes its whole model as model.safetensors (pretrained, full fine-tune, classifier)."""
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise OwnLLMError(f"{run_dir}: no {WEIGHTS_FILE} yet (the run has not saved a checkpoint)")
    model = _empty_model(run_config)
    load_weights(model, weights)
    return _loaded(run_dir, model, run_config)


def _read_lora(run_dir: Path, run_config: dict[str, Any]) -> LoadedRun:
    """A LoRA run: its base model (named in config.json) with the run's adapters (and head) applied."""
    model = _empty_model(run_config)
    base = load_base(run_config["base"])
    if {**base.config.to_dict(), "dropout": 0.0} != {**model.config.to_dict(), "dropout": 0.0}:
        raise OwnLLMError(f"{run_config['base']}: the base model no longer matches the LoRA run {run_dir}")
    copy_base_weights(model, base.model)
    lora_config = LoRAConfig(**run_config["lora"])
    apply_lora(model, lora_config)
    load_peft_adapter(model, lora_config, run_dir, extra=("score.weight",) if hasattr(model, "score") else ())
    return _loaded(run_dir, model, run_config)
