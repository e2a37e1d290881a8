"""Sentence sentiment (UCI "Sentiment Labelled Sentences": Amazon phones, IMDb) from scratch on this CPU.

Per file and seed: shuffle, split 70/10/20; pretrain a small GPT from scratch on the training sentences of both
files (never on val or test sentences); fine-tune all layers with the last-real-token head
(`ownllm.finetune.finetune_classify`); report test accuracy and wall times. The files are `sentence<TAB>label`
with no header and one U+0085 inside an IMDb sentence: `ownllm.data.labelled` reads them as they are.

Run from the repository root (the data is read by path, never copied):
    .venv/bin/python bench/finetune_sentiment.py --seeds 1 2 3

A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ownllm.data.labelled import read_labelled, split_examples
from ownllm.finetune import finetune_classify
from ownllm.pretrain import pretrain

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentiment"
FILES = ("amazon_cells_labelled.txt", "imdb_labelled.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--out", default="runs/bench-sentiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {name: [] for name in FILES}
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        splits = {name: split_examples(read_labelled(Path(args.data_dir) / name).examples, 0.1, 0.2, seed)
                  for name in FILES}
        corpus = [e.text for train, _, _ in splits.values() for e in train]
        (out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
        start = time.perf_counter()
        if not (out / "base" / "config.json").exists():
            pretrain(out=out / "base", data=out / "corpus.txt", preset="mini", tokenizer="bpe", vocab_size=1000,
                     model_overrides=dict(n_layer=4, n_head=4, n_embd=128, block_size=96), val_fraction=0.05,
                     max_steps=args.pretrain_steps, batch_size=32, lr=2e-3, warmup_steps=50, eval_interval=0,
                     show_progress=args.progress, seed=seed)
        pretrain_s = time.perf_counter() - start
        for name, (train, val, test) in splits.items():
            files = {}
            for part, examples in (("train", train), ("val", val), ("test", test)):
                files[part] = out / f"{name}.{part}.tsv"
                files[part].write_text("".join(f"{e.text}\t{e.label}\n" for e in examples), encoding="utf-8")
            start = time.perf_counter()
            result = finetune_classify(out=out / f"clf-{name}", model=out / "base", data=files["train"],
                                       val_file=files["val"], test_file=files["test"], epochs=args.epochs,
                                       batch_size=16, lr=args.lr, show_progress=args.progress, seed=seed,
                                       eval_interval=10_000)
            row = {"file": name, "seed": seed, "test_accuracy": result.test["accuracy"],
                   "pretrain_s": round(pretrain_s, 1), "finetune_s": round(time.perf_counter() - start, 1)}
            results[name].append(row["test_accuracy"])
            print(json.dumps(row), flush=True)
    print(json.dumps({name: statistics.mean(values) for name, values in results.items()}))


if __name__ == "__main__":
    main()
