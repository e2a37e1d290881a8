"""What the fine-tuning stages share: the base model, which parameters train, LoRA runs, train settings, loading.

A fine-tuned run directory is an ordinary run (config.json, tokenizer/, checkpoint/, metrics.jsonl, loss.png) with
"task": "classify" or "instruct" in its config. A full fine-tune publishes its weights as model.safetensors; a LoRA
run keeps only its adapters (and head) in the PEFT layout, adapter_config.json + adapter_model.safetensors, and
names its base run in config.json ("base"), which must stay where it was (or merge with `ownllm merge-lora`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ownllm import checkpoint, distributed
from ownllm.checkpoint import LoadedRun
from ownllm.config import ModelConfig, TrainConfig
from ownllm.errors import OwnLLMError
from ownllm.lora import LoRAConfig, apply_lora, load_peft_adapter, merge_lora
from ownllm.model import GPT

TOKENIZER_DIR = "tokenizer"
RESULTS_FILE = "metrics.json"  # final metrics of a fine-tuning run (the training log is metrics.jsonl)
PER_INVOCATION = ("stop_at", "max_minutes")


def load_base(path: str | Path) -> LoadedRun:
    """The base model to fine-tune, on the CPU: an ownllm run (or anything `checkpoint.load_run` reads)."""
    if path is None:
        raise OwnLLMError("--model is required for a new run (the run directory of a pretrained model)")
    base = checkpoint.load_run(path, device="cpu")
    if base.run_config.get("task") == "classify":
        raise OwnLLMError(f"{path}: is a classifier run; fine-tune from a language model")
    if base.run_config.get("lora"):
        raise OwnLLMError(f"{path}: is a LoRA run; merge it first (`ownllm merge-lora {path} --out DIR`)")
    return base


def with_dropout(config: ModelConfig, dropout: float | None) -> ModelConfig:
    return config if dropout is None else ModelConfig.from_dict({**config.to_dict(), "dropout": dropout})


def copy_base_weights(model: GPT, base: GPT) -> None:
    """Load the base model's tensors into `model` (a GPT or a subclass with extra modules such as a head)."""
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not name.startswith("score.") for name in missing):
        raise OwnLLMError(f"the base model's weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


def select_trainable(model: GPT, spec: str, head: tuple[str, ...] = ()) -> None:
    """Which parameters train: `all`, `head` (only the modules named in `head`), or `last:N` (the last N blocks,
    the final norm and the head)."""
    for param in model.parameters():
        param.requires_grad_(spec == "all")
    if spec == "all":
        return
    if spec == "head":
        if not head:
            raise OwnLLMError("--train-layers head needs a task head (classification); use last:N, all or LoRA")
        blocks = 0
    elif spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) >= 1:
        blocks = min(int(spec[5:]), len(model.blocks))
    else:
        raise OwnLLMError(f"--train-layers {spec!r}: use all, head or last:N (N >= 1)")
    modules = [getattr(model, name) for name in head]
    if blocks:
        modules += [*model.blocks[len(model.blocks) - blocks:], model.norm]
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(True)


def lora_config_from(rank: int, alpha: float | None, dropout: float, targets: Any) -> LoRAConfig | None:
    if not rank:
        return None
    return LoRAConfig(rank=rank, alpha=float(alpha if alpha is not None else 2 * rank), dropout=dropout,
                      targets=tuple(targets))


def train_config_for_finetune(overrides: dict[str, Any], batches_per_epoch: int, epochs: float,
                              default_lr: float) -> TrainConfig:
    """TrainConfig for a fine-tuning run: `epochs` over the training set unless --max-steps is given; warmup 5%
    of the steps; an evaluation about ten times per run."""
    given = {k: v for k, v in overrides.items() if v is not None}
    batch_size = given.get("batch_size", 8)
    grad_accum = given.get("grad_accum", 1)
    if epochs <= 0:
        raise OwnLLMError("--epochs must be positive")
    max_steps = given.get("max_steps") or max(1, math.ceil(epochs * batches_per_epoch / grad_accum))
    values: dict[str, Any] = dict(batch_size=batch_size, lr=default_lr, warmup_steps=max(1, max_steps // 20),
                                  max_steps=max_steps, eval_interval=max(1, max_steps // 10), eval_steps=0,
                                  log_interval=max(1, min(10, max_steps // 20)), weight_decay=0.1)
    values.update(given)
    return TrainConfig(**values)


def resumed_train_config(run_config: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    stored = {k: v for k, v in run_config.get("train", {}).items() if k not in PER_INVOCATION}
    stored.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(stored)


def start_run_dir(out: str | Path) -> tuple[Path, bool]:
    """The new run's directory (refusing to overwrite a run) and whether it was created here. Under torchrun,
    rank 0 alone checks and creates it."""
    run_dir = Path(out)
    if not distributed.is_main():
        return run_dir, False
    if (run_dir / checkpoint.CONFIG_FILE).exists():
        raise OwnLLMError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, created


def discard_run_dir(run_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)


def adapt_model(model: GPT, lora: LoRAConfig | None, train_layers: str, head: tuple[str, ...]) -> None:
    """Make the right parameters trainable: LoRA adapters plus the head, or a `select_trainable` spec."""
    if lora is None:
        select_trainable(model, train_layers, head)
        return
    if train_layers not in ("all", "head"):
        raise OwnLLMError("--train-layers and --lora-rank do not combine: with LoRA, adapters and the head train")
    apply_lora(model, lora)
    for name in head:
        for param in getattr(model, name).parameters():
            param.requires_grad_(True)


def load_finetuned(run_dir: Path, run_config: dict[str, Any], device: str | torch.device = "cpu") -> LoadedRun:
    """Load a classifier run, or a LoRA run (its base with the adapters applied, not merged), for inference."""
    from ownllm.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    model_config = ModelConfig.from_dict(run_config["model"])
    lora = run_config.get("lora")
    model = _empty_model(model_config, run_config)
    if lora:
        base = load_base(run_config["base"])
        if {**base.config.to_dict(), "dropout": 0.0} != {**model_config.to_dict(), "dropout": 0.0}:
            raise OwnLLMError(f"{run_config['base']}: the base model no longer matches the LoRA run {run_dir}")
        copy_base_weights(model, base.model)
        lora_config = LoRAConfig(**lora)
        apply_lora(model, lora_config)
        load_peft_adapter(model, lora_config, run_dir, extra=("score.weight",) if hasattr(model, "score") else ())
    else:
        weights = run_dir / checkpoint.WEIGHTS_FILE
        if not weights.is_file():
            raise OwnLLMError(f"{run_dir}: no {checkpoint.WEIGHTS_FILE} yet (the run has not saved a checkpoint)")
        checkpoint.load_weights(model, weights)
    model.to(device).eval()
    return LoadedRun(path=run_dir, model=model, tokenizer=load_tokenizer(run_dir / TOKENIZER_DIR),
                     config=model_config, run_config=run_config)


def _empty_model(model_config: ModelConfig, run_config: dict[str, Any]) -> GPT:
    if run_config.get("task") == "classify":
        from ownllm.finetune.classify import GPTClassifier

        return GPTClassifier(model_config, len(run_config["labels"]), run_config.get("pooling", "last"))
    return GPT(model_config)


def merge_lora_run(run_path: str | Path, out: str | Path) -> Path:
    """Fold a LoRA run's adapters into its base weights and write a self-contained run at `out`."""
    run = checkpoint.load_run(run_path)
    if not run.run_config.get("lora"):
        raise OwnLLMError(f"{run_path}: not a LoRA run (its config has no \"lora\" section)")
    out_dir, created = start_run_dir(out)
    try:
        merge_lora(run.model)
        sections = {k: v for k, v in run.run_config.items() if k not in ("format", "model", "lora")}
        sections["merged_from"] = str(Path(run_path).resolve())
        checkpoint.save_weights(run.model, out_dir / checkpoint.WEIGHTS_FILE)
        run.tokenizer.save(out_dir / TOKENIZER_DIR)
        checkpoint.write_run_config(out_dir, run.config, **sections)
    except BaseException:
        discard_run_dir(out_dir, created)
        raise
    return out_dir
