"""Labelled texts for classification: CSV, TSV (header or not) and JSONL in, padded batches out.

    data = read_labelled("sms.tsv")                        # columns detected; `label<TAB>text` lines work as is
    data = read_labelled("reviews.csv", text_column="review", label_column="stars")
    train, val, test = split_examples(data.examples, val_fraction=0.1, test_fraction=0.2, seed=1)
    batches = ClassificationBatches(train, tokenizer, labels=["ham", "spam"], max_length=128, batch_size=8)
    ids, lengths, label_ids = batches.batch(step)          # right-padded; lengths mark the real tokens

Columns: by name (a header row) or, in a file without a header, by number (1 = first column). Left to detect, the
label column is the one with the fewest distinct values and the text column the longest of the others. Any
label strings work; the mapping to class ids is kept in the run. Every problem with a line (not UTF-8, a wrong
number of fields, bad JSON, a missing column) is an `OwnLLMError` naming the file and line; a line that carries
nothing (an empty text or label, a repeat of an earlier text with its label) is skipped and counted
(`ownllm.data.records`).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ownllm.data.batching import EpochBatches, fixed_batches
from ownllm.data.records import Location, keep_informative
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import Tokenizer

TEXT_NAMES = ("text", "sentence", "message", "sms", "review", "content", "document", "body", "input")
LABEL_NAMES = ("label", "labels", "class", "category", "sentiment", "target", "y")


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str  # "file:line", for error messages


@dataclass
class LabelledData:
    path: Path
    examples: list[Example]
    text_column: str
    label_column: str


# ---- reading ------------------------------------------------------------------------------------------------------

def _decoded_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line, decoded as strict UTF-8 and split on '\\n' only."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OwnLLMError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OwnLLMError(f"{path}: is a directory, not a data file") from None
    if b"\x00" in raw[:8192]:
        raise OwnLLMError(f"{path}: looks like a binary file, not CSV, TSV or JSON Lines text")
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise OwnLLMError(f"{path}:{number}: unreadable line (not UTF-8); convert the file with "
                              f"`iconv -f latin1 -t utf-8`") from None
        text = text.removesuffix("\r")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if text.strip():
            lines.append((number, text))
    if not lines:
        raise OwnLLMError(f"{path}: no examples (the file is empty)")
    return lines


def _rows_delimited(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    lines = _decoded_lines(path)
    if delimiter == "\t":  # no quoting in TSV: a quote is part of the text (as in the SMS Spam Collection)
        return [(number, line.split("\t")) for number, line in lines]
    rows = []
    for number, line in lines:
        try:
            fields = next(csv.reader(io.StringIO(line)))
        except csv.Error as error:
            raise OwnLLMError(f"{path}:{number}: unreadable CSV line ({error})") from None
        rows.append((number, fields))
    return rows


def _is_header(fields: Sequence[str], wanted: Sequence[str | None]) -> bool:
    names = {f.strip().lower() for f in fields}
    named = [w.lower() for w in wanted if w and not w.isdigit()]
    if named:
        return all(w in names for w in named)
    return bool(names & set(TEXT_NAMES)) and bool(names & set(LABEL_NAMES))


def _detect(columns: Sequence[str], values: dict[str, list[str]], text: str | None, label: str | None,
            path: Path) -> tuple[str, str]:
    lower = {c.lower(): c for c in columns}
    for given in (text, label):
        if given is not None and given.lower() not in lower:
            raise OwnLLMError(f"{path}: no column {given!r} (columns: {', '.join(columns)})")
    text = lower[text.lower()] if text else next((lower[n] for n in TEXT_NAMES if n in lower), None)
    label = lower[label.lower()] if label else next((lower[n] for n in LABEL_NAMES if n in lower), None)
    if label is None:
        candidates = [c for c in columns if c != text]
        label = min(candidates, key=lambda c: (len(set(values[c])), sum(map(len, values[c]))))
    if text is None:
        candidates = [c for c in columns if c != label]
        if not candidates:
            raise OwnLLMError(f"{path}: needs a text column and a label column")
        text = max(candidates, key=lambda c: sum(map(len, values[c])))
    if text == label:
        raise OwnLLMError(f"{path}: the text and label columns are the same ({text!r})")
    return text, label


def _read_delimited(path: Path, delimiter: str, text: str | None, label: str | None) -> LabelledData:
    rows = _rows_delimited(path, delimiter)
    header = _is_header(rows[0][1], [text, label])
    columns = [f.strip() for f in rows[0][1]] if header else [str(i + 1) for i in range(len(rows[0][1]))]
    body = rows[1:] if header else rows
    if not body:
        raise OwnLLMError(f"{path}: no examples after the header line")
    # two tab-separated columns and more tabs in a line: the text held tabs (TSV has no quoting)
    merge = delimiter == "\t" and len(columns) == 2
    for number, fields in body:
        if len(fields) < len(columns) or (len(fields) > len(columns) and not merge):
            raise OwnLLMError(f"{path}:{number}: expected {len(columns)} fields, found {len(fields)}")
    regular = [fields for _, fields in body if len(fields) == len(columns)] or [body[0][1][:2]]
    values = {c: [fields[i] for fields in regular] for i, c in enumerate(columns)}
    text_col, label_col = _detect(columns, values, text, label, path)
    label_first = columns.index(label_col) == 0
    pairs = []
    for number, fields in body:
        if len(fields) > len(columns):
            fields = [fields[0], "\t".join(fields[1:])] if label_first else ["\t".join(fields[:-1]), fields[-1]]
        row = dict(zip(columns, fields))
        pairs.append((Location(path, number), (row[text_col], row[label_col])))
    return LabelledData(path, _informative_examples(path, pairs), text_col, label_col)


def _read_jsonl(path: Path, text: str | None, label: str | None) -> LabelledData:
    records = []
    for number, line in _decoded_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise OwnLLMError(f"{path}:{number}: unreadable line (not JSON: {error.msg})") from None
        if not isinstance(record, dict):
            raise OwnLLMError(f"{path}:{number}: expected a JSON object per line")
        records.append((number, record))
    columns = list(next((record for _, record in records if record), {}))
    if not columns:
        raise OwnLLMError(f"{path}: no examples (every record is empty)")
    values = {c: [_as_label(r.get(c, "")) for _, r in records] for c in columns}
    text_col, label_col = _detect(columns, values, text, label, path)
    pairs = []
    for number, record in records:
        for column in (text_col, label_col):
            if column not in record and record:
                raise OwnLLMError(f"{path}:{number}: missing field {column!r}")
        pairs.append((Location(path, number), (str(record.get(text_col, "")), _as_label(record.get(label_col, "")))))
    return LabelledData(path, _informative_examples(path, pairs), text_col, label_col)


def _as_label(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def _informative_examples(path: Path, pairs: list[tuple[Location, tuple[str, str]]]) -> list[Example]:
    """Examples from (location, (text, label)): those with an empty text or label, or repeating an earlier text
    and label, are skipped and counted (`ownllm.data.records`)."""
    def example(where: Location, row: tuple[str, str]) -> Example:
        return Example(text=row[0], label=row[1].strip(), source=str(where))

    def why_empty(example: Example) -> str | None:
        return "with an empty text" if not example.text.strip() else "with no label" if not example.label else None

    return keep_informative(path, pairs, "examples", example, why_empty=why_empty,
                            key=lambda e: (e.text, e.label))


def read_labelled(path: str | Path, text_column: str | None = None, label_column: str | None = None) -> LabelledData:
    """Read labelled texts from a .csv, .tsv/.txt (tab-separated) or .jsonl file; see the module docstring."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path, text_column, label_column)
    if suffix == ".csv":
        return _read_delimited(path, ",", text_column, label_column)
    if suffix in (".tsv", ".txt", ".tab"):
        return _read_delimited(path, "\t", text_column, label_column)
    first = _decoded_lines(path)[0][1]
    return _read_delimited(path, "\t" if "\t" in first or "," not in first else ",", text_column, label_column)


# ---- splits and balance -------------------------------------------------------------------------------------------

def split_examples(examples: Sequence[Example], val_fraction: float, test_fraction: float,
                   seed: int) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with `seed`, then cut into train / val / test by the fractions (the book: 0.7 / 0.1 / 0.2)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise OwnLLMError("--val-fraction and --test-fraction must be in [0, 1) and leave some training data")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test, n_val = round(len(shuffled) * test_fraction), round(len(shuffled) * val_fraction)
    train_end = len(shuffled) - n_test - n_val
    return shuffled[:train_end], shuffled[train_end:train_end + n_val], shuffled[train_end + n_val:]


def undersample(examples: Sequence[Example], seed: int) -> list[Example]:
    """Keep a seeded random sample of every class as large as the smallest class (order otherwise kept)."""
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)
    smallest = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    keep = sorted(i for indices in by_label.values() for i in rng.sample(indices, smallest))
    return [examples[i] for i in keep]


def class_weights(examples: Sequence[Example], labels: Sequence[str]) -> list[float]:
    """Inverse-frequency weights n / (classes * count), 1.0 on average over examples."""
    counts = Counter(e.label for e in examples)
    return [len(examples) / (len(labels) * counts[label]) if counts[label] else 0.0 for label in labels]


def check_labels(examples: Sequence[Example], labels: Sequence[str]) -> None:
    """Every label of `examples` must be one of `labels` (the training labels)."""
    known = set(labels)
    for example in examples:
        if example.label not in known:
            raise OwnLLMError(f"{example.source}: label {example.label!r} does not occur in the training data "
                              f"(training labels: {', '.join(labels)})")


# ---- batches ------------------------------------------------------------------------------------------------------

def encode_texts(texts: Sequence[str], tokenizer: Tokenizer, max_length: int,
                 append_eot: bool = True) -> list[list[int]]:
    """Token ids of each text, cut to `max_length` (keeping the start), an end-of-text token last when asked."""
    end = [tokenizer.eot_id] if append_eot and tokenizer.eot_id is not None else []
    room = max_length - len(end)
    return [(ids[:room] + end) or end or [0] for ids in tokenizer.encode_batch(list(texts))]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """ids [batch, longest] right-padded with `pad_id`, and lengths [batch]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


class ClassificationBatches:
    """Encoded examples and their class ids; `batch(step)` for training, `eval_batches()` for evaluation."""

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, labels: Sequence[str], max_length: int,
                 batch_size: int, seed: int = 0, append_eot: bool = True) -> None:
        index = {label: i for i, label in enumerate(labels)}
        self.ids = encode_texts([e.text for e in examples], tokenizer, max_length, append_eot)
        self.labels = [index[e.label] for e in examples]
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.batch_size = batch_size
        self.plan = EpochBatches([len(r) for r in self.ids], batch_size, seed=seed)

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        ids, lengths = pad_right([self.ids[i] for i in indices], self.pad_id)
        return ids, lengths, torch.tensor([self.labels[i] for i in indices], dtype=torch.long)

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.collate(self.plan.indices(step))

    def eval_batches(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [self.collate(b) for b in fixed_batches([len(r) for r in self.ids], self.batch_size)]
