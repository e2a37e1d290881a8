"""The options of the `ownllm` training verbs, each written once, in tables that build both the CLI and the call.

    parser = sub.add_parser("pretrain")
    add_options(parser, PRETRAIN, RUN, TRAIN)            # the flags, their types, defaults, help and groups
    pretrain(**option_values(args, PRETRAIN, RUN, TRAIN))  # the same tables read the keyword arguments back

An `Option` is one flag: the keyword argument of the stage function it feeds (`--max-steps` -> `max_steps`), the
argparse settings, and the help group it is listed under. `RUN` and `TRAIN` are shared by `pretrain` and every
fine-tuning stage, `FINETUNE` by every fine-tuning stage; a stage adds only its own table (`ownllm.cli.train`
registers `finetune classify|instruct|prefer` as a table and a function each).

Defaults are written once, in the stage functions' signatures (as litgpt derives its CLI from signatures): a flag
that is not given is left out of the call, so the function's default applies. The tables hold what a signature
cannot say: help texts, flag spellings, choices and groups.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ownllm.config import PRESETS
from ownllm.lora import TARGETS

TRAIN_GROUP = "training (defaults suit the --model preset)"
SCALE_GROUP = "several processes (docs/scaling.md)"


@dataclass(frozen=True)
class Option:
    """One CLI flag and the keyword argument it becomes."""

    keyword: str  # the stage function's keyword; the flag is --keyword-with-dashes unless `flag` says otherwise
    help: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # argparse: type, default, choices, action, nargs, ...
    flag: str | None = None
    group: str | None = None
    to_api: bool = True  # False: the CLI alone reads it (e.g. --nproc, which launches torchrun)


def opt(keyword: str, help: str = "", *, flag: str | None = None, group: str | None = None, to_api: bool = True,
        **settings: Any) -> Option:
    """An Option; `settings` are argparse's (never a default: a flag not given leaves the function's default)."""
    assert "default" not in settings, f"--{keyword}: defaults belong to the stage function's signature"
    return Option(keyword, help, settings, flag, group, to_api)


def _train(keyword: str, kind: type, help: str) -> Option:
    return opt(keyword, help, group=TRAIN_GROUP, type=kind)


# TrainConfig fields and how training runs (not given: the stage's default, a preset's or a fine-tune's)
TRAIN: tuple[Option, ...] = (
    _train("batch_size", int, "sequences per micro-batch"),
    _train("grad_accum", int, "micro-batches per optimizer step"),
    _train("lr", float, "peak learning rate"),
    _train("min_lr", float, "learning rate at the end of the cosine decay (default lr/10)"),
    _train("warmup_steps", int, "linear warmup steps"),
    _train("max_steps", int, "optimizer steps of the whole schedule"),
    _train("weight_decay", float, "AdamW weight decay on weight matrices"),
    _train("beta1", float, "AdamW beta1"),
    _train("beta2", float, "AdamW beta2"),
    _train("grad_clip", float, "clip the gradient norm to this (0 = off)"),
    _train("eval_interval", int, "evaluate on validation data every N steps (0 = never)"),
    _train("eval_steps", int, "validation batches per evaluation"),
    _train("log_interval", int, "write a metrics.jsonl row every N steps"),
    _train("checkpoint_interval", int, "also checkpoint every N steps (checkpoints are written at each evaluation)"),
    _train("stop_at", int,
           "end this invocation after step K with a checkpoint; the schedule still follows --max-steps"),
    _train("max_minutes", float, "stop with a checkpoint after this many minutes"),
    _train("seed", int, "random seed (model init, batches, dropout)"),
    opt("precision", "bf16 autocast or fp32; auto: the faster on this machine, measured (pretraining)",
        group=TRAIN_GROUP, choices=["auto", "bf16", "fp32"]),
    opt("compile", "torch.compile the model; auto: when a measurement says it pays over the run (pretraining)",
        group=TRAIN_GROUP, nargs="?", const="on", choices=["on", "off", "auto"]),
    opt("optimizer", "AdamW, or Muon on the hidden matrices with AdamW on embeddings, head, gains and biases",
        group=TRAIN_GROUP, choices=["adamw", "muon"]),
    _train("muon_lr", float, "with --optimizer muon: Muon's peak learning rate (AdamW keeps --lr)"),
    _train("muon_momentum", float, "with --optimizer muon: Muon's momentum"),
    opt("strategy", "under torchrun: DDP (auto) or FSDP; --batch-size stays the global batch", group=SCALE_GROUP,
        choices=["auto", "ddp", "fsdp"]),
    opt("nproc", "train on N processes of this machine: ownllm starts torchrun itself", group=SCALE_GROUP,
        to_api=False, type=int),
)

# where a training run lives
RUN: tuple[Option, ...] = (
    opt("out", "run directory", required=True),
    opt("resume", "continue the run in --out exactly where it stopped", action="store_true"),
    opt("force", "start over in --out even if it holds a run (without it, a run is never replaced)",
        action="store_true"),
    opt("device"),
)

RECIPE_GROUP = "model recipe (defaults: the --model preset's; docs/guide.md)"
# ModelConfig fields that pretrain's flags override, with their argparse settings
MODEL_FLAGS: dict[str, dict[str, Any]] = {
    "n_layer": dict(type=int), "n_head": dict(type=int), "n_embd": dict(type=int), "block_size": dict(type=int),
    "dropout": dict(type=float),
    "mlp": dict(choices=["gelu", "swiglu", "relu2"], help="MLP activation (relu2: relu(x)^2)", group=RECIPE_GROUP),
    "position": dict(choices=["learned", "rope"], help="learned position embeddings or rotary (RoPE)",
                     group=RECIPE_GROUP),
    "norm": dict(choices=["layernorm", "rmsnorm"], help="normalisation layers", group=RECIPE_GROUP),
    "bias": dict(action=argparse.BooleanOptionalAction, help="biases in linear layers and norms", group=RECIPE_GROUP),
    "qk_norm": dict(action=argparse.BooleanOptionalAction, help="RMSNorm on each head's queries and keys",
                    group=RECIPE_GROUP),
    "zero_init_proj": dict(action=argparse.BooleanOptionalAction,
                           help="start attention and MLP output projections at zero", group=RECIPE_GROUP),
    "tie_embeddings": dict(action=argparse.BooleanOptionalAction, group=RECIPE_GROUP,
                           help="share the token embedding with the LM head (--no-tie-embeddings: untied head)"),
    "logit_softcap": dict(type=float, help="cap logits smoothly to (-C, C) with C*tanh(logits/C)",
                          group=RECIPE_GROUP),
}
MODEL_OVERRIDES = tuple(MODEL_FLAGS)

PRETRAIN: tuple[Option, ...] = (
    opt("data", "a prepared dataset directory, or text files/folders", nargs="+"),
    opt("preset", f"preset (default mini): {', '.join(PRESETS)}", flag="--model"),
    opt("tokenizer", "for raw text: bpe (default), char, or a tokenizer path"),
    opt("vocab_size", "BPE vocabulary size for raw text (default 8000)", type=int),
    opt("val_fraction", "held-out share of raw text (default 0.05)", type=float),
    *(opt(name, **settings) for name, settings in MODEL_FLAGS.items()),
    opt("eval_tasks", "benchmarks scored at each evaluation, e.g. hellaswag,arc_easy (accuracy into metrics.jsonl "
        "and loss.png; docs/evaluation.md)"),
    opt("eval_limit", "items per benchmark at each evaluation (default 200)", type=int),
)

# shared by every fine-tuning stage
FINETUNE: tuple[Option, ...] = (
    opt("model", "base model: an ownllm run directory (or a Hugging Face model directory)"),
    opt("data", "training data file"),
    opt("val_file", "validation data (default: a --val-fraction of --data)"),
    opt("test_file", "test data (default: a --test-fraction of --data)"),
    opt("split_seed", "seed of the val/test split", type=int),
    opt("train_layers", "all | last:N | head (classification only)"),
    opt("lora_rank", "train LoRA adapters of this rank (0 = off)", type=int),
    opt("lora_alpha", "LoRA alpha (default 2 * rank)", type=float),
    opt("lora_dropout", type=float),
    opt("lora_targets", f"modules that get adapters (default: all of {' '.join(TARGETS)})", nargs="+",
        choices=TARGETS, metavar="MODULE"),
    opt("epochs", "passes over the training data (unless --max-steps)", type=float),
    opt("dropout", "dropout while fine-tuning (default: the base's)", type=float),
)


def add_options(parser: argparse.ArgumentParser, *tables: Sequence[Option]) -> None:
    """Add the flags of `tables` to `parser`, each under its help group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in (o for table in tables for o in table):
        target: Any = parser
        if option.group is not None:
            target = groups.get(option.group) or groups.setdefault(option.group,
                                                                   parser.add_argument_group(option.group))
        flag = option.flag or f"--{option.keyword.replace('_', '-')}"
        target.add_argument(flag, dest=option.keyword, help=option.help or None, default=None, **option.settings)


def option_values(args: argparse.Namespace, *tables: Sequence[Option]) -> dict[str, Any]:
    """The keyword arguments that the flags of `tables` give the stage function: those given on the command line."""
    values = {}
    for option in (o for table in tables for o in table):
        value = getattr(args, option.keyword)
        if option.to_api and value is not None:
            values[option.keyword] = value
    return values
