"""LoRA: low-rank adapters on a frozen model's linear layers; wrap, train, save in the PEFT layout, merge.

    from ownllm.lora import LoRAConfig, apply_lora, merge_lora
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=("attn.qkv", "attn.proj")))   # base frozen
    ...train: only lora_A / lora_B (and anything you unfreeze yourself, e.g. a classifier head) change...
    save_peft_adapter(model, config, "runs/x", base="runs/base", task_type="CAUSAL_LM")
    merge_lora(model)                           # folds B @ A * alpha / rank into each weight; plain nn.Linear again
    with adapters_disabled(model): ...          # the base model's outputs, without a second copy (DPO's reference)

A wrapped layer computes W x + b + (alpha / rank) * B A dropout(x), with A [rank, in] drawn like nn.Linear's weight
and B [out, rank] zero, so at init the adapted model equals the base model. Targets are ownllm module names
(`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`) matched in every block.

PEFT layout: `adapter_config.json` + `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`
and `.lora_B.weight`. Module names are Hugging Face's where the mapping is exact:
- GPT-2 flavour (learned positions, LayerNorm, GELU): `blocks.N.attn.qkv` -> `transformer.h.N.attn.c_attn`,
  `attn.proj` -> `attn.c_proj`, `mlp.fc` -> `mlp.c_fc`, `mlp.proj` -> `mlp.c_proj` (Conv1D, so `fan_in_fan_out`).
- Llama flavour (RoPE, SwiGLU; also Qwen2): `blocks.N.attn.qkv` -> `model.layers.N.self_attn.q_proj/k_proj/v_proj`,
  `attn.proj` -> `o_proj`, `mlp.fc` -> `mlp.gate_proj/up_proj`, `mlp.proj` -> `mlp.down_proj`. ownllm fuses q|k|v
  (and gate|up) in one matrix, so one adapter there is written as three (two) adapters that share A and take
  their rows of B: B_q A is exactly the q rows of B A. Reading them back needs the shared A (it is checked).
- any other mix of flavours: ownllm's own names under `base_model.model.`.
A classifier head is saved beside the adapters as `base_model.model.score.weight` (PEFT's `modules_to_save`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ownllm.errors import OwnLLMError
from ownllm.outputs import save_safetensors

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=TARGETS)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise OwnLLMError("--lora-rank must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise OwnLLMError("--lora-dropout must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise OwnLLMError(f"unknown LoRA target(s) {unknown}: choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. Keeps the base's `weight`/`bias` names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base layer alone (see `adapters_disabled`)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta(self) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of every block's linear layer named by `targets` (e.g. blocks.3.attn.qkv)."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "blocks":
            continue
        for target in targets:
            parent_name, attribute = target.split(".")
            if parts[2] == parent_name and isinstance(getattr(module, attribute, None), (nn.Linear, LoRALinear)):
                found.append((module, attribute, f"{name}.{attribute}"))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linears with adapters; return the wrapped names."""
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for parent, attribute, full_name in _targets(model, config.targets):
        base = getattr(parent, attribute)
        if isinstance(base, LoRALinear):
            raise OwnLLMError(f"{full_name} already has a LoRA adapter")
        setattr(parent, attribute, LoRALinear(base, config.rank, config.alpha, config.dropout))
        wrapped.append(full_name)
    if not wrapped:
        raise OwnLLMError("no LoRA target modules found in the model")
    return wrapped


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block every LoRA layer of `model` computes its frozen base layer alone: the model as it was before
    adaptation, with no second copy in memory. A model without adapters is unchanged."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    states = [m.enabled for m in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear with a plain nn.Linear holding W + B A * scaling; return how many were merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        for attribute, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attribute, child.merged())
                merged += 1
    return merged


def lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    """ownllm-named adapter tensors: `blocks.N.attn.qkv.lora_A` -> [rank, in], `.lora_B` -> [out, rank]."""
    return {name: p.detach() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


# ---- the PEFT layout ----------------------------------------------------------------------------------------------

def hf_layout(model_config: Any) -> str:
    """'gpt2', 'llama' or 'ownllm': whose module names the adapter files use (see the module docstring)."""
    if model_config.position == "learned" and model_config.norm == "layernorm" and model_config.mlp == "gelu":
        return "gpt2"
    if model_config.position == "rope" and model_config.norm == "rmsnorm" and model_config.mlp in ("swiglu", "geglu"):
        return "llama"
    return "ownllm"


def _split_sizes(model_config: Any, target: str) -> list[tuple[str, int]] | None:
    """How a fused llama matrix splits by rows: [(hf name, rows)], or None when it maps to one HF module."""
    if target == "attn.qkv":
        q, kv = model_config.n_head * model_config.head_size, model_config.kv_heads * model_config.head_size
        return [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)]
    if target == "mlp.fc":
        return [("mlp.gate_proj", model_config.mlp_size), ("mlp.up_proj", model_config.mlp_size)]
    return None


_GPT2_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_LLAMA_NAMES = {"attn.proj": "self_attn.o_proj", "mlp.proj": "mlp.down_proj"}


def hf_target_modules(model_config: Any, targets: Sequence[str]) -> list[str]:
    layout = hf_layout(model_config)
    if layout == "gpt2":
        return [_GPT2_NAMES[t] for t in targets]
    if layout == "llama":
        return [n for t in targets for n in ([s for s, _ in _split_sizes(model_config, t)]
                                              if _split_sizes(model_config, t) else [_LLAMA_NAMES[t]])]
    return list(targets)


def to_peft_tensors(tensors: dict[str, Tensor], model_config: Any) -> dict[str, Tensor]:
    """ownllm adapter tensors -> PEFT keys in the layout of `hf_layout(model_config)`."""
    layout = hf_layout(model_config)
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        module, kind = name.rsplit(".", 1)  # blocks.N.attn.qkv, lora_A
        _, layer, target = module.split(".", 2)
        if layout == "gpt2":
            out[f"{PEFT_PREFIX}transformer.h.{layer}.{_GPT2_NAMES[target]}.{kind}.weight"] = tensor
        elif layout == "llama":
            split = _split_sizes(model_config, target)
            if split is None:
                out[f"{PEFT_PREFIX}model.layers.{layer}.{_LLAMA_NAMES[target]}.{kind}.weight"] = tensor
                continue
            rows = tensor.split([n for _, n in split]) if kind == "lora_B" else [tensor.clone() for _ in split]
            for (hf_name, _), part in zip(split, rows):
                out[f"{PEFT_PREFIX}model.layers.{layer}.{hf_name}.{kind}.weight"] = part.contiguous()
        else:
            out[f"{PEFT_PREFIX}{module}.{kind}.weight"] = tensor
    return out


def from_peft_tensors(peft: dict[str, Tensor], model_config: Any, targets: Sequence[str], n_layer: int,
                      path: Path) -> dict[str, Tensor]:
    """PEFT adapter tensors -> ownllm names (the inverse of `to_peft_tensors`); shared A checked for fused ones."""
    layout = hf_layout(model_config)
    out: dict[str, Tensor] = {}
    for layer in range(n_layer):
        for target in targets:
            for kind in ("lora_A", "lora_B"):
                if layout == "gpt2":
                    keys = [f"{PEFT_PREFIX}transformer.h.{layer}.{_GPT2_NAMES[target]}.{kind}.weight"]
                elif layout == "llama":
                    split = _split_sizes(model_config, target)
                    names = [n for n, _ in split] if split else [_LLAMA_NAMES[target]]
                    keys = [f"{PEFT_PREFIX}model.layers.{layer}.{n}.{kind}.weight" for n in names]
                else:
                    keys = [f"{PEFT_PREFIX}blocks.{layer}.{target}.{kind}.weight"]
                missing = [k for k in keys if k not in peft]
                if missing:
                    raise OwnLLMError(f"{path}: adapter tensor {missing[0]} is missing")
                parts = [peft[k] for k in keys]
                if kind == "lora_A":
                    if any(not torch.equal(parts[0], p) for p in parts[1:]):
                        raise OwnLLMError(f"{path}: {', '.join(keys)} have different lora_A; ownllm fuses these "
                                          "projections and needs one shared A")
                    tensor = parts[0]
                else:
                    tensor = torch.cat(parts, dim=0)
                out[f"blocks.{layer}.{target}.{kind}"] = tensor
    return out


def save_peft_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path, *, base: str,
                      task_type: str = "CAUSAL_LM", extra: dict[str, Tensor] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) for `model`'s adapters into `directory`.

    `extra` holds fully trained modules saved beside the adapters (e.g. {"score.weight": head}).
    """
    directory = Path(directory)
    model_config = model.config
    tensors = to_peft_tensors({k: v.float().contiguous() for k, v in lora_tensors(model).items()}, model_config)
    modules_to_save = sorted({name.rsplit(".", 1)[0] for name in (extra or {})}) or None
    for name, tensor in (extra or {}).items():
        tensors[PEFT_PREFIX + name] = tensor.detach().float().contiguous()
    adapter_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": hf_target_modules(model_config, config.targets),
        "fan_in_fan_out": hf_layout(model_config) == "gpt2", "bias": "none", "modules_to_save": modules_to_save,
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
    }
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_safetensors(tensors, tmp, metadata={"format": "pt"})
    tmp.replace(directory / ADAPTER_WEIGHTS)
    config_tmp = directory / (ADAPTER_CONFIG + ".tmp")
    config_tmp.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    config_tmp.replace(directory / ADAPTER_CONFIG)


def load_peft_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path,
                      extra: Sequence[str] = ()) -> None:
    """Load adapters (and the `extra` module tensors, e.g. "score.weight") written by `save_peft_adapter` into a
    model already wrapped with `apply_lora(model, config)`."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise OwnLLMError(f"{directory}: no {ADAPTER_WEIGHTS} (the run has not saved a checkpoint yet)")
    try:
        peft = load_file(str(path))
    except Exception as error:
        raise OwnLLMError(f"{path}: not a readable safetensors file ({error})") from None
    state = from_peft_tensors(peft, model.config, config.targets, model.config.n_layer, path)
    for name in extra:
        if PEFT_PREFIX + name not in peft:
            raise OwnLLMError(f"{path}: tensor {PEFT_PREFIX + name} is missing")
        state[name] = peft[PEFT_PREFIX + name]
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in own or own[name].shape != tensor.shape:
                raise OwnLLMError(f"{path}: adapter tensor {name} does not fit the base model")
            own[name].copy_(tensor)
