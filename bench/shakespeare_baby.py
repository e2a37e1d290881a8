"""nanoGPT's CPU "baby GPT" on Shakespeare characters, trained by ownllm: validation loss and tokens/s.

The recipe is the `baby` preset (4 layers, 4 heads, 128 wide, block 64, batch 12, lr 1e-3 -> 1e-4, 100 warmup
steps, 2000 steps, dropout 0, weight decay 0.1, beta2 0.99, grad clip 1.0, 20 eval batches every 250 steps). Each
run goes through `ownllm.pretrain.pretrain` (the same code path as `ownllm pretrain --tokenizer char --model baby`)
into a fresh run directory, then reads the run's metrics.jsonl. Reported per run: the resolved precision, the
median tokens/s of the logged windows (evaluation time excluded), the training wall time, the val loss at the end,
and the ratio against nanoGPT's figures on this machine type (42.8 ms/iter median = 17.9k tokens/s, val 1.886).

Run from the repository root (the data path is relative to it; the data is never copied into the repository):
    .venv/bin/python bench/shakespeare_baby.py                          # precision auto, 2000 steps
    .venv/bin/python bench/shakespeare_baby.py --precision auto fp32 bf16 --max-steps 300   # quick comparison
    .venv/bin/python bench/shakespeare_baby.py --data ../shared/data/tinyshakespeare/input.txt --compile

The same run with the CLI:
    ownllm pretrain --data ../shared/data/tinyshakespeare/input.txt --tokenizer char --model baby --out runs/shk

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ownllm.pretrain import pretrain

REPO = Path(__file__).resolve().parent.parent
NANOGPT_MS_PER_ITER = 42.8  # median, measured on this machine type
NANOGPT_TOKENS_PER_SEC = 12 * 64 / (NANOGPT_MS_PER_ITER / 1000)
NANOGPT_VAL_LOSS = 1.886


def run_once(data: Path, out: Path, precision: str, max_steps: int, compile_model: bool) -> dict:
    start = time.perf_counter()
    result = pretrain(out=out, data=data, preset="baby", tokenizer="char", precision=precision,
                      max_steps=max_steps, compile=compile_model or None, show_progress=False)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [row["tokens_per_sec"] for row in rows if row.get("tokens_per_sec")]
    vals = [(row["step"], row["val_loss"]) for row in rows if row.get("val_loss") is not None]
    median_rate = statistics.median(rates)
    resolved = json.loads((out / "config.json").read_text())["speed"]["precision"]  # what the run measured and used
    return {"precision": precision, "resolved": resolved,
            "compile": compile_model, "steps": result.step, "wall_s": round(wall, 1),
            "tokens_per_sec_median": round(median_rate), "ms_per_iter": round(12 * 64 / median_rate * 1000, 2),
            "speed_vs_nanogpt": round(median_rate / NANOGPT_TOKENS_PER_SEC, 2),
            "val_loss": result.val_loss, "val_curve": vals, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/tinyshakespeare/input.txt"),
                        help="tinyshakespeare input.txt (default: ../shared/data/tinyshakespeare/input.txt)")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="keep the runs under this folder (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    results = []
    with tempfile.TemporaryDirectory(prefix="ownllm-baby-") as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        for precision in args.precision:
            out = base / f"baby-{precision}{'-compile' if args.compile else ''}-{int(time.time())}"
            row = run_once(data, out, precision, args.max_steps, args.compile)
            results.append(row)
            print(f"precision {row['precision']} (= {row['resolved']}){' compiled' if row['compile'] else ''}, "
                  f"{row['threads']} threads: {row['steps']} steps, val {row['val_loss']:.4f} "
                  f"(nanoGPT {NANOGPT_VAL_LOSS}), {row['tokens_per_sec_median']:,} tok/s median = "
                  f"{row['ms_per_iter']} ms/iter, {row['speed_vs_nanogpt']}x nanoGPT "
                  f"({NANOGPT_TOKENS_PER_SEC:,.0f} tok/s), wall {row['wall_s']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
