"""The faithfulness of quantized inference: each --quantize mode against float32 on the same weights.

    .venv/bin/python bench/quantize_quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --text /work/shared/data/gutenberg/pride_and_prejudice_pg1342.txt --threads 2
    .venv/bin/python bench/quantize_quality.py --model runs/shk --text held_out.txt --modes none,int8,int4 --json

The reference is the model read in float32 (`--quantize none`). For every mode, on the same tokens of `--text` (its
first `--max-tokens`, from `--skip` characters on, in non-overlapping windows of `--window` tokens):
- teacher-forced top-1 agreement: the share of positions where the mode's most likely next token is float32's;
- perplexity (and its change against float32);
- greedy chat answers: `--new-tokens` greedy tokens for each of a few chat prompts, rendered in the model's chat
  format; the share of float32's answer that the mode's answer repeats from the start (common prefix / length), and
  how many of the answers are identical.
Modes: none, bf16, int8, int4 (ownllm.quantize on the float32 weights), `int4-fp32-head` / `int8-fp32-head` (the LM
head left in float32: what quantizing the head costs), and `gguf` (a .gguf `--model` as `ownllm generate FILE.gguf`
loads it by default: its Q8_0/Q4_x blocks kept, no second rounding). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys

import torch
import torch.nn.functional as F

CHAT_PROMPTS = ["Explain photosynthesis to a child.", "What is the capital of France, and why is it famous?",
                "Write a short poem about the sea.", "Give me three tips for learning to program."]


def model_for(mode: str, reference, path: str):
    from ownllm.quantize import quantize_model
    from ownllm.runs import load_run

    if mode == "gguf":
        return load_run(path).model
    name, _, rest = mode.partition("-")
    return quantize_model(copy.deepcopy(reference), name, head=rest != "fp32-head") if name != "none" else reference


def teacher_forced(model, ids: list[int], window: int) -> tuple[torch.Tensor, float, int]:
    """Top-1 predictions of every position, total NLL and the count, window by window."""
    predictions, total, count = [], 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start: start + window + 1]])
            logits = model(chunk[:, :-1])[0].float()
            predictions.append(logits.argmax(-1))
            total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return torch.cat(predictions), total, count


def chat_answers(model, run, new_tokens: int) -> list[list[int]]:
    from ownllm.chat import chat_format_for
    from ownllm.chat_templates import Message
    from ownllm.decoding import SamplingOptions, generate_ids

    chat_format = chat_format_for(run.run_config, run.tokenizer)
    options = SamplingOptions(max_new_tokens=new_tokens, temperature=0)
    return [generate_ids(model, [chat_format.encode([Message("user", prompt)])], options,
                         eot_id=run.tokenizer.eot_id)[0] for prompt in CHAT_PROMPTS]


def prefix_share(answer: list[int], reference: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(answer, reference)) if a != b), min(len(answer), len(reference)))
    return same / max(1, len(reference))


def main(argv: list[str] | None = None) -> int:
    from ownllm.runs import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run, Hugging Face directory or .gguf file")
    parser.add_argument("--text", required=True, help="held-out text")
    parser.add_argument("--modes", default="none,bf16,int8,int4,int4-fp32-head,gguf")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--skip", type=int, default=20_000, help="characters of --text to skip (a book's front matter)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.model, device="cpu", quantize="none")
    with open(args.text, encoding="utf-8") as handle:
        ids = run.tokenizer.encode(handle.read()[args.skip: args.skip + 12 * args.max_tokens])[: args.max_tokens]
    modes = [m for m in args.modes.split(",") if m != "gguf" or args.model.endswith(".gguf")]
    reference = None
    for mode in modes:
        model = model_for(mode, run.model, args.model)
        top1, total, count = teacher_forced(model, ids, args.window)
        answers = chat_answers(model, run, args.new_tokens)
        if reference is None:
            reference = {"top1": top1, "perplexity": math.exp(total / count), "answers": answers}
        shares = [prefix_share(a, r) for a, r in zip(answers, reference["answers"])]
        result = {"mode": mode, "tokens": count, "top1_agreement": round((top1 == reference["top1"]).float().mean()
                                                                         .item(), 4),
                  "perplexity": round(math.exp(total / count), 3),
                  "perplexity_change": round(math.exp(total / count) / reference["perplexity"] - 1, 4),
                  "chat_prefix_share": round(sum(shares) / len(shares), 3),
                  "chat_identical": f"{sum(a == r for a, r in zip(answers, reference['answers']))}/{len(answers)}"}
        if args.json:
            print(json.dumps({"model": args.model, **result}), flush=True)
        else:
            print(f"{mode:>15}: top-1 agreement {100 * result['top1_agreement']:.1f}% of {count} tokens, perplexity "
                  f"{result['perplexity']:.3f} ({100 * result['perplexity_change']:+.2f}%), greedy chat answers: "
                  f"{100 * result['chat_prefix_share']:.0f}% common prefix, {result['chat_identical']} identical",
                  flush=True)
        if mode == "int8" and not args.json:
            print(f"{'':>15}  first int8 answer: {run.tokenizer.decode(answers[0])!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
