"""Multiple-choice benchmarks (ARC, HellaSwag, PIQA, WinoGrande, ...) scored by log-likelihood, as
lm-evaluation-harness scores them, fast on a CPU.

    from ownllm.benchmarks import evaluate_tasks, format_report
    report = evaluate_tasks(run.model, run.tokenizer, ["arc_easy", "hellaswag"], shots=0, limit=500)
    print(format_report(report))          # task, n, acc, acc_norm, stderr, seconds; and the CORE-style summary

CLI: `ownllm evaluate RUN --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande [--shots 0] [--limit 500]
[--json]`, or `--tasks my_questions.jsonl`. Data and prompts: `ownllm.benchmarks.tasks`; scoring:
`ownllm.benchmarks.scoring`; lm-evaluation-harness's `ownllm` model: `ownllm.benchmarks.harness`.

acc: the choice with the highest summed log-probability of its continuation is the answer. acc_norm: the same
after dividing by the choice's length in characters (reported for the tasks whose harness definition reports it).
stderr: the sample standard error of the mean, as the harness prints it. The summary is nanochat's CORE way of
averaging different tasks: each task's acc centred on chance, (acc - chance) / (1 - chance), chance being the
mean of 1/choices over its items, then averaged over the tasks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ownllm.benchmarks.scoring import encode_pair, score_choices
from ownllm.benchmarks.tasks import TASKS, Question, check_task_names, load_task
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer

__all__ = ["TaskResult", "BenchmarkReport", "evaluate_tasks", "evaluate_questions", "format_report", "TASKS"]


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None  # None where the harness reports acc only (WinoGrande, BoolQ, COPA, ...)
    acc_norm_stderr: float | None
    chance: float  # mean of 1/choices
    centered: float  # (acc - chance) / (1 - chance)
    seconds: float
    shots: int = 0
    logprobs: list[list[float]] = field(default_factory=list, repr=False)  # per item, per choice

    def to_dict(self, with_logprobs: bool = False) -> dict[str, Any]:
        record = asdict(self)
        if not with_logprobs:
            record.pop("logprobs")
        return record


@dataclass
class BenchmarkReport:
    tasks: list[TaskResult]

    @property
    def core(self) -> float:
        """Mean over tasks of accuracy centred on chance (nanochat's CORE way of averaging)."""
        return sum(t.centered for t in self.tasks) / len(self.tasks) if self.tasks else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "core": self.core}


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n), the harness's stderr of a mean."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, like numpy.argmax


def evaluate_questions(model: GPT, tokenizer: Tokenizer, questions: Sequence[Question], name: str = "task",
                       reports_acc_norm: bool = True, shots: int = 0, precision: str = "fp32",
                       show_progress: bool = True) -> TaskResult:
    """Score every question; longest first (memory peaks early, the rate the bar shows only rises)."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    encoded = [[encode_pair(tokenizer, c, k) for c, k in zip(q.contexts, q.continuations)] for q in questions]
    order = sorted(range(len(questions)), key=lambda i: -max(len(a) + len(b) for a, b in encoded[i]))
    logprobs: list[list[float]] = [[] for _ in questions]
    for index in tqdm(order, desc=name, unit="item", disable=not show_progress, dynamic_ncols=True, leave=False):
        logprobs[index] = score_choices(model, encoded[index], precision=precision)
    model.train(was_training)
    correct = [float(_argmax(lp) == q.answer) for lp, q in zip(logprobs, questions)]
    correct_norm = [float(_argmax([x / max(n, 1) for x, n in zip(lp, q.norm_lengths)]) == q.answer)
                    for lp, q in zip(logprobs, questions)]
    n = len(questions)
    acc = sum(correct) / n
    chance = sum(1 / len(q.continuations) for q in questions) / n
    return TaskResult(task=name, n=n, acc=acc, acc_stderr=mean_stderr(correct),
                      acc_norm=sum(correct_norm) / n if reports_acc_norm else None,
                      acc_norm_stderr=mean_stderr(correct_norm) if reports_acc_norm else None,
                      chance=chance, centered=(acc - chance) / (1 - chance), seconds=time.perf_counter() - start,
                      shots=shots, logprobs=logprobs)


def evaluate_tasks(model: GPT, tokenizer: Tokenizer, tasks: Sequence[str], shots: int = 0,
                   limit: int | None = None, seed: int = 1234, data_dir: str | Path | None = None,
                   precision: str = "fp32", show_progress: bool = True,
                   on_result: Callable[[TaskResult], None] | None = None) -> BenchmarkReport:
    """Score `model` on built-in tasks (names from TASKS) and/or JSONL task files, `shots`-shot, first `limit` items.

    Every task is read before any is scored, so a missing data set or a bad file fails at once."""
    check_task_names(tasks)
    if limit is not None and limit < 1:
        raise OwnLLMError("--limit must be at least 1")
    loaded = [(name, load_task(name, limit=limit, shots=shots, seed=seed, data_dir=data_dir)) for name in tasks]
    results = []
    for name, questions in loaded:
        spec = TASKS.get(name)
        label = name if spec else Path(name).stem
        result = evaluate_questions(model, tokenizer, questions, name=label,
                                    reports_acc_norm=spec.reports_acc_norm if spec else True, shots=shots,
                                    precision=precision, show_progress=show_progress)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return BenchmarkReport(results)


def training_hook(tasks: str, limit: int, tokenizer: Tokenizer | None, precision: str = "fp32",
                  data_dir: str | Path | None = None) -> Callable[[GPT], dict[str, dict[str, float | None]]]:
    """What pretraining's `--eval-tasks` runs at each evaluation: the first `limit` items of each task (read once,
    here), scored 0-shot -> {task: {"acc": ..., "acc_norm": ...}}."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    check_task_names(names)
    if limit < 1:
        raise OwnLLMError("--eval-limit must be at least 1")
    loaded = {name: load_task(name, limit=limit, data_dir=data_dir) for name in names}

    def score(model: GPT) -> dict[str, dict[str, float | None]]:
        results = {}
        for name, questions in loaded.items():
            spec = TASKS.get(name)
            result = evaluate_questions(model, tokenizer, questions, name=name, show_progress=False,
                                        reports_acc_norm=spec.reports_acc_norm if spec else True,
                                        precision=precision)
            results[name if spec else Path(name).stem] = {"acc": result.acc, "acc_norm": result.acc_norm}
        return results

    return score


def format_report(report: BenchmarkReport) -> str:
    """A plain-text table: task, n, acc, acc_norm, stderr (of acc), seconds; then the CORE-style summary."""
    width = max([4, *(len(t.task) for t in report.tasks)])
    lines = [f"{'task':<{width}}  {'n':>6}  {'acc':>6}  {'acc_norm':>8}  {'stderr':>6}  {'seconds':>8}"]
    for t in report.tasks:
        norm = f"{t.acc_norm:8.4f}" if t.acc_norm is not None else f"{'-':>8}"
        lines.append(f"{t.task:<{width}}  {t.n:>6}  {t.acc:6.4f}  {norm}  {t.acc_stderr:6.4f}  {t.seconds:8.1f}")
    shots = {t.shots for t in report.tasks}
    lines.append(f"CORE-style score (acc centred on chance, mean of {len(report.tasks)} tasks): {report.core:.4f}"
                 f"  [{'/'.join(str(s) for s in sorted(shots))}-shot]")
    return "\n".join(lines)
