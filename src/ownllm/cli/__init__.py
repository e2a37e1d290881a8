"""The `ownllm` command: one subcommand per stage, each a thin call into the Python API.

    ownllm tokenizer train corpus/*.txt --kind bpe --vocab-size 8000 --out tok/
    ownllm prepare corpus/ --tokenizer tok/ --out data/
    ownllm pretrain --data data/ --out runs/my-model --model mini --max-steps 2000
    ownllm finetune classify|instruct|prefer ..., ownllm merge-lora, ownllm demo      (train.py)
    ownllm generate runs/my-model --prompt "To be or" --max-new-tokens 200
    ownllm evaluate runs/my-model --text held-out.txt
    ownllm evaluate runs/my-model --tasks arc_easy,hellaswag --limit 500
    ownllm classify RUN --text ..., ownllm chat RUN                                    (use.py)
    ownllm import path/to/hf-model --out runs/base          # or pass the HF directory to any verb directly
    ownllm import model.gguf --out runs/base                # a llama.cpp GGUF file, dequantized to float32
    ownllm download ORG/NAME --out models/name              # from the Hugging Face Hub; hf:ORG/NAME works as a model
    ownllm export runs/my-model --to hf --out exported/hf   # or --to gguf --out m.gguf --quant q8_0   (interop.py)
    ownllm serve runs/my-model --port 8000 [--quantize int8]  # OpenAI-compatible API + chat page      (serve.py)
    ownllm embed RUN --input texts.txt --output vectors.jsonl; ownllm index DOCS --model RUN --out docs.index;
    ownllm ask RUN --index docs.index "question"                # embeddings and retrieval             (retrieval.py)

Each module of this package registers one group of verbs (`add_parsers`) and the functions that run them
(`COMMANDS`); the flags several verbs share are declared once, in `common`. A user mistake (bad file, unknown
preset, corrupt checkpoint) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ownllm.cli import interop, retrieval, serve, train, use
from ownllm.errors import OwnLLMError

GROUPS = (train, use, interop, serve, retrieval)
COMMANDS = {name: command for group in GROUPS for name, command in group.COMMANDS.items()}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like any other: one line, exit code 2 (`--help` shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ownllm: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ownllm", description="Build your own language model, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The parsed arguments. A verb whose last positional is optional names it (`set_defaults(late_positional=)`):
    argparse gives it nothing when options come before it (`ask RUN --index F "question"`), so the one word left
    over fills it."""
    args, extras = parser.parse_known_args(argv)
    late = getattr(args, "late_positional", None)
    if late and extras and getattr(args, late) is None and len(extras) == 1 and not extras[0].startswith("-"):
        setattr(args, late, extras.pop())
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(build_parser(), argv)
    try:
        if getattr(args, "nproc", None) is not None:
            from ownllm.distributed import launch

            exit_code = launch(args.nproc, argv)
            if exit_code is not None:
                return exit_code
        return COMMANDS[args.command](args) or 0
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
