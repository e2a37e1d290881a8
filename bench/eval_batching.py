"""Benchmark scoring speed: one item at a time vs batched (packed, padded), same model, same items, same process.

    .venv/bin/python bench/eval_batching.py --model runs/smol --task hellaswag --limit 64 --threads 2
    .venv/bin/python bench/eval_batching.py --model runs/smol --task mmlu_high_school_psychology --limit 40
    .venv/bin/python bench/eval_batching.py --model SmolLM2-135M-Instruct.Q4_1.gguf --modes packed,packed@bf16

A mode may end in `@bf16`: the same layout under bf16 autocast (`ownllm evaluate --precision bf16`, fast where the
CPU has AMX); the table then also gives the share of items whose best-scoring choice is the first mode's.

Prints items/s of each layout (`ownllm evaluate --batching none|packed|padded`; `--modes packed:8192` sets a batch
budget in tokens), the largest difference of any per-choice log-likelihood from the first mode's scores, and the
projected time of the task's full set: at the measured wall-clock rate, and from the CPU time per item spread over
two cores (what a quiet 2-core machine would take if both threads were busy all along). The modes run in turns
(none, packed, padded, then again) so a machine whose load changes treats them alike; the faster of the turns
counts. `--model` is anything `ownllm.load` reads (a run, a Hugging Face directory, a GGUF file: dequantized to
float32 unless `--quantize` says otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ownllm.benchmarks import score_questions
from ownllm.benchmarks.suite import load_items
from ownllm.device import pick_device
from ownllm.runs import load_run

MODES = ("none", "packed", "padded")


def parse_modes(value: str) -> list[tuple[str, int, str]]:
    """"none,packed,packed:8192,padded@bf16" -> [(mode, batch tokens, precision), ...]"""
    out = []
    for part in value.split(","):
        part, _, precision = part.partition("@")
        mode, _, tokens = part.partition(":")
        out.append((mode, int(tokens or 4096), precision or "fp32"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--full", type=int, default=10042, help="items of the full set, for the projection")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantize", default="none", help="how the model is loaded (ownllm --quantize)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="none,packed,padded",
                        help="layouts to time, each optionally with its batch budget in tokens: packed:8192")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.model, device=pick_device(args.device), quantize=args.quantize)
    questions = load_items(args.task, limit=args.limit, data_dir=args.data_dir)
    modes = parse_modes(args.modes)
    best = {mode: float("inf") for mode in modes}
    cpu = {mode: float("inf") for mode in modes}
    scores = {}
    for _ in range(args.rounds):
        for mode in modes:
            start, cpu_start = time.perf_counter(), time.process_time()
            scores[mode] = score_questions(run.model, run.tokenizer, questions, batching=mode[0],
                                           batch_tokens=mode[1], precision=mode[2])
            best[mode] = min(best[mode], time.perf_counter() - start)
            cpu[mode] = min(cpu[mode], time.process_time() - cpu_start)
    reference = torch.tensor([s for item in scores[modes[0]] for s in item])
    print(f"{args.task}, first {len(questions)} items, {torch.get_num_threads()} threads, {args.device}")
    print(f"| batching (batch tokens) | precision | items/s | full set (projected) | vs {modes[0][0]} | "
          "CPU s per item | full set at 2 CPU s per CPU s | largest difference | same choice |")
    print("|---|---|---|---|---|---|---|---|---|")
    choices = {mode: [max(range(len(item)), key=item.__getitem__) for item in scores[mode]] for mode in modes}
    for mode in modes:
        rate = len(questions) / best[mode]
        difference = float((torch.tensor([s for item in scores[mode] for s in item]) - reference).abs().max())
        same = sum(a == b for a, b in zip(choices[mode], choices[modes[0]])) / len(questions)
        per_item = cpu[mode] / len(questions)
        print(f"| {mode[0]} ({mode[1]}) | {mode[2]} | {rate:.2f} | {args.full / rate / 60:.1f} min | "
              f"{best[modes[0]] / best[mode]:.2f}x | {per_item:.2f} | {args.full * per_item / 2 / 60:.1f} min | "
              f"{difference:.2e} | {same:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
