"""CPU speedrun: the `speedrun` recipe against nanoGPT's recipe, same data, same machine, wall clock counted.

For each dataset (Tiny Shakespeare by characters; Pride and Prejudice with a byte-level BPE) and each arm, one
`ownllm pretrain` command runs in its own process (optionally pinned to its own cores with `taskset`), with
--max-minutes as the training budget. Reported per arm: steps, the whole command's wall time, the final validation
loss and bits per byte (`ownllm evaluate` on the last 10% of the file, nanoGPT's split), and the time to the target
validation loss (the wall time, from the command's start, of the first evaluation at or below it: 1.886, nanoGPT
baby's after its 2,000 iterations, for Shakespeare; for Pride and Prejudice the nanoGPT arm's final loss).

Arms:
  speedrun   ownllm pretrain --model speedrun (our recipe: Muon, ReLU^2, QK-norm, RoPE, untied soft-capped head,
             --precision auto and --compile auto as the preset says)
  nanogpt    nanoGPT's CPU Shakespeare recipe with ownllm flags: --model baby (4 layers, 4 heads, 128 wide, block
             64, batch 12, AdamW lr 1e-3 -> 1e-4, warmup 100, 2,000 iterations, beta2 0.99, weight decay 0.1,
             dropout 0, 20 eval batches every 250 steps), fp32, no compile: what nanoGPT's README runs on a CPU
  nanogpt-ref (with --nanogpt PATH, Shakespeare only) nanoGPT's own train.py from your checkout, same settings,
             on its own prepare.py split; never copied here

Modes: by default the arms run one after another, alternating their order on each --repeats, each with --threads
threads. `--parallel` starts every arm at once, each pinned to its own set of cores (`--core-sets 0,1 2,3 ...`,
default consecutive groups of --threads cores): on a quiet 16-core machine that is 4-6 runs of 2 threads that do
not disturb each other. `--fill-budget` sets each arm's --max-steps so that its schedule ends at the budget (from a
step time measured before the run), instead of the recipe's own step count.

Run from the repository root (data is read by path, never copied into the repository):
    .venv/bin/python bench/cpu_speedrun.py --max-minutes 10                       # both datasets, in turns
    .venv/bin/python bench/cpu_speedrun.py --parallel --threads 2 --max-minutes 10 --repeats 2
    .venv/bin/python bench/cpu_speedrun.py --datasets shakespeare --arms speedrun nanogpt --max-minutes 3
    .venv/bin/python bench/cpu_speedrun.py --datasets shakespeare --nanogpt ../nanoGPT --parallel

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASETS = {  # paths relative to --data-dir
    "shakespeare": dict(path=Path("tinyshakespeare/input.txt"), tokenizer=["--tokenizer", "char"], target=1.886),
    "pride": dict(path=Path("gutenberg/pride_and_prejudice_pg1342.txt"),
                  tokenizer=["--tokenizer", "bpe", "--vocab-size", "2048"], target=None),
}
ARMS = {
    "speedrun": ["--model", "speedrun"],
    "nanogpt": ["--model", "baby", "--precision", "fp32", "--compile", "off"],
}
VAL_FRACTION = 0.1  # nanoGPT's split: the last 10% of the text


@dataclass
class Arm:
    dataset: str
    name: str
    repeat: int
    out: Path
    cores: str | None = None
    result: dict = field(default_factory=dict)


def command(arm: Arm, args: argparse.Namespace) -> list[str]:
    """The command line of one arm (ownllm pretrain, or nanoGPT's train.py)."""
    data = DATASETS[arm.dataset]
    if arm.name == "nanogpt-ref":
        return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=20", "--log_interval=10", "--block_size=64", "--batch_size=12", "--n_layer=4",
                "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
                f"--out_dir={arm.out}"]
    cmd = [sys.executable, "-m", "ownllm", "pretrain", "--data", str(data["path"]), "--out", str(arm.out),
           "--val-fraction", str(VAL_FRACTION), *data["tokenizer"], *ARMS[arm.name],
           "--max-minutes", str(args.max_minutes)]
    if args.fill_budget:
        cmd += ["--max-steps", str(steps_for_budget(arm, args))]
    if args.eval_interval:
        cmd += ["--eval-interval", str(args.eval_interval)]
    return cmd


def steps_for_budget(arm: Arm, args: argparse.Namespace) -> int:
    """Steps whose schedule ends at the budget: budget / (measured step time), with 10% kept for evaluations."""
    import torch

    from ownllm.config import ModelConfig, model_config_from_preset, train_config_for
    from ownllm.probe import _time_steps

    preset = ARMS[arm.name][1]
    vocab = 65 if arm.dataset == "shakespeare" else 2048
    config: ModelConfig = model_config_from_preset(preset, vocab_size=vocab)
    train = train_config_for(preset)
    torch.set_num_threads(args.threads)
    precision = "fp32" if arm.name == "nanogpt" else "auto"
    step_s = min(_time_steps(config, train, torch.device("cpu"), p, False)[0]
                 for p in (["fp32", "bf16"] if precision == "auto" else ["fp32"]))
    return max(100, int(0.9 * 60 * args.max_minutes / step_s))


def environment(arm: Arm, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    if not args.keep_probe_cache:  # a fresh --precision/--compile auto measurement, its cost in the wall time
        env["OWNLLM_CACHE_DIR"] = str(arm.out) + "-cache"
    return env


def launch(arm: Arm, args: argparse.Namespace) -> tuple[subprocess.Popen, float, threading.Thread]:
    """Start the arm's command; a thread copies its output to OUT.log, each line stamped with seconds since start."""
    cmd = command(arm, args)
    if arm.cores:
        cmd = ["taskset", "-c", arm.cores, *cmd]
    cwd = args.nanogpt if arm.name == "nanogpt-ref" else REPO
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=environment(arm, args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")

    def copy() -> None:
        with open(arm.out.with_suffix(".log"), "w", encoding="utf-8") as log:
            log.write(" ".join(cmd) + "\n")
            for line in proc.stdout:
                log.write(f"[{time.time() - start:8.2f}] {line}")

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    return proc, start, reader


def val_text(dataset: str, folder: Path) -> Path:
    """The last 10% of the dataset's text (by characters, as nanoGPT splits), as a file for `ownllm evaluate`."""
    text = DATASETS[dataset]["path"].read_text(encoding="utf-8")
    path = folder / f"{dataset}-val.txt"
    path.write_text(text[int(len(text) * (1 - VAL_FRACTION)):], encoding="utf-8")
    return path


def finish(arm: Arm, start: float, end: float, args: argparse.Namespace, folder: Path) -> None:
    """Fill arm.result from the run's metrics (or nanoGPT's log) and an `ownllm evaluate` of its weights."""
    arm.result = {"dataset": arm.dataset, "arm": arm.name, "repeat": arm.repeat, "cores": arm.cores,
                  "wall_s": round(end - start, 1)}
    if arm.name == "nanogpt-ref":
        vals = nanogpt_log_vals(arm.out.with_suffix(".log"))
        arm.result.update(val_curve=vals, val_loss=vals[-1][1] if vals else None, steps=vals[-1][0] if vals else 0)
        return
    rows = [json.loads(line) for line in (arm.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [(r["step"], r["val_loss"], round(r["time"] - start, 1)) for r in rows if r.get("val_loss") is not None]
    config = json.loads((arm.out / "config.json").read_text())
    arm.result.update(steps=rows[-1]["step"] if rows else 0, val_loss=vals[-1][1] if vals else None,
                      val_curve=vals, speed=config.get("speed", {}).get("reason"))
    evaluated = subprocess.run([sys.executable, "-m", "ownllm", "evaluate", str(arm.out), "--text",
                                str(val_text(arm.dataset, folder)), "--json"], capture_output=True, text=True,
                               env=environment(arm, args), cwd=REPO)
    if evaluated.returncode == 0:
        arm.result["val_bits_per_byte"] = round(json.loads(evaluated.stdout)["bits_per_byte"], 4)


def nanogpt_log_vals(log: Path) -> list[tuple[int, float, float]]:
    found = re.findall(r"\[ *([\d.]+)\] step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                       log.read_text(errors="replace"))
    return [(int(step), float(loss), float(t)) for t, step, loss in found]


def time_to(vals: list, target: float | None) -> float | None:
    if target is None:
        return None
    return next((t for _, loss, t in vals if loss <= target and t is not None), None)


def core_sets(args: argparse.Namespace, count: int) -> list[str | None]:
    if args.core_sets:
        sets = args.core_sets
    elif args.parallel:
        if count * args.threads > (os.cpu_count() or 1):
            raise SystemExit(f"--parallel: {count} arms x {args.threads} threads need {count * args.threads} cores, "
                             f"this machine has {os.cpu_count()}: fewer --repeats or --datasets, or --core-sets")
        sets = [f"{i * args.threads}-{(i + 1) * args.threads - 1}" for i in range(count)]
    else:
        sets = [args.cores] * count
    if len(sets) < count:
        raise SystemExit(f"--core-sets gives {len(sets)} core sets for {count} parallel arms")
    return sets[:count]


def plan(args: argparse.Namespace, folder: Path) -> list[Arm]:
    arms = []
    for repeat in range(args.repeats):
        for dataset in args.datasets:
            names = list(args.arms) + (["nanogpt-ref"] if args.nanogpt and dataset == "shakespeare" else [])
            if repeat % 2:
                names.reverse()  # interleave: each arm goes first in turn
            arms += [Arm(dataset, name, repeat, folder / f"{dataset}-{name}-{repeat}") for name in names]
    return arms


def prepare_nanogpt(path: Path) -> None:
    """nanoGPT's own char prepare.py on our Shakespeare file (in the user's checkout)."""
    data_dir = path / "data" / "shakespeare_char"
    shutil.copyfile(DATASETS["shakespeare"]["path"], data_dir / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, capture_output=True)


def run(args: argparse.Namespace, folder: Path) -> list[Arm]:
    arms = plan(args, folder)
    if args.nanogpt:
        prepare_nanogpt(Path(args.nanogpt))
    if args.parallel:
        for arm, cores in zip(arms, core_sets(args, len(arms))):
            arm.cores = cores
        running = [(arm, *launch(arm, args)) for arm in arms]
        ended: dict[int, float] = {}
        while len(ended) < len(running):  # note each command's own end time
            for i, (_, proc, _, _) in enumerate(running):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.05)
        for i, (arm, _, start, reader) in enumerate(running):
            reader.join()
            finish(arm, start, ended[i], args, folder)
    else:
        for arm in arms:
            arm.cores = args.cores
            proc, start, reader = launch(arm, args)
            proc.wait()
            end = time.time()
            reader.join()
            finish(arm, start, end, args, folder)
            report_one(arm)
    return arms


def report_one(arm: Arm) -> None:
    r = arm.result
    bpb = f", val {r.get('val_bits_per_byte')} bits/byte" if r.get("val_bits_per_byte") else ""
    print(f"{r['dataset']:11s} {r['arm']:11s} #{r['repeat']} cores {r['cores'] or 'any'}: {r['steps']} steps, "
          f"wall {r['wall_s']} s, val loss {r['val_loss']}{bpb}", flush=True)


def summarize(arms: list[Arm], args: argparse.Namespace) -> dict:
    """Per dataset and repeat: time to target and the loss each arm has at the nanoGPT arm's finishing time."""
    summary = []
    for arm in arms:
        if arm.name != "speedrun":
            continue
        ref = next((a for a in arms if a.dataset == arm.dataset and a.repeat == arm.repeat and a.name == "nanogpt"),
                   None)
        target = DATASETS[arm.dataset]["target"] or (ref.result.get("val_loss") if ref else None)
        row = {"dataset": arm.dataset, "repeat": arm.repeat, "target": target,
               "speedrun_time_to_target_s": time_to(arm.result["val_curve"], target),
               "nanogpt_time_to_target_s": time_to(ref.result["val_curve"], target) if ref else None}
        if ref and ref.result.get("val_loss"):
            at_ref_time = [loss for _, loss, t in arm.result["val_curve"] if t is not None and t <= ref.result["wall_s"]]
            row["speedrun_loss_at_nanogpt_wall"] = at_ref_time[-1] if at_ref_time else None
            row["nanogpt_final_loss"] = ref.result["val_loss"]
            if at_ref_time:
                row["loss_reduction_at_nanogpt_wall"] = round(1 - at_ref_time[-1] / ref.result["val_loss"], 4)
        if row["speedrun_time_to_target_s"] and ref and ref.result.get("wall_s"):
            row["time_ratio_vs_nanogpt_wall"] = round(row["speedrun_time_to_target_s"] / ref.result["wall_s"], 3)
        summary.append(row)
        print(json.dumps(row), flush=True)
    return {"arms": [a.result for a in arms], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-minutes", type=float, default=10.0, help="training budget of every arm")
    parser.add_argument("--data-dir", default="/work/shared/data",
                        help="folder with tinyshakespeare/input.txt and gutenberg/pride_and_prejudice_pg1342.txt")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm (order alternates)")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of every arm")
    parser.add_argument("--parallel", action="store_true", help="all arms at once, each on its own cores")
    parser.add_argument("--core-sets", nargs="+", default=None,
                        help="taskset core lists, one per parallel arm (e.g. 0,1 2,3 4,5 6,7)")
    parser.add_argument("--cores", default=None, help="taskset core list for every arm in turns (e.g. 0,1)")
    parser.add_argument("--fill-budget", action="store_true",
                        help="each arm's --max-steps from a measured step time so its schedule ends at the budget")
    parser.add_argument("--eval-interval", type=int, default=None, help="override every arm's eval interval")
    parser.add_argument("--keep-probe-cache", action="store_true",
                        help="let runs reuse ~/.cache/ownllm's speed measurements (default: each run measures anew)")
    parser.add_argument("--nanogpt", default=None, help="a nanoGPT checkout: also run its train.py (Shakespeare)")
    parser.add_argument("--out", default=None, help="keep runs and logs under this folder (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    args = parser.parse_args()
    for spec in DATASETS.values():
        spec["path"] = Path(args.data_dir) / spec["path"]
    if (args.parallel or args.cores or args.core_sets) and not shutil.which("taskset"):
        raise SystemExit("pinning needs taskset (util-linux)")
    print(f"{os.cpu_count()} CPUs, amx_bf16: {'amx_bf16' in Path('/proc/cpuinfo').read_text()}, load "
          f"{os.getloadavg()[0]:.1f}; budget {args.max_minutes} min per arm, {args.threads} threads each", flush=True)
    with tempfile.TemporaryDirectory(prefix="ownllm-speedrun-") as tmp:
        folder = Path(args.out) if args.out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        arms = run(args, folder)
        if args.parallel:
            for arm in arms:
                report_one(arm)
        results = summarize(arms, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    if any(math.isnan(a.result.get("val_loss") or 0.0) for a in arms):
        print("a run diverged (nan loss)", file=sys.stderr)


if __name__ == "__main__":
    main()
