"""Greedy decode speed, batch 1: ownllm vs transformers `generate` vs llama.cpp (llama-cpp-python), same weights.

    .venv/bin/python bench/decode_speed.py                       # gpt2 shape (124M), fp32, 256 new tokens
    .venv/bin/python bench/decode_speed.py --rounds 3 --threads 1
    .venv/bin/python bench/decode_speed.py --preset mini --only ownllm,transformers --json
    .venv/bin/python bench/decode_speed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --rounds 2
    .venv/bin/python bench/decode_speed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --new-tokens 128 \
        --only ownllm,ownllm-int8,ownllm-int4,ownllm-gguf,ownllm-gguf+compile,matvec-chain

With `--model` (a run, an HF directory or a .gguf file), the engines decode that model instead of the random preset;
`llama.cpp-file` is llama.cpp on the given .gguf file itself (e.g. its Q4_1 weights), the other llama.cpp engines on
f32 / q8_0 exports of the weights as ownllm loaded them.

The model is the `gpt2` preset with random weights (no download), written once as an HF directory (for transformers)
and as f32 / q8_0 GGUF files (for llama.cpp, when `llama_cpp` is importable). Each engine decodes `--new-tokens`
tokens greedily after a 16-token prompt, with no stop token; the time counts the prompt too (one forward pass).
`ownllm-int8`, `ownllm-int4` and `ownllm-bf16` are ownllm on the weights of `ownllm serve --quantize int8|int4|bf16`
(ownllm.quantize), `ownllm-gguf` on a .gguf `--model` loaded as `ownllm generate FILE.gguf` does (its Q8_0/Q4_x
blocks kept quantized); their greedy tokens may differ from fp32's where two logits are close. Any ownllm engine
followed by `+compile` (`ownllm-int4+compile`) decodes with the compiled step of ownllm.compiled_step; its compile
time is printed and falls in the warm-up run. `matvec-chain` is the floor for fp32 PyTorch:
only the model's weight matrix-vector products (every layer's four matrices and the head) for each token, no
attention, norms or sampling.

The engines are timed in turns, one run each per round, after a warm-up run each, so that load from other work on a
shared machine falls on all of them alike; the report gives the median and the best round. `--threads` sets every
engine's thread count (default: all cores). Results for this machine type: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ownllm.runs import LoadedRun, load_run
from ownllm.config import model_config_from_preset
from ownllm.decoding import SamplingOptions, generate_ids
from ownllm.model import GPT
from ownllm.quantize import quantize_model
from ownllm.tokenizer import train_bpe

PROMPT_LENGTH = 16
ENGINES = ("ownllm", "ownllm-int8", "ownllm-int4", "ownllm-bf16", "ownllm-gguf", "transformers", "llama.cpp-f32",
           "llama.cpp-q8_0", "llama.cpp-file", "matvec-chain")
COMPILED = "+compile"  # after an ownllm engine: its decode step compiled (ownllm.compiled_step)
Decode = Callable[[int], list[int]]


def build_run(preset: str, folder: Path) -> LoadedRun:
    """The preset's shape with random weights, and a small BPE tokenizer (the GGUF and HF exports need one)."""
    from pydoc_data.topics import topics

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(topics[k] for k in sorted(topics))[:50_000], encoding="utf-8")
    tokenizer = train_bpe([corpus], vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    model = GPT(model_config_from_preset(preset)).eval()
    return LoadedRun(path=folder / preset, model=model, tokenizer=tokenizer, config=model.config, run_config={})


def ownllm_decoder(run: LoadedRun, prompt: list[int], quantize: str = "none", compiled: bool = False,
                   model_file: str | None = None) -> Decode:
    """ownllm's decoding, on the model as it is or on a copy quantized like `ownllm serve --quantize`; `gguf`: the
    .gguf file loaded as `ownllm generate FILE.gguf` loads it (its quantized blocks kept); `compiled`: with the
    compiled decode step (its compile time is printed, and paid in the warm-up run)."""
    if quantize == "gguf":
        if not model_file or not model_file.endswith(".gguf"):
            raise SystemExit("ownllm-gguf needs --model FILE.gguf")
        model = load_run(model_file).model
    else:
        model = quantize_model(copy.deepcopy(run.model), quantize) if quantize != "none" else run.model
    if compiled:
        from ownllm.compiled_step import use_compiled_step

        model = copy.copy(model)  # its own decode_step attribute; the weights are shared
        use_compiled_step(model, on_compiled=lambda s: print(f"{quantize}{COMPILED}: compiled in {s:.1f} s",
                                                             file=sys.stderr, flush=True))

    def decode(n: int) -> list[int]:
        options = SamplingOptions(max_new_tokens=n, temperature=0, stop_at_eot=False)
        return generate_ids(model, [prompt], options)[0]

    return decode


def transformers_decoder(run: LoadedRun, prompt: list[int], folder: Path) -> Decode:
    import transformers

    from ownllm.interop.writers.hf import export_hf

    model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, folder / "hf")).eval()
    ids = torch.tensor([prompt])

    def decode(n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, use_cache=True)
        return out[0, len(prompt):].tolist()

    return decode


def llama_cpp_decoder(run: LoadedRun, prompt: list[int], folder: Path, quant: str, threads: int,
                      max_tokens: int, model_file: Path | None = None) -> Decode:
    """llama.cpp on an export of `run` in `quant`, or (quant "file") on `model_file` as it is."""
    import llama_cpp
    import numpy as np

    from ownllm.interop.writers.gguf import export_gguf

    if quant == "file":
        if model_file is None or model_file.suffix != ".gguf":
            raise SystemExit("llama.cpp-file needs --model FILE.gguf")
        path = model_file
    else:
        path = export_gguf(run, folder / f"model-{quant}.gguf", quant=quant)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_LENGTH + max_tokens + 8, n_batch=PROMPT_LENGTH,
                          n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)

    def decode(n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        tokens: list[int] = []
        for _ in range(n):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        return tokens

    return decode


def matvec_chain(run: LoadedRun) -> Decode:
    """Only the weight products of a decode step: the floor any fp32 PyTorch implementation pays per token."""
    weights = [m.weight for m in run.model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(run.model.lm_head.weight)
    inputs = {width: torch.randn(1, width) for width in {w.shape[1] for w in weights}}

    def decode(n: int) -> list[int]:
        with torch.inference_mode():
            for _ in range(n):
                for weight in weights:
                    F.linear(inputs[weight.shape[1]], weight)
        return []

    return decode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--model", default=None, help="a real model (run, HF directory or .gguf) instead of --preset")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=1, help="timed runs per engine, taken in turns")
    parser.add_argument("--only", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object per engine")
    args = parser.parse_args(argv)
    engines = [e for e in args.only.split(",") if e]
    unknown = sorted({e.removesuffix(COMPILED) for e in engines} - set(ENGINES)
                     | {e for e in engines if e.endswith(COMPILED) and not e.startswith("ownllm")})
    if unknown:
        parser.error(f"unknown engine(s) {unknown}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = load_run(args.model, quantize="none") if args.model else build_run(args.preset, folder)
        run.model.eval()
        prompt = torch.randint(0, run.config.vocab_size, (PROMPT_LENGTH,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        decoders: dict[str, Decode] = {}
        for engine in engines:
            if engine.startswith("ownllm"):
                name = engine.removesuffix(COMPILED)
                decoders[engine] = ownllm_decoder(run, prompt, name.split("-")[1] if "-" in name else "none",
                                                  engine.endswith(COMPILED), args.model)
            elif engine == "transformers":
                decoders[engine] = transformers_decoder(run, prompt, folder)
            elif engine == "matvec-chain":
                decoders[engine] = matvec_chain(run)
            else:
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    print(f"{engine}: skipped (llama-cpp-python is not installed)", file=sys.stderr)
                    continue
                decoders[engine] = llama_cpp_decoder(run, prompt, folder, engine.split("-")[1], args.threads,
                                                     args.new_tokens, Path(args.model) if args.model else None)
        for decode in decoders.values():
            decode(8)  # warm-up
        seconds: dict[str, list[float]] = {engine: [] for engine in decoders}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for engine, decode in decoders.items():
                start = time.perf_counter()
                tokens[engine] = decode(args.new_tokens)
                seconds[engine].append(time.perf_counter() - start)
    reference = tokens.get("ownllm")
    for engine, times in seconds.items():
        median, best = statistics.median(times), min(times)
        same = (f"{sum(a == b for a, b in zip(tokens[engine], reference))}/{args.new_tokens}"
                if reference is not None and tokens[engine] else "-")
        result = {"engine": engine, "model": args.model or args.preset, "new_tokens": args.new_tokens, "threads": args.threads,
                  "rounds": args.rounds, "median_tokens_per_sec": round(args.new_tokens / median, 1),
                  "best_tokens_per_sec": round(args.new_tokens / best, 1),
                  "median_ms_per_token": round(1000 * median / args.new_tokens, 1),
                  "greedy_tokens_equal_to_ownllm": same}
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{engine:>16}: median {result['median_tokens_per_sec']:6.1f} tok/s "
                  f"({result['median_ms_per_token']} ms/token), best {result['best_tokens_per_sec']:6.1f} tok/s; "
                  f"greedy tokens equal to ownllm's: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
