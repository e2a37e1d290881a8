"""Scaling out on one machine: the same pretraining on 1 process vs 2 processes (torchrun, gloo on the CPU).

For each preset, four runs of `ownllm pretrain` on the same prepared dataset (Python's own docs, char-level),
one after the other, each a fresh run of --steps optimizer steps with the same global batch:
  - 1 process, all threads (the default way to train here);
  - 1 process, 1 thread (what one core does alone);
  - `--nproc 2` (DDP; torchrun gives each process 1 thread);
  - `--nproc 2 --strategy fsdp`.
Reported: training tokens/s, the median of the metrics.jsonl rows after the first (warm-up) one, and the ratio to
the 1-process run. On a GPU machine the same script measures GPUs (`--device cuda` and --nproc = GPU count).

Run (from the repository root; the default takes a few minutes on 2 cores):
    .venv/bin/python bench/scaling.py
    .venv/bin/python bench/scaling.py --presets mini --steps 20 --nproc 2

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_STEPS = {"baby": 150, "mini": 20}
BATCH = {"baby": 12, "mini": 16}


def corpus(path: Path, chars: int = 400_000) -> Path:
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[key] for key in sorted(topics))[:chars], encoding="utf-8")
    return path


def run(args: list[str], threads: int | None) -> None:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-m", "ownllm", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: ownllm {' '.join(args)}\n{done.stderr[-2000:]}")


def tokens_per_sec(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["tokens_per_sec"] for row in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_STEPS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per preset)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(["pretrain", "--data", str(corpus(root / "docs.txt")), "--out", str(root / "prep"), "--model", "baby",
             "--tokenizer", "char", "--max-steps", "1", "--eval-interval", "0"], threads=None)
        data = str(root / "prep" / "data")
        print(f"{'preset':<6} {'run':<28} {'tokens/s':>10} {'vs 1 process':>13}")
        for preset in options.presets:
            steps = options.steps or DEFAULT_STEPS.get(preset, 20)
            common = ["pretrain", "--data", data, "--model", preset, "--max-steps", str(steps), "--eval-interval",
                      "0", "--log-interval", str(max(1, steps // 10)), "--batch-size", str(BATCH.get(preset, 16)),
                      "--device", options.device, "--precision", "fp32"]
            setups = [("1 process, all threads", [], None), ("1 process, 1 thread", [], 1),
                      (f"{options.nproc} processes, ddp", ["--nproc", str(options.nproc)], None),
                      (f"{options.nproc} processes, fsdp", ["--nproc", str(options.nproc), "--strategy", "fsdp"],
                       None)]
            baseline = None
            for index, (name, extra, threads) in enumerate(setups):
                out = root / f"{preset}-{index}"
                run([*common, "--out", str(out), *extra], threads)
                speed = tokens_per_sec(out)
                baseline = baseline or speed
                print(f"{preset:<6} {name:<28} {speed:>10,.0f} {speed / baseline:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
