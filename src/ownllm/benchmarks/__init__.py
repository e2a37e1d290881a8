"""Benchmarks: multiple-choice tasks (ARC, HellaSwag, MMLU, GLUE, ...) scored by log-likelihood and generative
tasks (NQ-open, TriviaQA, arithmetic) scored by exact match, as lm-evaluation-harness scores them, fast on a CPU.

    from ownllm.benchmarks import evaluate_tasks, format_report
    report = evaluate_tasks(run.model, run.tokenizer, ["arc_easy", "mmlu", "nq_open"], shots=0, limit=500)
    print(format_report(report))          # task, n, metric, score, stderr, ...; and the CORE-style summary

CLI: `ownllm evaluate RUN --tasks arc_easy,mmlu,nq_open [--shots 0] [--limit 500] [--json] [--report DIR
[--baseline OTHER_RUN]]`, or `--tasks my_questions.jsonl`. Names and data: `ownllm.benchmarks.suite` (over
`tasks`, `mmlu`, `generative`); batched scoring: `ownllm.benchmarks.batching` (over `scoring`); results, their
stderr and the resume cache: `ownllm.benchmarks.results`; report.md and its chart: `ownllm.benchmarks.report`;
lm-evaluation-harness's `ownllm` model: `ownllm.benchmarks.harness`.

acc: the choice with the highest summed log-probability of its continuation is the answer. acc_norm: the same
after dividing by the choice's length in characters (reported for the tasks whose harness definition reports it).
exact_match (generative tasks, reported as `acc` with `metric` "exact_match"): the greedy answer equals a target
after the harness's normalisation. stderr: the sample standard error of the mean, as the harness prints it. The
summary is nanochat's CORE way of averaging different tasks: each task's acc centred on chance,
(acc - chance) / (1 - chance), chance being the mean of 1/choices over its items (0 for generative tasks), then
averaged over the tasks (MMLU once).

Items are scored in batches (`batching`: "packed" keeps each item's shared prefix once, "padded" one row per
choice, "none" one item at a time); the progress bar shows items/s and the time left. With `cache_dir`, each
finished task's result is kept there, and a later call with the same settings takes it instead of scoring again
(a killed evaluation resumes at the first unfinished task).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ownllm.benchmarks.batching import score_items
from ownllm.benchmarks.generative import GENERATIVE, Answer, exact_match, generate_answers
from ownllm.benchmarks.results import (BenchmarkReport, TaskResult, f1_score, format_report, group_results,
                                       load_cached, mean_stderr, save_cached)
from ownllm.benchmarks.scoring import encode_pair, score_choices
from ownllm.benchmarks.suite import (GROUPS, check_task_names, expand_tasks, is_generative, load_items,
                                     reports_acc_norm, task_label)
from ownllm.benchmarks.tasks import TASKS, Question, is_task_file
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer

__all__ = ["TaskResult", "BenchmarkReport", "evaluate_tasks", "evaluate_questions", "evaluate_answers",
           "format_report", "TASKS", "BATCHING"]

BATCHING = ("packed", "padded", "none")
Progress = Callable[[int], None]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, like numpy.argmax


def default_batching(model: GPT) -> str:
    """Packed rows (the shared prefix once) on a CPU, where compute is what counts (measured: docs/benchmarks.md);
    one row per choice on a GPU, where wide batches of plain causal attention are cheap (not yet measured there)."""
    return "padded" if model.tok_emb.weight.device.type == "cuda" else "packed"


def score_questions(model: GPT, tokenizer: Tokenizer, questions: Sequence[Question], batching: str = "packed",
                    precision: str = "fp32", progress: Progress | None = None,
                    batch_tokens: int = 4096) -> list[list[float]]:
    """Per item, per choice log-likelihoods; `progress(count)` as items finish; batches of at most `batch_tokens`
    tokens (padding included)."""
    if batching not in BATCHING:
        raise OwnLLMError(f"batching must be one of {', '.join(BATCHING)}")
    encoded = [[encode_pair(tokenizer, c, k) for c, k in zip(q.contexts, q.continuations)] for q in questions]
    if batching != "none":
        scores = score_items(model, encoded, mode=batching, batch_tokens=batch_tokens, precision=precision,
                             on_items=progress)
        return [[logprob for logprob, _ in item] for item in scores]
    order = sorted(range(len(questions)), key=lambda i: -max(len(a) + len(b) for a, b in encoded[i]))
    logprobs: list[list[float]] = [[] for _ in questions]
    for index in order:  # longest first: memory peaks early
        logprobs[index] = score_choices(model, encoded[index], precision=precision)
        if progress is not None:
            progress(1)
    return logprobs


def evaluate_questions(model: GPT, tokenizer: Tokenizer, questions: Sequence[Question], name: str = "task",
                       reports_acc_norm: bool = True, shots: int = 0, precision: str = "fp32",
                       show_progress: bool = True, batching: str | None = None,
                       progress: Progress | None = None, f1: str | None = None) -> TaskResult:
    """Score every multiple-choice question: acc (and acc_norm), their stderr, chance; the harness's f1 where
    `f1` is "binary" or "macro"."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    with tqdm(total=len(questions), desc=name, unit="item", disable=not show_progress or progress is not None,
              dynamic_ncols=True, leave=False) as bar:
        logprobs = score_questions(model, tokenizer, questions, batching or default_batching(model), precision,
                                   progress or bar.update)
    model.train(was_training)
    predictions = [_argmax(lp) for lp in logprobs]
    correct = [float(p == q.answer) for p, q in zip(predictions, questions)]
    correct_norm = [float(_argmax([x / max(n, 1) for x, n in zip(lp, q.norm_lengths)]) == q.answer)
                    for lp, q in zip(logprobs, questions)]
    n = len(questions)
    acc = sum(correct) / n
    chance = sum(1 / len(q.continuations) for q in questions) / n
    return TaskResult(task=name, n=n, acc=acc, acc_stderr=mean_stderr(correct),
                      acc_norm=sum(correct_norm) / n if reports_acc_norm else None,
                      acc_norm_stderr=mean_stderr(correct_norm) if reports_acc_norm else None,
                      chance=chance, centered=(acc - chance) / (1 - chance), seconds=time.perf_counter() - start,
                      shots=shots, logprobs=logprobs,
                      f1=f1_score([q.answer for q in questions], predictions, f1,
                                  max(len(q.continuations) for q in questions)) if f1 else None)


def evaluate_answers(model: GPT, tokenizer: Tokenizer, items: Sequence[Answer], name: str, shots: int = 0,
                     batch_size: int = 16, progress: Progress | None = None) -> TaskResult:
    """Generate every answer (greedy, batched) and score it by the task's exact match."""
    start = time.perf_counter()
    spec = GENERATIVE[name]
    answers = generate_answers(model, tokenizer, items, spec, batch_size=batch_size, on_batch=progress)
    scores = [exact_match(answer, item.targets, spec) for answer, item in zip(answers, items)]
    score = sum(scores) / len(scores)
    return TaskResult(task=name, n=len(items), acc=score, acc_stderr=mean_stderr(scores), acc_norm=None,
                      acc_norm_stderr=None, chance=0.0, centered=score, seconds=time.perf_counter() - start,
                      shots=shots, metric="exact_match", answers=answers)


def score_task(model: GPT, tokenizer: Tokenizer, name: str, items: Sequence[Any], shots: int, precision: str,
               batching: str | None, progress: Progress | None) -> TaskResult:
    """One expanded task's result (its kind decides how it is scored)."""
    if is_generative(name):
        return evaluate_answers(model, tokenizer, items, name, shots=shots, progress=progress)
    spec = TASKS.get(name)
    return evaluate_questions(model, tokenizer, items, name=task_label(name), reports_acc_norm=reports_acc_norm(name),
                              shots=shots, precision=precision, batching=batching, progress=progress,
                              f1=spec.f1 if spec else None)


def evaluate_tasks(model: GPT, tokenizer: Tokenizer, tasks: Sequence[str], shots: int = 0,
                   limit: int | None = None, seed: int = 1234, data_dir: str | Path | None = None,
                   precision: str = "fp32", show_progress: bool = True,
                   on_result: Callable[[TaskResult], None] | None = None, batching: str | None = None,
                   cache_dir: str | Path | None = None, settings: dict[str, Any] | None = None) -> BenchmarkReport:
    """Score `model` on built-in tasks, groups (`mmlu`) and/or JSONL task files, `shots`-shot, first `limit` items
    (of each MMLU subject).

    Every task is read before any is scored, so a missing data set or a bad file fails at once. With `cache_dir`,
    results of the same `settings` (what identifies the model; shots, limit, seed and precision are added) are
    taken from there and each new one is written there as soon as it is done."""
    names = expand_tasks(tasks)
    if limit is not None and limit < 1:
        raise OwnLLMError("--limit must be at least 1")
    folder = Path(cache_dir) if cache_dir is not None else None
    key = {**(settings or {}), "shots": shots, "limit": limit, "seed": seed, "precision": precision}
    keys = {name: {**key, "file": file_stamp(name)} if is_task_file(name) else key for name in names}
    cached = {name: load_cached(folder, task_label(name), keys[name]) for name in names}
    loaded = {name: load_items(name, limit=limit, shots=shots, seed=seed, data_dir=data_dir)
              for name in names if cached[name] is None}
    results = []
    with tqdm(total=sum(len(items) for items in loaded.values()), unit="item", dynamic_ncols=True,
              disable=not show_progress) as bar:
        for name in names:
            result = cached[name]
            if result is None:
                bar.set_description(task_label(name))
                result = score_task(model, tokenizer, name, loaded[name], shots, precision, batching, bar.update)
                if folder is not None:
                    save_cached(folder, result, keys[name])
            result.group = None  # set again below for the groups asked for this time
            results.append(result)
            if on_result is not None:
                on_result(result)
    return BenchmarkReport(with_groups(results, tasks))


def file_stamp(name: str) -> str:
    """A digest of an own task file: an edited file is scored again, not taken from the cache."""
    try:
        return hashlib.sha256(Path(name).read_bytes()).hexdigest()
    except OSError:
        return ""


def with_groups(results: list[TaskResult], asked: Sequence[str]) -> list[TaskResult]:
    """The results with each asked group's rows (`mmlu`, `mmlu_macro`) in front of its members."""
    out = list(results)
    for group in (name for name in asked if name in GROUPS):
        members = [r for r in results if r.task in GROUPS[group]()]
        for member in members:
            member.group = group
        first = next(index for index, result in enumerate(out) if result is members[0])
        out[first:first] = group_results(group, members)
    return out


def training_hook(tasks: str, limit: int, tokenizer: Tokenizer | None, precision: str = "fp32",
                  data_dir: str | Path | None = None) -> Callable[[GPT], dict[str, dict[str, float | None]]]:
    """What pretraining's `--eval-tasks` runs at each evaluation: the first `limit` items of each task (read once,
    here), scored 0-shot -> {task: {"acc": ..., "acc_norm": ...}}."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    check_task_names(names)
    if limit < 1:
        raise OwnLLMError("--eval-limit must be at least 1")
    loaded = {name: load_items(name, limit=limit, data_dir=data_dir) for name in expand_tasks(names)}

    def score(model: GPT) -> dict[str, dict[str, float | None]]:
        results = {}
        for name, items in loaded.items():
            result = score_task(model, tokenizer, name, items, 0, precision, None, None)
            results[task_label(name)] = {"acc": result.acc, "acc_norm": result.acc_norm}
        return results

    return score
