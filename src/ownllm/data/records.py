"""Records that carry nothing: one rule for every reader of examples (instructions, preference pairs, labelled texts,
texts to embed).

    pairs = keep_informative(path, read_records(path), "pairs", parse_pair, why_empty=pair_is_empty,
                             key=lambda pair: (tuple(pair.prompt), pair.chosen, pair.rejected))

A record that carries nothing (an empty one `{}`, a repeat of an earlier record, a pair whose chosen and rejected
answers are equal, an instruction with no answer, a blank text) is skipped and counted: one warning line says how
many of how many, why, and which (the first few, by 1-based line or item number). Only a file with nothing left is
refused. A malformed record (not JSON, a missing field, a value of the wrong type) is never skipped: `parse` raises
an OwnLLMError naming the file, the line or item, and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ownllm.errors import OwnLLMError
from ownllm.outputs import warn

R = TypeVar("R")
T = TypeVar("T")
SHOWN = 5  # record numbers listed per reason
DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Location:
    """Where a record is: line `number` of a line-based file (`path:3`) or item `number` of a JSON list
    (`path item 3`), 1-based."""

    path: Path
    number: int
    unit: str = "line"  # or "item"

    def __str__(self) -> str:
        return f"{self.path}:{self.number}" if self.unit == "line" else f"{self.path} item {self.number}"


def json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a JSON Lines file; a line that is not a JSON object
    is an OwnLLMError naming the file and line."""
    from ownllm.tokenizer import read_text_file

    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise OwnLLMError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict):
            raise OwnLLMError(f"{path}:{number}: not a JSON object")
        yield number, record


def keep_informative(path: str | Path, records: Iterable[tuple[Location, R]], what: str,
                     parse: Callable[[Location, R], T], why_empty: Callable[[T], str | None] = lambda _: None,
                     key: Callable[[T], Hashable] | None = None) -> list[T]:
    """The parsed records of `path` that carry something, in order. `parse` turns a raw record into a value (or
    raises for a malformed one); `why_empty` says why a value carries nothing (None: it does); with `key`, a value
    whose key an earlier one had is a duplicate. Skipped records are told in one warning line; a file with no
    record left is an OwnLLMError. `what` names the records in the plural ("pairs", "examples")."""
    kept: list[T] = []
    skipped: dict[str, list[Location]] = {}
    seen: set[Hashable] = set()
    total = 0
    for location, record in records:
        total += 1
        reason = "empty" if record == {} else None
        value = parse(location, record) if reason is None else None
        if reason is None:
            reason = why_empty(value)
        if reason is None and key is not None:
            identity = key(value)
            reason = DUPLICATE if identity in seen else None
            seen.add(identity)
        if reason is None:
            kept.append(value)
        else:
            skipped.setdefault(reason, []).append(location)
    if total == 0:
        raise OwnLLMError(f"{path}: no {what}")
    if skipped:
        summary = "; ".join(f"{len(where)} {reason} ({_numbers(where)})" for reason, where in skipped.items())
        if not kept:
            raise OwnLLMError(f"{path}: no {what} left: all {total} carry nothing: {summary}")
        warn(f"{path}: skipped {total - len(kept)} of {total} {what} that carry nothing: {summary}")
    return kept


def _numbers(locations: list[Location]) -> str:
    """"items 4, 9" or "line 3": the unit and the first few numbers."""
    unit = locations[0].unit + ("s" if len(locations) > 1 else "")
    shown = ", ".join(str(location.number) for location in locations[:SHOWN])
    return f"{unit} {shown}{', ...' if len(locations) > SHOWN else ''}"
