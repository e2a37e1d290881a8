"""Instruction following from scratch on this CPU: the book's data and split (LLMs-from-scratch ch07), scored by
ROUGE-L F1 and exact match against the reference outputs.

Split, in file order, no shuffle: items 0-934 train, 935-1044 test (110), 1045-1099 val (55). A small GPT is
pretrained from scratch on the training responses and instructions plus `alpaca_5000.json` rendered in the Alpaca
template (never on the test or val items), then fine-tuned on the training items (optionally plus alpaca_5000)
with `ownllm.finetune.finetune_instruct` (the code behind `ownllm finetune instruct`); the 110 test responses are
generated greedily and scored. For comparison the script scores the book's fine-tuned GPT-2-medium responses
(`rasbt/instruction-data-with-response.json`) with the same functions.

Run from the repository root (the data is read by path, never copied):
    .venv/bin/python bench/finetune_instruct.py
    .venv/bin/python bench/finetune_instruct.py --pretrain-steps 600 --epochs 2 --no-alpaca-finetune   # quick

A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ownllm.chat_templates import get_template
from ownllm.data.instructions import read_instructions
from ownllm.evaluation import exact_match, rouge_l_f1
from ownllm.finetune import finetune_instruct
from ownllm.pretrain import pretrain

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def book_reference(path: Path) -> dict:
    records = json.loads(path.read_text(encoding="utf-8"))
    return {"rouge_l_f1": sum(rouge_l_f1(r["model_response"], r["output"]) for r in records) / len(records),
            "exact_match": sum(exact_match(r["model_response"], r["output"]) for r in records) / len(records),
            "items": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "instructions" / "instruction-data.json"))
    parser.add_argument("--alpaca", default=str(DATA / "instructions" / "alpaca_5000.json"))
    parser.add_argument("--reference", default=str(DATA / "rasbt" / "instruction-data-with-response.json"))
    parser.add_argument("--out", default="runs/bench-instruct")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--no-alpaca-finetune", action="store_true", help="fine-tune on the 935 book items only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = json.loads(Path(args.data).read_text(encoding="utf-8"))
    train, test, val = items[:935], items[935:1045], items[1045:]
    alpaca = json.loads(Path(args.alpaca).read_text(encoding="utf-8"))
    for name, part in (("train", train + ([] if args.no_alpaca_finetune else alpaca)), ("test", test), ("val", val)):
        (out / f"{name}.json").write_text(json.dumps(part), encoding="utf-8")
    template = get_template("alpaca")
    corpus = [template.render(c) for c in read_instructions(out / "train.json")]
    if args.no_alpaca_finetune:
        corpus += [template.render(c) for c in read_instructions(args.alpaca)]
    (out / "corpus.txt").write_text("\n\n".join(corpus), encoding="utf-8")

    start = time.perf_counter()
    if not (out / "base" / "config.json").exists():
        pretrain(out=out / "base", data=out / "corpus.txt", preset="mini", tokenizer="bpe", vocab_size=4000,
                 model_overrides=dict(n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd,
                                      block_size=256),
                 max_steps=args.pretrain_steps, batch_size=16, lr=1e-3, warmup_steps=100, eval_interval=0,
                 show_progress=args.progress)
    pretrain_s = time.perf_counter() - start
    start = time.perf_counter()
    result = finetune_instruct(out=out / "assistant", model=out / "base", data=out / "train.json",
                               val_file=out / "val.json", test_file=out / "test.json", template="alpaca",
                               epochs=args.epochs, lr=args.lr, batch_size=8, max_new_tokens=128,
                               show_progress=args.progress, eval_interval=10_000)
    finetune_s = time.perf_counter() - start
    print(json.dumps({"ownllm": {"rouge_l_f1": result.rouge_l_f1, "exact_match": result.exact_match,
                                 "test_loss": result.test_loss, "val_loss": result.val_loss,
                                 "steps": result.train.step, "pretrain_s": round(pretrain_s, 1),
                                 "finetune_s": round(finetune_s, 1)},
                      "book_gpt2_medium": book_reference(Path(args.reference))}))


if __name__ == "__main__":
    main()
