"""Benchmark results: one `TaskResult` per task, their standard errors and MMLU's averages as lm-evaluation-harness
computes them, the per-task cache a long evaluation resumes from, and the plain-text table.

    result.to_dict()                       # what `ownllm evaluate --json` prints per task
    save_cached(folder, result, settings)  # folder/<task>.json; load_cached(folder, task, settings) -> it or None

stderr: the sample standard deviation of the per-item scores over sqrt(n) (the harness's `mean_stderr`). MMLU's
`mmlu` row is the harness's group score, the mean over all items (subjects weighted by their size), with the
harness's pooled standard error over the subjects; `mmlu_macro` is the plain mean of the subjects' scores, with
sqrt(sum of their squared stderrs) / subjects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ownllm.outputs import atomic_file

CACHE_VERSION = 1


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float  # the fraction right: the chosen choice (multiple choice), or the exact match of the answer
    acc_stderr: float
    acc_norm: float | None  # None where the harness reports acc only (WinoGrande, BoolQ, MMLU, generative ...)
    acc_norm_stderr: float | None
    chance: float  # mean of 1/choices (0 for generative tasks)
    centered: float  # (acc - chance) / (1 - chance)
    seconds: float
    shots: int = 0
    metric: str = "acc"  # what `acc` measures: "acc", or "exact_match" for generative tasks
    group: str | None = None  # "mmlu" for its subjects and its macro average: rows under the group's own row
    f1: float | None = None  # where the harness reports it (MRPC: of label 1; CB: the mean over the labels)
    logprobs: list[list[float]] = field(default_factory=list, repr=False)  # per item, per choice
    answers: list[str] = field(default_factory=list, repr=False)  # per item, the generated answer

    def to_dict(self, with_details: bool = False) -> dict[str, Any]:
        record = asdict(self)
        if not with_details:
            record.pop("logprobs")
            record.pop("answers")
        return record

    @property
    def headline(self) -> tuple[str, float, float]:
        """(metric name, score, stderr) a report shows: acc_norm where the harness reports it, else acc / exact
        match."""
        if self.acc_norm is not None and self.acc_norm_stderr is not None:
            return "acc_norm", self.acc_norm, self.acc_norm_stderr
        return self.metric, self.acc, self.acc_stderr


@dataclass
class BenchmarkReport:
    tasks: list[TaskResult]

    @property
    def core(self) -> float:
        """Mean over the top-level tasks (a group counts once) of accuracy centred on chance (nanochat's CORE way of
        averaging)."""
        top = self.top_level
        return sum(t.centered for t in top) / len(top) if top else 0.0

    @property
    def top_level(self) -> list[TaskResult]:
        return [t for t in self.tasks if t.group is None]

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "core": self.core}


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n), the harness's stderr of a mean."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def f1_of(golds: Sequence[int], predictions: Sequence[int], label: int) -> float:
    """F1 of one label: 2 TP / (2 TP + FP + FN), 0 where that is 0 / 0 (as scikit-learn's f1_score)."""
    tp = sum(g == label and p == label for g, p in zip(golds, predictions))
    wrong = sum((g == label) != (p == label) for g, p in zip(golds, predictions))
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


def f1_score(golds: Sequence[int], predictions: Sequence[int], kind: str, labels: int) -> float:
    """The harness's f1: "binary" (label 1, lm_eval.api.metrics.f1_score) or "macro" (the mean over `labels`,
    super_glue/cb's cb_multi_fi)."""
    if kind == "binary":
        return f1_of(golds, predictions, 1)
    return sum(f1_of(golds, predictions, label) for label in range(labels)) / labels


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """The harness's stderr of a size-weighted group mean (lm_eval.api.metrics.pooled_sample_stderr)."""
    if sum(sizes) <= len(sizes):
        return 0.0
    variance = sum((n - 1) * s ** 2 * n for s, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))


def group_results(name: str, parts: Sequence[TaskResult]) -> list[TaskResult]:
    """`name` (the mean over every item, pooled stderr) and `name_macro` (the mean of the parts' scores)."""
    sizes = [p.n for p in parts]
    total = sum(sizes)
    micro = sum(p.acc * p.n for p in parts) / total
    macro = sum(p.acc for p in parts) / len(parts)
    chance = sum(p.chance * p.n for p in parts) / total
    common = dict(acc_norm=None, acc_norm_stderr=None, chance=chance, seconds=sum(p.seconds for p in parts),
                  shots=parts[0].shots, metric=parts[0].metric)
    return [TaskResult(task=name, n=total, acc=micro, acc_stderr=pooled_stderr([p.acc_stderr for p in parts], sizes),
                       centered=(micro - chance) / (1 - chance), **common),
            TaskResult(task=f"{name}_macro", n=total, acc=macro, group=name,
                       acc_stderr=math.sqrt(sum(p.acc_stderr ** 2 for p in parts)) / len(parts),
                       centered=(macro - chance) / (1 - chance), **common)]


def result_from_dict(record: dict[str, Any]) -> TaskResult:
    names = {f.name for f in fields(TaskResult)}
    return TaskResult(**{key: value for key, value in record.items() if key in names})


def cache_path(folder: Path, task: str) -> Path:
    return folder / (task.replace("/", "_").replace("\\", "_") + ".json")


def load_cached(folder: Path | None, task: str, settings: dict[str, Any]) -> TaskResult | None:
    """The cached result of `task` scored with the same `settings`, or None (none, other settings, unreadable)."""
    if folder is None:
        return None
    path = cache_path(folder, task)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("version") != CACHE_VERSION or record.get("settings") != settings:
            return None
        return result_from_dict(record["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cached(folder: Path, result: TaskResult, settings: dict[str, Any]) -> None:
    """folder/<task>.json, written atomically (a killed run leaves the earlier tasks' files whole)."""
    record = {"version": CACHE_VERSION, "settings": settings, "result": result.to_dict(with_details=True)}
    with atomic_file(cache_path(folder, result.task)) as handle:
        json.dump(record, handle)


def format_report(report: BenchmarkReport) -> str:
    """A plain-text table: task, n, metric, score, stderr, acc, acc_norm, seconds; then the CORE-style summary."""
    width = max([4, *(len(t.task) for t in report.tasks)])
    lines = [f"{'task':<{width}}  {'n':>6}  {'metric':<11}  {'score':>6}  {'stderr':>6}  {'acc':>6}  "
             f"{'acc_norm':>8}  {'seconds':>8}"]
    for t in report.tasks:
        metric, score, stderr = t.headline
        norm = f"{t.acc_norm:8.4f}" if t.acc_norm is not None else f"{'-':>8}"
        lines.append(f"{t.task:<{width}}  {t.n:>6}  {metric:<11}  {score:6.4f}  {stderr:6.4f}  {t.acc:6.4f}  "
                     f"{norm}  {t.seconds:8.1f}")
    shots = {t.shots for t in report.tasks}
    lines.append(f"CORE-style score (acc centred on chance, mean of {len(report.top_level)} tasks): {report.core:.4f}"
                 f"  [{'/'.join(str(s) for s in sorted(shots))}-shot]")
    return "\n".join(lines)
