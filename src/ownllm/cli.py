"""The `ownllm` command: one subcommand per stage, each a thin call into the Python API.

    ownllm tokenizer train corpus/*.txt --kind bpe --vocab-size 8000 --out tok/
    ownllm prepare corpus/ --tokenizer tok/ --out data/
    ownllm pretrain --data data/ --out runs/my-model --model mini --max-steps 2000
    ownllm generate runs/my-model --prompt "To be or" --max-new-tokens 200
    ownllm evaluate runs/my-model --text held-out.txt
    ownllm evaluate runs/my-model --tasks arc_easy,hellaswag --limit 500   # benchmarks (cli_benchmarks)
    ownllm finetune classify|instruct ..., ownllm classify, ownllm chat, ownllm merge-lora   (see cli_finetune)
    ownllm import path/to/hf-model --out runs/base          # or pass the HF directory to any verb directly
    ownllm import model.gguf --out runs/base                # a llama.cpp GGUF file, dequantized to float32
    ownllm download ORG/NAME --out models/name              # from the Hugging Face Hub; hf:ORG/NAME works as a model
    ownllm export runs/my-model --to hf --out exported/hf   # or --to gguf --out m.gguf --quant q8_0
    ownllm serve runs/my-model --port 8000 [--quantize int8]  # OpenAI-compatible API + chat page (cli_serve)
    ownllm embed RUN --input texts.txt --output vectors.jsonl; ownllm index DOCS --model RUN --out docs.index;
    ownllm ask RUN --index docs.index "question"                # embeddings and retrieval (cli_retrieval)
    ownllm demo

A user mistake (bad file, unknown preset, corrupt checkpoint) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ownllm import cli_benchmarks, cli_finetune, cli_retrieval, cli_serve
from ownllm.cli_options import (MODEL_OVERRIDES, PRETRAIN, RUN, TRAIN, add_options, add_sampling_flags, option_values,
                                sampling_options)
from ownllm.errors import OwnLLMError
from ownllm.outputs import check_output, replaced_dir
from ownllm.quantize import QUANTIZE_MODES

MODEL_HELP = "run directory, Hugging Face model directory, .gguf file or hf:ORG/NAME[@REVISION]"
DEFAULT_VOCAB_SIZE = 8000


def _add_loading_flags(parser: argparse.ArgumentParser, quantize_help: str) -> None:
    """--device and --quantize: how `runs.load_run` loads the model of a verb that only runs it."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help=quantize_help)


def _add_force_flag(parser: argparse.ArgumentParser, help_text: str = "replace an existing output") -> None:
    parser.add_argument("--force", action="store_true", help=f"{help_text} (without it, an existing output is "
                                                             "never replaced or mixed into)")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like any other: one line, exit code 2 (`--help` shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ownllm: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ownllm", description="Build your own language model, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE or char tokenizer on text files")
    tok_train.add_argument("inputs", nargs="+", help="text files or folders")
    tok_train.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    tok_train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="for --kind bpe")
    tok_train.add_argument("--out", required=True, help="directory for the tokenizer files")
    _add_force_flag(tok_train)

    prep = sub.add_parser("prepare", help="tokenize text files into a training dataset (train.bin/val.bin)")
    prep.add_argument("inputs", nargs="+", help="text files or folders")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    prep.add_argument("--out", required=True)
    prep.add_argument("--val-fraction", type=float, default=0.05)
    _add_force_flag(prep, "replace an existing dataset in --out")

    pre = sub.add_parser("pretrain", help="train a model on text (next-token prediction), or --resume one")
    add_options(pre, PRETRAIN, RUN, TRAIN)

    gen = sub.add_parser("generate", help="sample text from a model")
    gen.add_argument("model", help=MODEL_HELP)
    gen.add_argument("--prompt", action="append", help="prompt (repeat for a batch)")
    add_sampling_flags(gen)
    cli_finetune.add_generate_flags(gen)
    _add_loading_flags(gen, "int8: dynamic int8 linear layers (CPU); bf16: bfloat16 weights")

    ev = sub.add_parser("evaluate", help="perplexity on a text file (--text), or benchmarks (--tasks)")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--text", help="held-out UTF-8 text file: loss, perplexity and bits per byte")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _add_loading_flags(ev, "measure the model with int8 or bf16 weights (the quality cost of `serve --quantize`)")
    cli_benchmarks.add_flags(ev)  # --tasks, --shots, --limit, ...

    imp = sub.add_parser("import", help="convert a Hugging Face model directory or a GGUF file (GPT-2, Llama, "
                                        "Qwen2) into a run")
    imp.add_argument("source", help="HF directory (config.json, *.safetensors, tokenizer files), a .gguf file, "
                                    "or hf:ORG/NAME[@REVISION]")
    imp.add_argument("--out", required=True, help="new run directory")
    _add_force_flag(imp)

    down = sub.add_parser("download", help="fetch a model's config, safetensors and tokenizer from the Hugging Face "
                                           "Hub (resumable; your HF cache and token)")
    down.add_argument("repo", metavar="ORG/NAME", help="model repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    down.add_argument("--revision", default=None, help="branch, tag or commit (default: the main branch)")
    down.add_argument("--out", default=None, help="directory for the files (default: the HF cache)")
    _add_force_flag(down, "replace an --out folder holding other files (an earlier download of the model resumes)")

    exp = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file for llama.cpp")
    exp.add_argument("model", help=MODEL_HELP)
    exp.add_argument("--to", choices=["hf", "gguf"], required=True)
    exp.add_argument("--out", required=True, help="directory (hf) or .gguf file (gguf)")
    exp.add_argument("--quant", choices=["f32", "f16", "q8_0", "q4_0"], default="f16",
                     help="GGUF weight type (default f16; 1-D tensors stay f32)")
    exp.add_argument("--pooling", metavar="{mean,last}", default=None,
                     help="GGUF only: write {arch}.pooling_type so llama.cpp's embeddings pool as `ownllm embed "
                          "--pooling` does (weighted-mean has no llama.cpp equivalent; default: no pooling key)")
    _add_force_flag(exp)

    cli_finetune.add_parsers(sub)  # finetune classify|instruct, classify, chat, merge-lora
    cli_serve.add_parser(sub)  # serve
    cli_retrieval.add_parsers(sub)  # embed, index, ask

    demo = sub.add_parser("demo", help="train a small model on Python's own docs (offline) and print samples")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--max-steps", type=int, default=None)
    demo.add_argument("--max-minutes", type=float, default=None)
    _add_force_flag(demo, "replace what is in --out even if the demo did not make it")
    return parser


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
    from ownllm.pretrain import pretrain

    from ownllm.distributed import is_main

    values = option_values(args, PRETRAIN, RUN, TRAIN)
    model_overrides = {name: values.pop(name, None) for name in MODEL_OVERRIDES}
    result = pretrain(model_overrides=model_overrides, **values)
    if not is_main():  # the other torchrun processes print nothing
        return
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    state = "stopped (resume with --resume)" if result.stopped_early else "finished"
    print(f"{state} at step {result.step}: train loss {train_loss}{val}; peak memory "
          f"{result.peak_memory_mb:,.0f} MiB; run saved in {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from ownllm.decoding import generate
    from ownllm.runs import load_run

    if args.instruction is not None:
        return cli_finetune.generate_instruction(args)
    if args.input is not None:
        raise OwnLLMError("--input: is the input of an --instruction; give --instruction too, or put it in --prompt")
    options = sampling_options(args)
    run = load_run(args.model, args.device, quantize=args.quantize)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{args.model}: is a classifier run; use `ownllm classify`")
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
        return cli_benchmarks.cmd_benchmarks(args)
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


def cmd_import(args: argparse.Namespace) -> None:
    from ownllm.interop.readers.gguf import import_gguf, is_gguf_path
    from ownllm.interop.readers.hf import import_hf
    from ownllm.interop.readers.hub import local_model_path

    source = local_model_path(args.source)
    if is_gguf_path(source):
        out = import_gguf(source, args.out, force=args.force)
    else:
        out = import_hf(source, args.out, force=args.force)
    print(f"imported {args.source} into {out}")


def cmd_download(args: argparse.Namespace) -> None:
    from ownllm.interop.readers.hub import download

    print(f"downloaded {args.repo} to {download(args.repo, revision=args.revision, out=args.out, force=args.force)}")


def cmd_export(args: argparse.Namespace) -> None:
    from ownllm.runs import load_run

    if args.to == "hf":
        from ownllm.interop.writers.hf import export_hf

        if args.pooling is not None:
            raise OwnLLMError("--pooling applies to --to gguf only (a Hugging Face directory records no pooling)")
        out = export_hf(load_run(args.model), args.out, force=args.force)
    else:
        from ownllm.interop.writers.gguf import check_gguf_pooling, export_gguf

        check_gguf_pooling(args.pooling)  # before the model loads
        out = export_gguf(load_run(args.model), args.out, quant=args.quant, force=args.force, pooling=args.pooling)
    print(f"exported {args.model} to {out} ({args.to}{'' if args.to == 'hf' else ', ' + args.quant})")


def cmd_demo(args: argparse.Namespace) -> None:
    from ownllm.demo import run_demo

    run_demo(Path(args.out), max_steps=args.max_steps, max_minutes=args.max_minutes, force=args.force)


COMMANDS = {"tokenizer": cmd_tokenizer, "prepare": cmd_prepare, "pretrain": cmd_pretrain,
            "generate": cmd_generate, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "import": cmd_import, "download": cmd_download, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", None) is not None:
            from ownllm.distributed import launch

            exit_code = launch(args.nproc, argv)
            if exit_code is not None:
                return exit_code
        if args.command in cli_serve.COMMANDS:
            return cli_serve.COMMANDS[args.command](args) or 0
        if args.command in cli_retrieval.COMMANDS:
            return cli_retrieval.COMMANDS[args.command](args) or 0
        if args.command in cli_finetune.COMMANDS:
            return cli_finetune.COMMANDS[args.command](args) or 0
        COMMANDS[args.command](args)
    except OwnLLMError as error:
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"ownllm: error{where}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ownllm: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # leave a torchrun job's process group cleanly
            from ownllm.distributed import shutdown

            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
