"""The quality cost of quantized inference: perplexity of one trained run with --quantize none / bf16 / int8.

    .venv/bin/python bench/quantize_quality.py --model runs/shk --text held_out.txt
    .venv/bin/python bench/quantize_quality.py --model runs/shk --text held_out.txt --max-tokens 20000 --json

Every mode evaluates the same tokens of `--text` (its first `--max-tokens`, in non-overlapping context windows) on
the CPU, with the weights `ownllm serve --quantize MODE` would use. The same numbers come one at a time from
`ownllm evaluate RUN --text FILE --quantize MODE`. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from ownllm.runs import load_run
    from ownllm.evaluation import encode_file, evaluate_ids
    from ownllm.quantize import quantize_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained run or Hugging Face model directory")
    parser.add_argument("--text", required=True, help="held-out text")
    parser.add_argument("--modes", default="none,bf16,int8")
    parser.add_argument("--max-tokens", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.model, device="cpu")
    ids = encode_file(run.tokenizer, args.text)[0][: args.max_tokens]
    results = []
    for mode in args.modes.split(","):
        model = quantize_model(copy.deepcopy(run.model), mode)
        start = time.perf_counter()
        with torch.inference_mode():
            total, count = evaluate_ids(model, ids)
        seconds = time.perf_counter() - start
        results.append({"mode": mode, "loss": round(total / count, 4), "perplexity": round(math.exp(total / count), 3),
                        "tokens": count, "eval_tokens_per_sec": round(count / seconds, 1)})
    reference = results[0]["perplexity"]
    for result in results:
        result["perplexity_vs_first"] = round(result["perplexity"] / reference, 4)
        if args.json:
            print(json.dumps({"model": args.model, **result}), flush=True)
        else:
            print(f"{result['mode']:>5}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
                  f"({100 * (result['perplexity_vs_first'] - 1):+.2f}% vs {results[0]['mode']}), "
                  f"{result['tokens']} tokens, {result['eval_tokens_per_sec']} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
