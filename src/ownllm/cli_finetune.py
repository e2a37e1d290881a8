"""The fine-tuning verbs of the `ownllm` command (registered by `ownllm.cli`), each a thin call into the API.

    ownllm finetune classify --model runs/base --data sms.tsv --out runs/spam [--lora-rank 8] [--balance undersample]
    ownllm classify runs/spam --text "WINNER!! Claim your prize now"
    ownllm classify runs/spam --input messages.txt --output labels.jsonl
    ownllm finetune instruct --model runs/base --data instructions.json --out runs/assistant [--template chatml]
    ownllm chat runs/assistant
    ownllm generate runs/assistant --instruction "Rewrite the sentence using a simile." --input "The car is fast."
    ownllm merge-lora runs/assistant --out runs/assistant-merged

A fine-tuning stage is a table of its own options and an entry in `STAGES`; the options every stage shares (the base
model, the data split, LoRA, the run directory, training) come from ownllm.cli_options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.cli_options import (FINETUNE, RUN, TRAIN, Option, add_options, add_sampling_flags, opt, option_values,
                                sampling_options)
from ownllm.errors import OwnLLMError
from ownllm.outputs import atomic_file, check_output


@dataclass(frozen=True)
class Stage:
    """A fine-tuning stage of `ownllm finetune STAGE`: its own options (beside FINETUNE, RUN and TRAIN), the
    function they are passed to ("module:name", imported when the stage runs) and what it prints at the end."""

    help: str
    options: tuple[Option, ...]
    function: str
    report: Callable[[Any, argparse.Namespace], None]


def _report_classify(result: Any, args: argparse.Namespace) -> None:
    from ownllm.evaluation import format_classification_table

    for name, metrics in (("val", result.val), ("test", result.test)):
        if metrics:
            print(format_classification_table(metrics, name))
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}; "
          f"classifier saved in {args.out} (metrics in {args.out}/metrics.json)")


def _report_instruct(result: Any, args: argparse.Namespace) -> None:
    parts = [f"{name} loss {value:.4f}" for name, value in (("val", result.val_loss), ("test", result.test_loss))
             if value is not None]
    if result.rouge_l_f1 is not None:
        parts.append(f"ROUGE-L F1 {result.rouge_l_f1:.3f}, exact match {100 * result.exact_match:.1f}% "
                     f"(responses in {args.out}/responses.json)")
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}: "
          f"{'; '.join(parts) or 'no held-out data'}; run saved in {args.out}")


def _report_prefer(result: Any, args: argparse.Namespace) -> None:
    held_out = (("val", result.val), ("test", result.test))
    parts = [f"{name}: preference accuracy {100 * m['preference_accuracy']:.1f}%, reward margin "
             f"{m['reward_margin']:.3f}, loss {m['loss']:.4f}" for name, m in held_out if m]
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}; "
          f"{'; '.join(parts) or 'no held-out pairs'}; run saved in {args.out}")


CLASSIFY: tuple[Option, ...] = (
    opt("text_column", "text column name (or number, 1 = first, in a file without a header)"),
    opt("label_column", "label column name (or number)"),
    opt("val_fraction", type=float),
    opt("test_fraction", type=float),
    opt("balance", "undersample every class to the smallest, or weight the loss by inverse class frequency",
        choices=["none", "undersample", "weight"]),
    opt("pooling", "read the last real token (default) or the mean over the real tokens", choices=["last", "mean"]),
    opt("max_length", "tokens kept per text (default: the context)", type=int),
)
INSTRUCT: tuple[Option, ...] = (
    opt("val_fraction", type=float),
    opt("test_fraction", type=float),
    opt("template", choices=["alpaca", "chatml"]),
    opt("mask_prompt", "learn only the responses (default) or the whole text", action=argparse.BooleanOptionalAction),
    opt("max_new_tokens", "length of the held-out responses", type=int),
)
PREFER: tuple[Option, ...] = (
    opt("val_fraction", type=float),
    opt("test_fraction", type=float),
    opt("template", "prompt template (default: the model's own, from its instruct run or chat template)",
        choices=["alpaca", "chatml"]),
    opt("beta", "DPO beta: how far the model may move from where it started", type=float),
    opt("loss", "DPO (sigmoid) or IPO loss", choices=["sigmoid", "ipo"]),
    opt("sft_weight", "add this much of the chosen answers' mean NLL per token to the loss (RPO; trl's rpo_alpha; "
        "default 0): keeps DPO from lowering the chosen answers' likelihood too, e.g. 1.0", type=float,
        metavar="ALPHA"),
)
STAGES: dict[str, Stage] = {
    "classify": Stage("train a classifier head (and the model, or LoRA) on labelled texts", CLASSIFY,
                      "ownllm.finetune.classify:finetune_classify", _report_classify),
    "instruct": Stage("train a model to follow instructions in a prompt template", INSTRUCT,
                      "ownllm.finetune.instruct:finetune_instruct", _report_instruct),
    "prefer": Stage("preference tuning (DPO): prefer the chosen of two answers", PREFER,
                    "ownllm.finetune.prefer:finetune_prefer", _report_prefer),
}


def _stage_tables(stage: Stage) -> Sequence[tuple[Option, ...]]:
    return (FINETUNE, RUN, stage.options, TRAIN)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser("finetune", help="fine-tune a model: classify (a label per text) or instruct")
    stages = finetune.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        add_options(stages.add_parser(name, help=stage.help), *_stage_tables(stage))

    cl = sub.add_parser("classify", help="label texts with a classifier run")
    cl.add_argument("model", help="classifier run directory")
    cl.add_argument("--text", action="append", help="a text to classify (repeatable)")
    cl.add_argument("--input", help="a file with one text per line ('-' = stdin)")
    cl.add_argument("--output", help="JSON Lines out (default: stdout); one line per input line")
    cl.add_argument("--force", action="store_true", help="replace an existing --output file")
    cl.add_argument("--batch-size", type=int, default=32)
    cl.add_argument("--device", default="auto")

    chat = sub.add_parser("chat", help="multi-turn chat with a language model in its chat format, as `ownllm serve` "
                          "renders it (reads stdin, streams answers)")
    chat.add_argument("model", help="run directory, Hugging Face model directory or GGUF file")
    chat.add_argument("--system", help="system message")
    add_sampling_flags(chat)
    chat.add_argument("--device", default="auto")

    merge = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into its base weights: a standalone run")
    merge.add_argument("model", help="LoRA run directory")
    merge.add_argument("--out", required=True, help="new run directory")
    merge.add_argument("--force", action="store_true", help="replace an existing --out directory")


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruction", help="answer this instruction in the run's prompt template")
    parser.add_argument("--input", default=None, help="the instruction's input (with --instruction)")


def cmd_finetune(args: argparse.Namespace) -> None:
    from ownllm.distributed import is_main

    stage = STAGES[args.stage]
    module, name = stage.function.split(":")
    result = getattr(importlib.import_module(module), name)(**option_values(args, *_stage_tables(stage)))
    if is_main():  # the other torchrun processes print nothing
        stage.report(result, args)


def _lines(path: str) -> Iterator[str]:
    """The lines of `path` ('-' = stdin), blank ones included (the output keeps one result per input line)."""
    if path == "-":
        yield from (line.rstrip("\r\n") for line in sys.stdin)
        return
    from ownllm.tokenizer import iter_text_chunks

    for chunk in iter_text_chunks(path):  # strict UTF-8; a binary or non-UTF-8 file is one clear error
        yield from (line.rstrip("\r") for line in chunk.removesuffix("\n").split("\n"))


def cmd_classify(args: argparse.Namespace) -> None:
    from ownllm.classification import classify_texts
    from ownllm.runs import load_run

    if not args.text and not args.input:
        raise OwnLLMError("give --text TEXT or --input FILE")
    if args.text and args.input:
        raise OwnLLMError("--text and --input: give one of them (texts on the command line, or a file)")
    if any(not text.strip() for text in args.text or []):
        raise OwnLLMError("--text: an empty text has no label; give some text")
    if args.output:
        check_output(args.output, "file", inputs=[args.input, args.model], force=args.force, flag="--output")
    run = load_run(args.model, device=args.device)
    if run.run_config.get("task") != "classify":
        raise OwnLLMError(f"{args.model}: not a classifier run; train one with `ownllm finetune classify`")
    if args.text and not args.output:
        for text, result in zip(args.text, classify_texts(run, args.text)):
            probabilities = ", ".join(f"{label} {p:.4f}" for label, p in result["probabilities"].items())
            print(f"{result['label']}\t({probabilities})\t{text}")
        return
    texts = iter(args.text) if args.text else _lines(args.input)
    if not args.output:
        _classify_lines(run, texts, args.batch_size, sys.stdout)
        return
    with atomic_file(args.output) as out:  # a failure half-way leaves no truncated file, an earlier one intact
        _classify_lines(run, texts, args.batch_size, out)


def _classify_lines(run: Any, texts: Iterator[str], batch_size: int, out: Any) -> None:
    """One JSON line per text, in order; a blank line gets {"label": null, "probabilities": null}."""
    from ownllm.classification import classify_texts

    batch: list[str] = []
    for text in [*texts, None]:
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == batch_size):
            real = [item for item in batch if item.strip()]
            results = iter(classify_texts(run, real, batch_size=batch_size) if real else [])
            for item in batch:
                result = next(results) if item.strip() else {"label": None, "probabilities": None}
                out.write(json.dumps({"text": item, **result}, ensure_ascii=False) + "\n")
            out.flush()
            batch = []


def _chat_run(path: str, device: str):
    """The run and its chat format (ownllm.chat: the same rule as the server's), for any language model."""
    from ownllm.chat import chat_format_for
    from ownllm.runs import load_run

    run = load_run(path, device=device)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{path}: is a classifier run, which labels texts: use `ownllm classify`")
    return run, chat_format_for(run.run_config, run.tokenizer)


def cmd_chat(args: argparse.Namespace) -> None:
    from ownllm.chat import chat_loop

    options = sampling_options(args)
    run, chat_format = _chat_run(args.model, args.device)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} ({chat_format.name} template); /reset starts over, /exit or Ctrl-D ends")

    def read_line() -> str | None:
        line = sys.stdin.readline()
        return line if line else None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(run.model, chat_format, options, read_line, write, system=args.system,
              prompt_marker="> " if interactive else "")


def generate_instruction(args: argparse.Namespace) -> None:
    """`ownllm generate RUN --instruction ... [--input ...]`: the response, streamed."""
    from ownllm.chat import chat_reply
    from ownllm.chat_templates import Message

    if args.prompt:
        raise OwnLLMError("give either --prompt or --instruction, not both")
    options = sampling_options(args)
    run, chat_format = _chat_run(args.model, args.device)
    chat_reply(run.model, chat_format, [Message("user", args.instruction, args.input or "")],
               options, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from ownllm.finetune import merge_lora_run
    from ownllm.runs import load_run

    out = merge_lora_run(load_run(args.model), args.out, force=args.force)
    print(f"merged the adapters of {args.model} into {Path(out)}")


COMMANDS = {"finetune": cmd_finetune, "classify": cmd_classify, "chat": cmd_chat, "merge-lora": cmd_merge_lora}
