"""The `ownllm` command: one subcommand per stage, each a thin call into the Python API.

    ownllm tokenizer train corpus/*.txt --kind bpe --vocab-size 8000 --out tok/
    ownllm prepare corpus/ --tokenizer tok/ --out data/
    ownllm pretrain --data data/ --out runs/my-model --model mini --max-steps 2000
    ownllm generate runs/my-model --prompt "To be or" --max-new-tokens 200
    ownllm evaluate runs/my-model --text held-out.txt
    ownllm finetune classify|instruct ..., ownllm classify, ownllm chat, ownllm merge-lora   (see cli_finetune)
    ownllm import path/to/hf-model --out runs/base          # or pass the HF directory to any verb directly
    ownllm export runs/my-model --to hf --out exported/hf   # or --to gguf --out m.gguf --quant q8_0
    ownllm serve runs/my-model --port 8000 [--quantize int8]  # OpenAI-compatible API + chat page (cli_serve)
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

from ownllm import cli_serve
from ownllm.config import PRESETS
from ownllm.errors import OwnLLMError
from ownllm.quantize import QUANTIZE_MODES, load_quantized

MODEL_OVERRIDES = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "batch_size": (int, "sequences per micro-batch"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "min_lr": (float, "learning rate at the end of the cosine decay (default lr/10)"),
    "warmup_steps": (int, "linear warmup steps"),
    "max_steps": (int, "optimizer steps of the whole schedule"),
    "weight_decay": (float, "AdamW weight decay on weight matrices"),
    "beta1": (float, "AdamW beta1"),
    "beta2": (float, "AdamW beta2"),
    "grad_clip": (float, "clip the gradient norm to this (0 = off)"),
    "eval_interval": (int, "evaluate on validation data every N steps (0 = never)"),
    "eval_steps": (int, "validation batches per evaluation"),
    "log_interval": (int, "write a metrics.jsonl row every N steps"),
    "checkpoint_interval": (int, "also checkpoint every N steps (checkpoints are written at each evaluation)"),
    "stop_at": (int, "end this invocation after step K with a checkpoint; the schedule still follows --max-steps"),
    "max_minutes": (float, "stop with a checkpoint after this many minutes"),
    "seed": (int, "random seed (model init, batches, dropout)"),
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults suit the --model preset)")
    for name, (kind, help_text) in TRAIN_FLAGS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=help_text)
    group.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                       help="bf16 autocast where the hardware has it (auto), or force one")
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    scale = parser.add_argument_group("several processes (docs/scaling.md)")
    scale.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default=None,
                       help="under torchrun: DDP (auto) or FSDP; --batch-size stays the global batch")
    scale.add_argument("--nproc", type=int, default=None,
                       help="train on N processes of this machine: ownllm starts torchrun itself")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from ownllm import cli_finetune

    parser = argparse.ArgumentParser(prog="ownllm", description="Build your own language model, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE or char tokenizer on text files")
    tok_train.add_argument("inputs", nargs="+", help="text files or folders")
    tok_train.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    tok_train.add_argument("--vocab-size", type=int, default=8000)
    tok_train.add_argument("--out", required=True, help="directory for the tokenizer files")

    prep = sub.add_parser("prepare", help="tokenize text files into a training dataset (train.bin/val.bin)")
    prep.add_argument("inputs", nargs="+", help="text files or folders")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    prep.add_argument("--out", required=True)
    prep.add_argument("--val-fraction", type=float, default=0.05)

    pre = sub.add_parser("pretrain", help="train a model on text (next-token prediction), or --resume one")
    pre.add_argument("--data", nargs="+", help="a prepared dataset directory, or text files/folders")
    pre.add_argument("--out", required=True, help="run directory")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    pre.add_argument("--model", default="mini", help=f"preset: {', '.join(PRESETS)}")
    pre.add_argument("--tokenizer", default="bpe", help="for raw text: bpe, char, or a tokenizer path")
    pre.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size for raw text")
    pre.add_argument("--val-fraction", type=float, default=0.05)
    for name in MODEL_OVERRIDES:
        pre.add_argument(f"--{name.replace('_', '-')}", type=float if name == "dropout" else int, default=None)
    pre.add_argument("--device", default="auto")
    _add_train_flags(pre)

    gen = sub.add_parser("generate", help="sample text from a model")
    gen.add_argument("model", help="run directory or Hugging Face model directory")
    gen.add_argument("--prompt", action="append", help="prompt (repeat for a batch)")
    _add_sampling_flags(gen)
    cli_finetune.add_generate_flags(gen)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                     help="int8: dynamic int8 linear layers (CPU); bf16: bfloat16 weights")

    ev = sub.add_parser("evaluate", help="loss, perplexity and bits per byte on a text file")
    ev.add_argument("model", help="run directory or Hugging Face model directory")
    ev.add_argument("--text", required=True, help="held-out UTF-8 text file")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                    help="measure the model with int8 or bf16 weights (the quality cost of `serve --quantize`)")

    imp = sub.add_parser("import", help="convert a Hugging Face model directory (GPT-2, Llama, Qwen2) into a run")
    imp.add_argument("source", help="HF directory: config.json, *.safetensors, tokenizer files")
    imp.add_argument("--out", required=True, help="new run directory")

    exp = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file for llama.cpp")
    exp.add_argument("model", help="run directory or Hugging Face model directory")
    exp.add_argument("--to", choices=["hf", "gguf"], required=True)
    exp.add_argument("--out", required=True, help="directory (hf) or .gguf file (gguf)")
    exp.add_argument("--quant", choices=["f32", "f16", "q8_0", "q4_0"], default="f16",
                     help="GGUF weight type (default f16; 1-D tensors stay f32)")

    cli_finetune.add_parsers(sub)  # finetune classify|instruct, classify, chat, merge-lora
    cli_serve.add_parser(sub)  # serve

    demo = sub.add_parser("demo", help="train a small model on Python's own docs (offline) and print samples")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--max-steps", type=int, default=None)
    demo.add_argument("--max-minutes", type=float, default=None)
    return parser


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from ownllm.data.text import find_text_files
    from ownllm.tokenizer import train_bpe, train_char

    files = find_text_files(args.inputs)
    tok = train_char(files) if args.kind == "char" else train_bpe(files, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"{args.kind} tokenizer with {tok.vocab_size} tokens saved to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from ownllm.data.text import prepare_corpus
    from ownllm.tokenizer import load_tokenizer

    if not 0.0 <= args.val_fraction < 1.0:
        raise OwnLLMError("--val-fraction must be in [0, 1)")
    prepared = prepare_corpus(args.inputs, load_tokenizer(args.tokenizer), args.out, val_fraction=args.val_fraction)
    print(f"{len(prepared.train):,} train and {len(prepared.val):,} val tokens written to {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from ownllm.pretrain import pretrain

    train_values = {name: getattr(args, name) for name in TRAIN_FLAGS}
    train_values["precision"], train_values["compile"] = args.precision, args.compile
    train_values["strategy"] = args.strategy
    result = pretrain(out=args.out, data=args.data, preset=args.model, resume=args.resume, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, val_fraction=args.val_fraction, device=args.device,
                      model_overrides={name: getattr(args, name) for name in MODEL_OVERRIDES}, **train_values)
    if not _is_main_process():
        return
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    state = "stopped (resume with --resume)" if result.stopped_early else "finished"
    print(f"{state} at step {result.step}: train loss {train_loss}{val}; run saved in {args.out}")


def _is_main_process() -> bool:
    """False on the torchrun processes other than rank 0 (which print nothing)."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_generate(args: argparse.Namespace) -> None:
    from ownllm.decoding import SamplingOptions, generate

    if args.instruction is not None:
        from ownllm.cli_finetune import generate_instruction

        return generate_instruction(args)
    run = load_quantized(args.model, args.quantize, args.device)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{args.model}: is a classifier run; use `ownllm classify`")
    options = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop)
    prompts = args.prompt or [""]
    if len(prompts) == 1:  # stream to the terminal as tokens come
        sys.stdout.write(prompts[0])
        generate(run.model, run.tokenizer, prompts, options,
                 on_text=lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    for prompt, text in zip(prompts, generate(run.model, run.tokenizer, prompts, options)):
        print(f"{prompt}{text}\n{'-' * 40}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ownllm.evaluation import evaluate_text

    run = load_quantized(args.model, args.quantize, args.device)
    result = evaluate_text(run.model, run.tokenizer, args.text, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | bits per byte "
              f"{result.bits_per_byte:.4f} | {result.tokens:,} tokens, {result.bytes:,} bytes")


def cmd_import(args: argparse.Namespace) -> None:
    from ownllm.interop.hf import import_hf

    out = import_hf(args.source, args.out)
    print(f"imported {args.source} into {out}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.to == "hf":
        from ownllm.interop.hf import export_hf

        out = export_hf(args.model, args.out)
    else:
        from ownllm.interop.gguf import export_gguf

        out = export_gguf(args.model, args.out, quant=args.quant)
    print(f"exported {args.model} to {out} ({args.to}{'' if args.to == 'hf' else ', ' + args.quant})")


def cmd_demo(args: argparse.Namespace) -> None:
    from ownllm.demo import run_demo

    run_demo(Path(args.out), max_steps=args.max_steps, max_minutes=args.max_minutes)


COMMANDS = {"tokenizer": cmd_tokenizer, "prepare": cmd_prepare, "pretrain": cmd_pretrain,
            "generate": cmd_generate, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "import": cmd_import, "export": cmd_export}


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
        if args.command not in COMMANDS:
            from ownllm.cli_finetune import COMMANDS as FINETUNE_COMMANDS

            return FINETUNE_COMMANDS[args.command](args) or 0
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
