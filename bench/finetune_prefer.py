"""Preference tuning (DPO) on the book's polite/impolite pairs (LLMs-from-scratch ch07 bonus), SmolLM2-135M-Instruct:
validation preference accuracy, reward margin and the chosen answers' NLL per token before and after, and ROUGE-L F1
on the instruction test set before and after (preference tuning must not wreck instruction following).

Split, in file order, no shuffle (the book's 85/10/5): items 0-934 train, 935-1044 test (110), 1045-1099 val (55).
The pairs are tuned with `ownllm.finetune.finetune_prefer` (the code behind `ownllm finetune prefer`), in the model's
ChatML template. "Before" is the starting model: its DPO rewards are 0 by definition (it is the reference), so the
script also reports the log-prob accuracy (the share of pairs whose chosen answer the model finds more likely than the
rejected one, summed over answer tokens) before and after. The book reports a validation reward margin of 0.006 ->
1.07 after one epoch on GPT-2-medium (355M), full fine-tuning.

The model: a Hugging Face directory of SmolLM2-135M-Instruct (e.g. the Q4_1 GGUF dequantized and saved with
transformers' save_pretrained), read by path. Run from the repository root:
    .venv/bin/python bench/finetune_prefer.py --model /path/to/smollm2-135m-instruct-hf
    .venv/bin/python bench/finetune_prefer.py --train-pairs 200 --rouge-items 40     # a quicker subset
    .venv/bin/python bench/finetune_prefer.py --lr 3e-4 --sft-weight 1.0     # DPO + the chosen answers' NLL (RPO)

A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ownllm.chat import ChatFormat, answer_all
from ownllm.chat_templates import Message, get_template
from ownllm.data.preferences import PreferenceBatches, read_preferences
from ownllm.decoding import SamplingOptions
from ownllm.evaluation import rouge_l_f1
from ownllm.finetune import finetune_prefer
from ownllm.finetune.dpo import counts_of_pairs, dpo_losses, logps_of_pairs, pair_stats
from ownllm.runs import load_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instructions"


def split_book(path: Path, out: Path, train_pairs: int | None) -> dict[str, Path]:
    items = json.loads(path.read_text(encoding="utf-8"))
    parts = {"train": items[:935][:train_pairs], "test": items[935:1045], "val": items[1045:]}
    for name in ("train", "val"):  # the book's file has a few pairs whose answers are equal: nothing to prefer
        kept = [r for r in parts[name] if r["chosen"].strip() != r["rejected"].strip()]
        if len(kept) < len(parts[name]):
            print(f"{name}: dropped {len(parts[name]) - len(kept)} pairs whose chosen and rejected are equal",
                  file=sys.stderr)
        parts[name] = kept
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (out / f"{name}.json").write_text(json.dumps(part), encoding="utf-8")
    return {name: out / f"{name}.json" for name in parts}


def pair_metrics(run, pairs_file: Path, template, reference: torch.Tensor | None, beta: float,
                 sft_weight: float) -> tuple[dict, torch.Tensor]:
    """DPO metrics against `reference` (None: the model is its own reference) and log-prob accuracy; the log-probs."""
    batches = PreferenceBatches(read_preferences(pairs_file), template, run.tokenizer, run.config.block_size, 8)
    device = next(run.model.parameters()).device
    rows = batches.eval_batches()
    logps = logps_of_pairs(run.model, rows, len(batches), device, "fp32")
    counts = counts_of_pairs(rows, len(batches))
    losses, chosen, rejected = dpo_losses(logps, logps if reference is None else reference, counts, beta,
                                          sft_weight=sft_weight)
    stats = pair_stats(losses, chosen, rejected, logps, counts)
    stats["logp_accuracy"] = (logps[:, 0] > logps[:, 1]).float().mean().item()
    return stats, logps.cpu()


def rouge(run, template, items: list[dict], max_new_tokens: int) -> float:
    prompts = [[Message("user", r["instruction"], r.get("input") or "")] for r in items]
    answers = answer_all(run.model, ChatFormat(run.tokenizer, template), prompts,
                         SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0))
    return sum(rouge_l_f1(a, r["output"]) for a, r in zip(answers, items)) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/scratch/smol-hf-dpo", help="SmolLM2-135M-Instruct HF directory")
    parser.add_argument("--data", default=str(DATA / "instruction-data-with-preference.json"))
    parser.add_argument("--instructions", default=str(DATA / "instruction-data.json"),
                        help="the instruction data; its items 935-1044 are the ROUGE-L test set")
    parser.add_argument("--out", default="runs/bench-prefer")
    parser.add_argument("--train-pairs", type=int, default=None, help="the first N training pairs (default: all 935)")
    parser.add_argument("--rouge-items", type=int, default=110, help="the first N test instructions for ROUGE-L")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=0.0,
                        help="weight of the chosen answers' NLL in the loss (RPO; trl's rpo_alpha)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training and scoring)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="training precision")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    files = split_book(Path(args.data), out / "data", args.train_pairs)
    test_items = json.loads(Path(args.instructions).read_text(encoding="utf-8"))[935:1045][:args.rouge_items]
    template = get_template("chatml")

    start = time.perf_counter()
    base = load_run(args.model, device=args.device)
    before, reference = pair_metrics(base, files["val"], template, None, args.beta, args.sft_weight)
    rouge_before = rouge(base, template, test_items, args.max_new_tokens)
    del base
    before_s = time.perf_counter() - start

    start = time.perf_counter()
    lr = {"lr": args.lr} if args.lr else {}
    result = finetune_prefer(out=out / "run", model=args.model, data=files["train"], val_file=files["val"],
                             val_fraction=0.0, template="chatml", beta=args.beta, sft_weight=args.sft_weight,
                             lora_rank=args.lora_rank, epochs=args.epochs, batch_size=args.batch_size,
                             show_progress=args.progress,
                             eval_interval=0, device=args.device, precision=args.precision, **lr)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    tuned = load_run(out / "run", device=args.device)
    after, _ = pair_metrics(tuned, files["val"], template, reference, args.beta, args.sft_weight)
    rouge_after = rouge(tuned, template, test_items, args.max_new_tokens)
    after_s = time.perf_counter() - start
    print(json.dumps({"val_before": before, "val_after": after, "val_after_in_run": result.val,
                      "rouge_l_f1": {"before": rouge_before, "after": rouge_after, "items": len(test_items)},
                      "train_pairs": len(json.loads(files["train"].read_text())), "steps": result.train.step,
                      "lora_rank": args.lora_rank, "beta": args.beta, "sft_weight": args.sft_weight, "seconds": {
                          "before": round(before_s, 1), "train": round(train_s, 1), "after": round(after_s, 1)},
                      "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
