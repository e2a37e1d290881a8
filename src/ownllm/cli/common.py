"""The flags many verbs share, each declared here once: --device, --quantize, --force, --out, --json and the
sampling flags of the verbs that generate text (generate, chat, ask)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ownllm.errors import OwnLLMError

MODEL_HELP = "run directory, Hugging Face model directory, .gguf file or hf:ORG/NAME[@REVISION]"
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (CUDA when present)"


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str = DEVICE_HELP) -> None:
    parser.add_argument("--device", default="auto", help=help_text)


def add_force_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                   help_text: str = "replace an existing output") -> None:
    parser.add_argument("--force", action="store_true",
                        help=f"{help_text} (without it, an existing output is never replaced or mixed into)")


def add_out_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str | None = None,
                 **settings: Any) -> None:
    """--out, required unless `settings` give a default."""
    parser.add_argument("--out", help=help_text, **{"required": "default" not in settings, **settings})


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


QUANTIZE_HELP = ("weights for inference (ownllm.quantize): int8 / int4 = weight-only int8 / 4-bit linear layers "
                 "(CPU); bf16; none = float32; auto (default) = none, except that a GGUF file's quantized blocks "
                 "stay quantized")


def add_loading_flags(parser: argparse.ArgumentParser, quantize_help: str = QUANTIZE_HELP) -> None:
    """--device and --quantize: how `runs.load_run` loads the model of a verb that only runs it."""
    from ownllm.quantize import QUANTIZE_MODES

    add_device_flag(parser)
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="auto", help=quantize_help)


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="decode with a torch.compile'd step (ownllm.compiled_step): ~1.7x the tokens/s of a quantized "
                             "model on a CPU; the first answer waits for the compilation (a minute the first "
                             "time, seconds later: inductor keeps it on disk)")


def compile_if_asked(args: argparse.Namespace, model: Any) -> None:
    """`--compile`: the model decodes with the compiled step; its compile time is printed once, on stderr."""
    if not getattr(args, "compile", False):
        return
    from ownllm.compiled_step import use_compiled_step

    use_compiled_step(model, on_compiled=lambda seconds: print(
        f"ownllm: compiled the decode step in {seconds:.1f} s (once per process and batch kind)", file=sys.stderr,
        flush=True))


SAMPLING_DEFAULTS = {"max_tokens": 200, "temperature": 0.8}  # unless a flag, or a run's chat default, says otherwise


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    chat = "; in chat, generate --instruction and ask: the run's chat default when it has one"
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"(default 200{chat})")
    parser.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default 0.8{chat})")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")


def sampling_options(args: argparse.Namespace, chat_defaults: dict[str, Any] | None = None) -> Any:
    """The `SamplingOptions` of the flags `add_sampling_flags` added (at least one new token); a flag not given
    takes the run's chat default (`ownllm.chat.chat_settings`) where there is one, else SAMPLING_DEFAULTS."""
    from ownllm.decoding import SamplingOptions

    settings = {**SAMPLING_DEFAULTS, **(chat_defaults or {})}
    given = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p}
    chosen = {name: settings.get(name) if value is None else value for name, value in given.items()}
    if chosen["max_tokens"] < 1:
        raise OwnLLMError(f"--max-new-tokens {chosen['max_tokens']}: generates nothing; give at least 1")
    if chosen["temperature"] < 0:
        raise OwnLLMError(f"--temperature must be 0 (greedy) or more, not {chosen['temperature']:g}")
    if chosen["top_k"] is not None and chosen["top_k"] < 1:
        raise OwnLLMError(f"--top-k must be at least 1, not {chosen['top_k']}")
    if chosen["top_p"] is not None and not 0 < chosen["top_p"] <= 1:
        raise OwnLLMError(f"--top-p must be in (0, 1], not {chosen['top_p']:g}")
    return SamplingOptions(max_new_tokens=chosen["max_tokens"], temperature=chosen["temperature"],
                           top_k=chosen["top_k"], top_p=chosen["top_p"], seed=args.seed, stop=args.stop)
