"""The verbs that use a model: generate, evaluate (perplexity or benchmarks), classify and chat, each a thin call into
the API.

    ownllm generate runs/my-model --prompt "To be or" --max-new-tokens 200
    ownllm generate runs/assistant --instruction "Rewrite the sentence using a simile." --input "The car is fast."
    ownllm evaluate runs/my-model --text held-out.txt
    ownllm evaluate runs/smol --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande --shots 0 --limit 500
    ownllm evaluate runs/smol --tasks my_questions.jsonl --json
    ownllm evaluate runs/smol-sft --tasks mmlu,arc_easy,nq_open --shots 5 --report eval/ --baseline runs/smol
    ownllm classify runs/spam --text "WINNER!! Claim your prize now"
    ownllm classify runs/spam --input messages.txt --output labels.jsonl
    ownllm chat runs/assistant
    ownllm chat-defaults runs/assistant --system "You answer in one sentence." --temperature 0.3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from ownllm.chat import CHAT_SETTINGS
from ownllm.cli.benchmarks import add_benchmark_flags, evaluate_benchmarks
from ownllm.cli.common import (MODEL_HELP, add_compile_flag, add_device_flag, add_force_flag, add_json_flag,
                               add_loading_flags, add_sampling_flags, compile_if_asked, sampling_options)
from ownllm.errors import OwnLLMError
from ownllm.outputs import atomic_file, check_output


def add_parsers(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="sample text from a model")
    gen.add_argument("model", help=MODEL_HELP)
    gen.add_argument("--prompt", action="append", help="prompt (repeat for a batch)")
    add_sampling_flags(gen)
    gen.add_argument("--instruction", help="answer this instruction in the run's prompt template")
    gen.add_argument("--input", default=None, help="the instruction's input (with --instruction)")
    add_loading_flags(gen)
    add_compile_flag(gen)

    ev = sub.add_parser("evaluate", help="perplexity on a text file (--text), or benchmarks (--tasks)")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--text", help="held-out UTF-8 text file: loss, perplexity and bits per byte")
    ev.add_argument("--batch-size", type=int, default=8)
    add_json_flag(ev)
    add_loading_flags(ev, "measure the model as `serve --quantize` runs it (the quality cost of int8 / int4 / bf16)")
    add_benchmark_flags(ev)

    cl = sub.add_parser("classify", help="label texts with a classifier run")
    cl.add_argument("model", help="classifier run directory")
    cl.add_argument("--text", action="append", help="a text to classify (repeatable)")
    cl.add_argument("--input", help="a file with one text per line ('-' = stdin)")
    cl.add_argument("--output", help="JSON Lines out (default: stdout); one line per input line")
    add_force_flag(cl, "replace an existing --output file")
    cl.add_argument("--batch-size", type=int, default=32)
    add_device_flag(cl)

    chat = sub.add_parser("chat", help="multi-turn chat with a language model in its chat format, as `ownllm serve` "
                          "renders it (reads stdin, streams answers)")
    chat.add_argument("model", help="run directory, Hugging Face model directory or GGUF file")
    chat.add_argument("--system", help="system message (default: the run's own, else the one its chat template adds)")
    add_sampling_flags(chat)
    add_loading_flags(chat)
    add_compile_flag(chat)

    defaults = sub.add_parser("chat-defaults", help="show or set a run's own chat defaults (system prompt, sampling), "
                              "which chat, generate --instruction, ask and serve use unless told otherwise")
    defaults.add_argument("model", help="ownllm run directory")
    defaults.add_argument("--system", help="system prompt of conversations that have none (\"\" for none)")
    defaults.add_argument("--temperature", type=float)
    defaults.add_argument("--top-p", type=float)
    defaults.add_argument("--top-k", type=int)
    defaults.add_argument("--max-tokens", type=int, help="answer length")
    defaults.add_argument("--unset", nargs="+", default=[], metavar="NAME", choices=CHAT_SETTINGS,
                          help="drop these defaults (the model's own, or the built-in ones, apply again)")


def cmd_generate(args: argparse.Namespace) -> None:
    from ownllm.decoding import generate
    from ownllm.runs import load_run

    if args.instruction is not None:
        return generate_instruction(args)
    if args.input is not None:
        raise OwnLLMError("--input: is the input of an --instruction; give --instruction too, or put it in --prompt")
    options = sampling_options(args)
    run = load_run(args.model, args.device, quantize=args.quantize)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{args.model}: is a classifier run; use `ownllm classify`")
    compile_if_asked(args, run.model)
    prompts = args.prompt or [""]
    _warn_long_prompts(prompts, run.tokenizer, run.config.block_size)
    if len(prompts) == 1:  # stream to the terminal as tokens come
        sys.stdout.write(prompts[0])
        generate(run.model, run.tokenizer, prompts, options,
                 on_text=lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    for prompt, text in zip(prompts, generate(run.model, run.tokenizer, prompts, options)):
        print(f"{prompt}{text}\n{'-' * 40}")


def _warn_long_prompts(prompts: list[str], tokenizer, context: int) -> None:
    from ownllm.outputs import warn

    for number, prompt in enumerate(prompts, start=1):
        tokens = len(tokenizer.encode(prompt))
        if tokens > context:
            which = f"--prompt {number}" if len(prompts) > 1 else "--prompt"
            warn(f"{which} takes {tokens} tokens, more than the model's context ({context}); only its last "
                 f"{context} tokens are read")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ownllm.evaluation import evaluate_text
    from ownllm.runs import load_run

    if (args.text is None) == (args.tasks is None):
        raise OwnLLMError("evaluate needs either --text FILE or --tasks NAMES (one of the two)")
    if args.tasks is not None:
        return evaluate_benchmarks(args)
    given = [flag for flag, value in (("--report", args.report), ("--baseline", args.baseline),
                                      ("--force", args.force), ("--batching", args.batching != "auto"),
                                      ("--shots", args.shots), ("--limit", args.limit)) if value]
    if given:
        raise OwnLLMError(f"{', '.join(given)}: apply to benchmarks (--tasks), not to --text")
    run = load_run(args.model, args.device, quantize=args.quantize)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{args.model}: is a classifier run, which predicts labels, not text; its test metrics "
                          f"are in {args.model}/metrics.json (evaluate its base model for loss on text)")
    result = evaluate_text(run.model, run.tokenizer, args.text, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | bits per byte "
              f"{result.bits_per_byte:.4f} | {result.tokens:,} tokens, {result.bytes:,} bytes"
              + (f" | {result.unknown:,} characters the tokenizer never saw, each scored as a uniform guess"
                 if result.unknown else ""))


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


def cmd_chat_defaults(args: argparse.Namespace) -> None:
    from ownllm.chat import set_chat_defaults

    given = {name: getattr(args, name) for name in CHAT_SETTINGS if getattr(args, name) is not None}
    chat = set_chat_defaults(args.model, given, args.unset)
    shown = ", ".join(f"{name} {value!r}" for name, value in chat.items()) or "none (the model's own apply)"
    print(f"{args.model}: chat defaults: {shown}")


def _chat_run(path: str, device: str, quantize: str = "auto"):
    """The run and its chat format (ownllm.chat: the same rule as the server's), for any language model."""
    from ownllm.chat import PROJECT_DEFAULT, chat_format_for
    from ownllm.runs import load_run

    run = load_run(path, device=device, quantize=quantize)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{path}: is a classifier run, which labels texts: use `ownllm classify`")
    chat_format = chat_format_for(run.run_config, run.tokenizer)
    if chat_format.origin == PROJECT_DEFAULT:
        print(f"note: {path} has no chat template of its own: chatting in {chat_format.name}, the project's default",
              file=sys.stderr)
    return run, chat_format


def cmd_chat(args: argparse.Namespace) -> None:
    from ownllm.chat import chat_loop, chat_settings

    sampling_options(args)  # the flags given are checked before anything loads or is said
    run, chat_format = _chat_run(args.model, args.device, args.quantize)
    compile_if_asked(args, run.model)
    options = sampling_options(args, chat_settings(run.run_config))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} ({chat_format.name} template, {chat_format.origin}); /reset starts over, "
              "/exit or Ctrl-D ends")

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
    from ownllm.chat import chat_reply, chat_settings
    from ownllm.chat_templates import Message

    if args.prompt:
        raise OwnLLMError("give either --prompt or --instruction, not both")
    sampling_options(args)  # the flags given are checked before anything loads or is said
    run, chat_format = _chat_run(args.model, args.device, args.quantize)
    compile_if_asked(args, run.model)
    options = sampling_options(args, chat_settings(run.run_config))
    chat_reply(run.model, chat_format, [Message("user", args.instruction, args.input or "")],
               options, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")


COMMANDS = {"generate": cmd_generate, "evaluate": cmd_evaluate, "classify": cmd_classify, "chat": cmd_chat,
            "chat-defaults": cmd_chat_defaults}
