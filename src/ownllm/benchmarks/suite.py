"""Every benchmark by name: which kind it is (multiple choice, generative, an MMLU subject, an own JSONL file), what
a name such as `mmlu` stands for, and how its items are read.

    expand_tasks(["arc_easy", "mmlu"])     # ["arc_easy", "mmlu_abstract_algebra", ..., "mmlu_world_religions"]
    load_items("nq_open", limit=10)        # Answer items; "arc_easy" -> Question items

Kinds: `ownllm.benchmarks.tasks` (multiple choice and own files), `ownllm.benchmarks.mmlu`,
`ownllm.benchmarks.generative`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ownllm.benchmarks.generative import GENERATIVE, Answer, load_generative
from ownllm.benchmarks.mmlu import PREFIX, SUBJECTS, is_mmlu_task, load_subject, subject_tasks
from ownllm.benchmarks.tasks import TASKS, Question, is_task_file, load_task
from ownllm.errors import OwnLLMError

GROUPS = {"mmlu": subject_tasks}


def known_tasks() -> list[str]:
    return [*TASKS, *GENERATIVE, "mmlu", "mmlu_<subject>"]


def check_task_names(names: Sequence[str]) -> None:
    """Fail on a name that is no built-in task, group, MMLU subject or task file, listing the known tasks."""
    for name in names:
        if name in TASKS or name in GENERATIVE or name in GROUPS or is_mmlu_task(name) or is_task_file(name):
            continue
        if name.startswith(PREFIX):
            raise OwnLLMError(f"unknown MMLU subject {name[len(PREFIX):]!r}; known: {', '.join(SUBJECTS)}")
        raise OwnLLMError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())} (or a .jsonl file of "
                          "{\"context\", \"choices\", \"answer\"} lines)")


def expand_tasks(names: Sequence[str]) -> list[str]:
    """The tasks to score: groups replaced by their members, each task once, in order."""
    check_task_names(names)
    out: list[str] = []
    for name in names:
        for member in GROUPS[name]() if name in GROUPS else [name]:
            if member not in out:
                out.append(member)
    return out


def is_generative(name: str) -> bool:
    return name in GENERATIVE


def load_items(name: str, limit: int | None = None, shots: int = 0, seed: int = 1234,
               data_dir: str | Path | None = None) -> list[Question] | list[Answer]:
    """The first `limit` items of one (expanded) task, with `shots` examples in front of each."""
    if is_mmlu_task(name):
        return load_subject(name[len(PREFIX):], limit=limit, shots=shots, data_dir=data_dir)
    if is_generative(name):
        return load_generative(name, limit=limit, shots=shots, seed=seed, data_dir=data_dir)
    return load_task(name, limit=limit, shots=shots, seed=seed, data_dir=data_dir)


def task_label(name: str) -> str:
    """The name results go under: the task's, or a task file's stem."""
    return Path(name).stem if is_task_file(name) else name


def reports_acc_norm(name: str) -> bool:
    spec = TASKS.get(name)
    return spec.reports_acc_norm if spec else is_task_file(name)
