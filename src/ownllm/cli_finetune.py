"""The fine-tuning verbs of the `ownllm` command (registered by `ownllm.cli`), each a thin call into the API.

    ownllm finetune classify --model runs/base --data sms.tsv --out runs/spam [--lora-rank 8] [--balance undersample]
    ownllm classify runs/spam --text "WINNER!! Claim your prize now"
    ownllm classify runs/spam --input messages.txt --output labels.jsonl
    ownllm finetune instruct --model runs/base --data instructions.json --out runs/assistant [--template chatml]
    ownllm chat runs/assistant
    ownllm generate runs/assistant --instruction "Rewrite the sentence using a simile." --input "The car is fast."
    ownllm merge-lora runs/assistant --out runs/assistant-merged
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from ownllm.cli import TRAIN_FLAGS, _add_sampling_flags, _add_train_flags, _is_main_process
from ownllm.errors import OwnLLMError
from ownllm.lora import TARGETS


def _add_common_finetune_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model: an ownllm run directory (or a Hugging Face model directory)")
    parser.add_argument("--data", help="training data file")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    parser.add_argument("--val-file", help="validation data (default: a --val-fraction of --data)")
    parser.add_argument("--test-file", help="test data (default: a --test-fraction of --data)")
    parser.add_argument("--split-seed", type=int, default=123, help="seed of the val/test split")
    parser.add_argument("--train-layers", default="all", help="all | last:N | head (classification only)")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = off)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lora-targets", nargs="+", default=list(TARGETS), choices=TARGETS, metavar="MODULE",
                        help=f"modules that get adapters (default: all of {' '.join(TARGETS)})")
    parser.add_argument("--epochs", type=float, default=None, help="passes over the training data (unless --max-steps)")
    parser.add_argument("--dropout", type=float, default=None, help="dropout while fine-tuning (default: the base's)")
    parser.add_argument("--device", default="auto")
    _add_train_flags(parser)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser("finetune", help="fine-tune a model: classify (a label per text) or instruct")
    stages = finetune.add_subparsers(dest="stage", required=True, metavar="STAGE")
    cls = stages.add_parser("classify", help="train a classifier head (and the model, or LoRA) on labelled texts")
    _add_common_finetune_flags(cls)
    cls.add_argument("--text-column", help="text column name (or number, 1 = first, in a file without a header)")
    cls.add_argument("--label-column", help="label column name (or number)")
    cls.add_argument("--val-fraction", type=float, default=0.1)
    cls.add_argument("--test-fraction", type=float, default=0.2)
    cls.add_argument("--balance", choices=["none", "undersample", "weight"], default="none",
                     help="undersample every class to the smallest, or weight the loss by inverse class frequency")
    cls.add_argument("--pooling", choices=["last", "mean"], default="last",
                     help="read the last real token (default) or the mean over the real tokens")
    cls.add_argument("--max-length", type=int, default=None, help="tokens kept per text (default: the context)")

    ins = stages.add_parser("instruct", help="train a model to follow instructions in a prompt template")
    _add_common_finetune_flags(ins)
    ins.add_argument("--val-fraction", type=float, default=0.05)
    ins.add_argument("--test-fraction", type=float, default=0.1)
    ins.add_argument("--template", choices=["alpaca", "chatml"], default="alpaca")
    ins.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                     help="learn only the responses (default) or the whole text")
    ins.add_argument("--max-new-tokens", type=int, default=256, help="length of the held-out responses")

    cl = sub.add_parser("classify", help="label texts with a classifier run")
    cl.add_argument("model", help="classifier run directory")
    cl.add_argument("--text", action="append", help="a text to classify (repeatable)")
    cl.add_argument("--input", help="a file with one text per line ('-' = stdin)")
    cl.add_argument("--output", help="JSON Lines out (default: stdout)")
    cl.add_argument("--batch-size", type=int, default=32)
    cl.add_argument("--device", default="auto")

    chat = sub.add_parser("chat", help="multi-turn chat with an instruction-tuned run (reads stdin, streams answers)")
    chat.add_argument("model", help="instruct run directory")
    chat.add_argument("--system", help="system message")
    _add_sampling_flags(chat)
    chat.add_argument("--device", default="auto")

    merge = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into its base weights: a standalone run")
    merge.add_argument("model", help="LoRA run directory")
    merge.add_argument("--out", required=True, help="new run directory")


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruction", help="answer this instruction in the run's prompt template")
    parser.add_argument("--input", default="", help="the instruction's input (with --instruction)")


def _train_values(args: argparse.Namespace) -> dict:
    values = {name: getattr(args, name) for name in TRAIN_FLAGS}
    values["precision"], values["compile"] = args.precision, args.compile
    values["strategy"] = args.strategy
    return values


def _common(args: argparse.Namespace) -> dict:
    common = dict(out=args.out, model=args.model, data=args.data, resume=args.resume, val_file=args.val_file,
                  test_file=args.test_file, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                  split_seed=args.split_seed, train_layers=args.train_layers, lora_rank=args.lora_rank,
                  lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                  dropout=args.dropout, device=args.device, **_train_values(args))
    if args.epochs is not None:
        common["epochs"] = args.epochs
    return common


def cmd_finetune(args: argparse.Namespace) -> None:
    if args.stage == "classify":
        from ownllm.evaluation import format_classification_table
        from ownllm.finetune import finetune_classify

        result = finetune_classify(text_column=args.text_column, label_column=args.label_column,
                                   balance=args.balance, pooling=args.pooling, max_length=args.max_length,
                                   **_common(args))
        if not _is_main_process():
            return
        for name, metrics in (("val", result.val), ("test", result.test)):
            if metrics:
                print(format_classification_table(metrics, name))
        print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}; "
              f"classifier saved in {args.out} (metrics in {args.out}/metrics.json)")
        return
    from ownllm.finetune import finetune_instruct

    result = finetune_instruct(template=args.template, mask_prompt=args.mask_prompt,
                               max_new_tokens=args.max_new_tokens, **_common(args))
    if not _is_main_process():
        return
    parts = [f"{name} loss {value:.4f}" for name, value in (("val", result.val_loss), ("test", result.test_loss))
             if value is not None]
    if result.rouge_l_f1 is not None:
        parts.append(f"ROUGE-L F1 {result.rouge_l_f1:.3f}, exact match {100 * result.exact_match:.1f}% "
                     f"(responses in {args.out}/responses.json)")
    print(f"{'stopped' if result.train.stopped_early else 'finished'} at step {result.train.step}: "
          f"{'; '.join(parts) or 'no held-out data'}; run saved in {args.out}")


def _lines(path: str) -> Iterator[str]:
    handle = sys.stdin if path == "-" else _open(path)
    for line in handle:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _open(path: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as error:
        raise OwnLLMError(f"{path}: cannot read ({error.strerror})") from None


def cmd_classify(args: argparse.Namespace) -> None:
    from ownllm.checkpoint import load_run
    from ownllm.device import pick_device
    from ownllm.finetune import classify_texts

    if not args.text and not args.input:
        raise OwnLLMError("give --text TEXT or --input FILE")
    run = load_run(args.model, device=pick_device(args.device))
    if run.run_config.get("task") != "classify":
        raise OwnLLMError(f"{args.model}: not a classifier run; train one with `ownllm finetune classify`")
    if args.text and not args.input and not args.output:
        for text, result in zip(args.text, classify_texts(run, args.text)):
            probabilities = ", ".join(f"{label} {p:.4f}" for label, p in result["probabilities"].items())
            print(f"{result['label']}\t({probabilities})\t{text}")
        return
    texts = iter(args.text or []) if not args.input else _lines(args.input)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        batch: list[str] = []
        for text in [*texts, None]:
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) == args.batch_size):
                for item, result in zip(batch, classify_texts(run, batch, batch_size=args.batch_size)):
                    out.write(json.dumps({"text": item, **result}, ensure_ascii=False) + "\n")
                out.flush()
                batch = []
    finally:
        if out is not sys.stdout:
            out.close()


def _instruct_run(path: str, device: str):
    from ownllm.checkpoint import load_run
    from ownllm.data.instructions import get_template
    from ownllm.device import pick_device

    run = load_run(path, device=pick_device(device))
    if not run.run_config.get("template"):
        raise OwnLLMError(f"{path}: has no prompt template (not an instruct run); fine-tune one with "
                          "`ownllm finetune instruct`, or use --prompt")
    return run, get_template(run.run_config["template"])


def _options(args: argparse.Namespace):
    from ownllm.decoding import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, stop=args.stop)


def cmd_chat(args: argparse.Namespace) -> None:
    from ownllm.decoding import chat_loop

    run, template = _instruct_run(args.model, args.device)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} ({template.name} template); /reset starts over, /exit or Ctrl-D ends")

    def read_line() -> str | None:
        line = sys.stdin.readline()
        return line if line else None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(run.model, run.tokenizer, template, _options(args), read_line, write, system=args.system,
              prompt_marker="> " if interactive else "")


def generate_instruction(args: argparse.Namespace) -> None:
    """`ownllm generate RUN --instruction ... [--input ...]`: the response, streamed."""
    from ownllm.data.instructions import Message
    from ownllm.decoding import chat_reply

    if args.prompt:
        raise OwnLLMError("give either --prompt or --instruction, not both")
    run, template = _instruct_run(args.model, args.device)
    chat_reply(run.model, run.tokenizer, template, [Message("user", args.instruction, args.input or "")],
               _options(args), on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from ownllm.finetune import merge_lora_run

    out = merge_lora_run(args.model, args.out)
    print(f"merged the adapters of {args.model} into {Path(out)}")


COMMANDS = {"finetune": cmd_finetune, "classify": cmd_classify, "chat": cmd_chat, "merge-lora": cmd_merge_lora}
