"""The verbs that make data and train: tokenizer, prepare, pretrain, finetune classify|instruct|prefer|embed, merge-lora
and demo, each a thin call into the API.

    ownllm tokenizer train corpus/*.txt --kind bpe --vocab-size 8000 --out tok/
    ownllm prepare corpus/ --tokenizer tok/ --out data/
    ownllm pretrain --data data/ --out runs/my-model --model mini --max-steps 2000
    ownllm finetune classify --model runs/base --data sms.tsv --out runs/spam [--lora-rank 8] [--balance undersample]
    ownllm finetune instruct --model runs/base --data instructions.json --out runs/assistant [--template chatml]
    ownllm finetune prefer --model runs/assistant --data prefs.json --out runs/polite --beta 0.1
    ownllm finetune embed --model runs/smol --data pairs.jsonl --out runs/smol-embed     # or --docs notes/
    ownllm merge-lora runs/assistant --out runs/assistant-merged
    ownllm demo

The flags of the training verbs are their options dataclasses' fields (ownllm.options, ownllm.cli.options); a
fine-tuning stage is an entry in `STAGES`: its options class, and what it prints at the end.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.cli.common import add_force_flag, add_out_flag
from ownllm.cli.options import add_stage_flags, stage_options
from ownllm.config import SCALE_GROUP
from ownllm.errors import OwnLLMError
from ownllm.options import (ClassifyOptions, EmbedOptions, FinetuneOptions, InstructOptions, PreferOptions,
                            PretrainOptions)
from ownllm.outputs import check_output, replaced_dir

DEFAULT_VOCAB_SIZE = 8000


@dataclass(frozen=True)
class Stage:
    """A fine-tuning stage of `ownllm finetune STAGE`: its options (their fields are its flags) and what it prints
    at the end."""

    help: str
    options: type[FinetuneOptions]
    report: Callable[[Any, argparse.Namespace], None]


def _held_out(parts: list[str], result: Any, nothing: str) -> str:
    """The held-out figures of a stage's result, and what became of its final evaluation when it did not run whole."""
    if result.final_eval != "done":
        parts = [*parts, f"final evaluation {result.final_eval}"]
    return "; ".join(parts) or nothing


def _report_classify(result: Any, args: argparse.Namespace) -> None:
    from ownllm.evaluation import format_classification_table

    for name, metrics in (("val", result.val), ("test", result.test)):
        if metrics:
            print(format_classification_table(metrics, name))  # the table names its size
    skipped = f" (final evaluation {result.final_eval})" if result.final_eval != "done" else ""
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}{skipped}; "
          f"classifier saved in {args.out} (metrics in {args.out}/metrics.json)")


def _report_instruct(result: Any, args: argparse.Namespace) -> None:
    parts = [f"{result.names.get(name, name)} loss {value:.4f}"
             for name, value in (("val", result.val_loss), ("test", result.test_loss)) if value is not None]
    if result.rouge_l_f1 is not None:
        parts.append(f"ROUGE-L F1 {result.rouge_l_f1:.3f}, exact match {100 * result.exact_match:.1f}% "
                     f"(responses in {args.out}/responses.json)")
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}: "
          f"{_held_out(parts, result, 'no held-out data')}; run saved in {args.out}")


def _report_prefer(result: Any, args: argparse.Namespace) -> None:
    held_out = (("val", result.val), ("test", result.test))
    parts = [f"{result.names.get(name, name)}: preference accuracy {100 * m['preference_accuracy']:.1f}%, "
             f"reward margin {m['reward_margin']:.3f}, loss {m['loss']:.4f}" for name, m in held_out if m]
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}; "
          f"{_held_out(parts, result, 'no held-out pairs')}; run saved in {args.out}")


def _report_embed(result: Any, args: argparse.Namespace) -> None:
    parts = [f"{result.names.get(name, name)}: retrieval accuracy {100 * m['accuracy']:.1f}% (before "
             f"{100 * m['accuracy_before']:.1f}%, chance {100 * m['chance']:.1f}%)"
             for name, m in (("val", result.val), ("test", result.test)) if m]
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}; "
          f"{_held_out(parts, result, 'no held-out pairs')}; embedder saved in {args.out} (index with "
          f"`ownllm index DOCS --model {args.out}`)")


STAGES: dict[str, Stage] = {
    "classify": Stage("train a classifier head (and the model, or LoRA) on labelled texts", ClassifyOptions,
                      _report_classify),
    "instruct": Stage("train a model to follow instructions in a prompt template", InstructOptions, _report_instruct),
    "prefer": Stage("preference tuning (DPO): prefer the chosen of two answers", PreferOptions, _report_prefer),
    "embed": Stage("train the model's pooled vectors for retrieval (contrastive, in-batch negatives) on pairs or "
                   "a folder of documents", EmbedOptions, _report_embed),
}


def _add_training_flags(parser: argparse.ArgumentParser, options_type: type) -> None:
    """The flags of a training verb: its options', and --nproc, which launches torchrun (ownllm.distributed)."""
    groups = add_stage_flags(parser, options_type)
    groups[SCALE_GROUP].add_argument("--nproc", type=int, default=None,
                                     help="train on N processes of this machine: ownllm starts torchrun itself")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE or char tokenizer on text files")
    tok_train.add_argument("inputs", nargs="+", help="text files or folders")
    tok_train.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    tok_train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="for --kind bpe")
    add_out_flag(tok_train, "directory for the tokenizer files")
    add_force_flag(tok_train)

    prep = sub.add_parser("prepare", help="tokenize text files into a training dataset (train.bin/val.bin)")
    prep.add_argument("inputs", nargs="+", help="text files or folders")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    add_out_flag(prep)
    prep.add_argument("--val-fraction", type=float, default=0.05)
    add_force_flag(prep, "replace an existing dataset in --out")

    pre = sub.add_parser("pretrain", help="train a model on text (next-token prediction), or --resume one")
    _add_training_flags(pre, PretrainOptions)

    finetune = sub.add_parser("finetune", help="fine-tune a model: classify (a label per text), instruct (follow "
                                               "instructions) or prefer (DPO)")
    stages = finetune.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        _add_training_flags(stages.add_parser(name, help=stage.help), stage.options)

    merge = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into its base weights: a standalone run")
    merge.add_argument("model", help="LoRA run directory")
    add_out_flag(merge, "new run directory")
    add_force_flag(merge, "replace an existing --out directory")

    demo = sub.add_parser("demo", help="train a small model on Python's own docs (offline) and print samples")
    add_out_flag(demo, default="runs/demo")
    demo.add_argument("--max-steps", type=int, default=None)
    demo.add_argument("--max-minutes", type=float, default=None)
    add_force_flag(demo, "replace what is in --out even if the demo did not make it")


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from ownllm.data.text import find_text_files
    from ownllm.tokenizer import train_bpe, train_char

    files = find_text_files(args.inputs)
    check_output(args.out, "dir", inputs=files, force=args.force)
    if args.kind == "char" and args.vocab_size != DEFAULT_VOCAB_SIZE:
        raise OwnLLMError("--vocab-size: applies to --kind bpe; a char tokenizer has one token per character seen")
    tok = train_char(files) if args.kind == "char" else train_bpe(files, vocab_size=args.vocab_size)
    with replaced_dir(args.out) as staging:
        tok.save(staging)
    print(f"{args.kind} tokenizer with {tok.vocab_size} tokens saved to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from ownllm.data.text import prepare_corpus
    from ownllm.tokenizer import load_tokenizer

    if not 0.0 <= args.val_fraction < 1.0:
        raise OwnLLMError("--val-fraction must be in [0, 1)")
    prepared = prepare_corpus(args.inputs, load_tokenizer(args.tokenizer), args.out, val_fraction=args.val_fraction,
                              force=args.force)
    print(f"{len(prepared.train):,} train and {len(prepared.val):,} val tokens written to {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from ownllm.distributed import is_main
    from ownllm.pretrain import pretrain

    result = pretrain(stage_options(args, PretrainOptions))
    if not is_main():  # the other torchrun processes print nothing
        return
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    state = "stopped (resume with --resume)" if result.stopped_early else "finished"
    print(f"{state} at step {result.step}: train loss {train_loss}{val}; peak memory "
          f"{result.peak_memory_mb:,.0f} MiB; run saved in {args.out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from ownllm.distributed import is_main
    from ownllm.finetune import finetune_classify, finetune_embed, finetune_instruct, finetune_prefer

    functions = {ClassifyOptions: finetune_classify, InstructOptions: finetune_instruct,
                 PreferOptions: finetune_prefer, EmbedOptions: finetune_embed}
    stage = STAGES[args.stage]
    result = functions[stage.options](stage_options(args, stage.options))
    if is_main():  # the other torchrun processes print nothing
        stage.report(result, args)


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from ownllm.finetune import merge_lora_run
    from ownllm.runs import load_run

    out = merge_lora_run(load_run(args.model, quantize="none"), args.out, force=args.force)
    print(f"merged the adapters of {args.model} into {Path(out)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from ownllm.demo import run_demo

    run_demo(Path(args.out), max_steps=args.max_steps, max_minutes=args.max_minutes, force=args.force)


COMMANDS = {"tokenizer": cmd_tokenizer, "prepare": cmd_prepare, "pretrain": cmd_pretrain, "finetune": cmd_finetune,
            "merge-lora": cmd_merge_lora, "demo": cmd_demo}
