"""SMS spam classification from scratch on this CPU, with the book's protocol (LLMs-from-scratch ch06).

Per seed: undersample ham to the 747 spam (747/747), shuffle, split 70/10/20 (train/val/test); pretrain a small
GPT from scratch on the training split's texts plus the ham left out by the undersampling (never on val or test
texts: any text equal to a val/test text is dropped from the corpus, the collection has duplicates); fine-tune
all layers with the last-real-token head (`ownllm.finetune.finetune_classify`, the code behind
`ownllm finetune classify`); report test accuracy and wall times. References: the book's GPT-2 124M classifier
95.67%, its best variant 98.67% (GPT-2 XL, all layers); TF-IDF + logistic regression about 96%.

Run from the repository root (the data is read by path, never copied):
    .venv/bin/python bench/finetune_spam.py --seeds 1 2 3
    .venv/bin/python bench/finetune_spam.py --seeds 1 --pretrain-steps 600 --finetune-epochs 4   # a quick run

The split files, corpus and runs go to --out (default runs/bench-spam). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ownllm.data.labelled import read_labelled, split_examples, undersample
from ownllm.finetune import finetune_classify
from ownllm.pretrain import pretrain

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms_spam" / "SMSSpamCollection"


def write_split(path: Path, examples) -> Path:
    path.write_text("".join(f"{e.label}\t{e.text}\n" for e in examples), encoding="utf-8")
    return path


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    examples = read_labelled(args.data).examples
    balanced = undersample(examples, seed)
    train, val, test = split_examples(balanced, 0.1, 0.2, seed)
    held_out = {e.text for e in val + test}
    kept = {id(e) for e in balanced}
    unused_ham = [e for e in examples if id(e) not in kept]
    corpus = [e.text for e in train + unused_ham if e.text not in held_out]
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    files = {name: write_split(out / f"{name}.tsv", part) for name, part in (("train", train), ("val", val),
                                                                              ("test", test))}
    start = time.perf_counter()
    if not (out / "base" / "config.json").exists():
        pretrain(out=out / "base", data=out / "corpus.txt", preset="mini", tokenizer="bpe", vocab_size=args.vocab_size,
                 model_overrides=dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=128),
                 max_steps=args.pretrain_steps, batch_size=32, lr=2e-3, warmup_steps=50, eval_interval=0,
                 show_progress=args.progress, seed=seed)
    pretrain_s = time.perf_counter() - start
    start = time.perf_counter()
    result = finetune_classify(out=out / "clf", model=out / "base", data=files["train"], val_file=files["val"],
                               test_file=files["test"], train_layers="all", epochs=args.finetune_epochs,
                               batch_size=16, lr=args.finetune_lr, show_progress=args.progress, seed=seed,
                               eval_interval=1000)
    finetune_s = time.perf_counter() - start
    row = {"seed": seed, "train": len(train), "val": len(val), "test": len(test), "corpus_texts": len(corpus),
           "test_accuracy": result.test["accuracy"], "val_accuracy": result.val["accuracy"],
           "pretrain_s": round(pretrain_s, 1), "finetune_s": round(finetune_s, 1), "steps": result.train.step}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="runs/bench-spam")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--finetune-epochs", type=float, default=5)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run_seed(args, seed) for seed in args.seeds]
    accuracies = [r["test_accuracy"] for r in rows]
    print(json.dumps({"mean_test_accuracy": statistics.mean(accuracies), "seeds": args.seeds,
                      "min": min(accuracies), "max": max(accuracies)}))


if __name__ == "__main__":
    main()
