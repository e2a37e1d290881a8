"""Instruction data: Alpaca records and chat conversations -> prompt template -> token ids with the prompt masked.

    conversations = read_instructions("instructions.json")      # Alpaca JSON/JSONL or chat JSONL ({"messages": ...})
    template = get_template("alpaca")                           # or "chatml" (ownllm.chat_templates)
    ids, labels = encode_conversation(conversations[0], template, tokenizer, mask_prompt=True)
    batches = InstructionBatches(conversations, template, tokenizer, block_size=256, batch_size=8)

The templates, and `encode_prompt` (the prompt alone, as chat feeds it), are in `ownllm.chat_templates`: training
and chat write a conversation the same way.

Labels: -100 on the prompt (unless mask_prompt=False) and on padding; each assistant response and the one end marker
after it (`<|endoftext|>` for alpaca, `<|im_end|>` for chatml) are learned, so the model learns to stop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ownllm.chat_templates import ROLES, Conversation, Message, Template
from ownllm.data.batching import EpochBatches, fixed_batches
from ownllm.data.records import Location, keep_informative
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import Tokenizer, read_text_file

IGNORE = -100


# ---- reading ------------------------------------------------------------------------------------------------------

def read_records(path: Path) -> list[tuple[Location, object]]:
    """(location, record) pairs from a JSON list or JSON Lines file (items and lines numbered from 1)."""
    text = read_text_file(path)  # a missing, binary or non-UTF-8 file (or a folder): one clear error
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise OwnLLMError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        return [(Location(path, number, "item"), record) for number, record in enumerate(data, start=1)]
    one_record_expected = path.suffix.lower() != ".json" and "\n" not in stripped.strip()  # JSON Lines, one line
    if stripped.startswith("{") and not one_record_expected and _is_one_json_object(stripped):
        raise OwnLLMError(f"{path}: holds one JSON object, not a list of examples; write a JSON list of records "
                          "([{...}, {...}]) or JSON Lines (one record per line)")
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append((Location(path, number), json.loads(line)))
            except json.JSONDecodeError as error:
                raise OwnLLMError(f"{path}:{number}: unreadable line (not JSON: {error.msg})") from None
    return records


def _is_one_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def parse_messages(where: Location, field: str, value: object) -> Conversation:
    """A JSON list of {"role", "content"} objects (field `field` of the record at `where`) as Messages; anything
    else is an OwnLLMError naming the record and the field."""
    if not isinstance(value, list) or not value:
        raise OwnLLMError(f"{where}: field {field!r} must be a non-empty list of messages")
    messages = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise OwnLLMError(f"{where}: each message needs a role (system, user or assistant) and a content "
                              f"string (field {field!r})")
        messages.append(Message(m["role"], m["content"]))
    return messages


def _conversation(where: Location, record: object) -> Conversation:
    if not isinstance(record, dict):
        raise OwnLLMError(f"{where}: expected a JSON object")
    if "messages" in record:
        return parse_messages(where, "messages", record["messages"])
    for field in ("instruction", "output"):
        if not isinstance(record.get(field), str):
            raise OwnLLMError(f"{where}: missing field {field!r} (Alpaca records need instruction and output)")
    return [Message("user", record["instruction"], str(record.get("input") or "")),
            Message("assistant", record["output"])]


def conversation_is_empty(conversation: Conversation) -> str | None:
    """Why a conversation carries nothing to learn from (`ownllm.data.records`), or None."""
    if not any(m.role == "assistant" and m.content.strip() for m in conversation):
        return "with no answer"
    if any(m.role == "user" and not m.content.strip() for m in conversation):
        return "with an empty instruction"
    return None


def read_instructions(path: str | Path) -> list[Conversation]:
    """Conversations from Alpaca JSON/JSONL (instruction, input, output) or chat JSONL ({"messages": [...]}); those
    that carry nothing (no answer, an empty instruction, a repeat) are skipped and counted (`ownllm.data.records`)."""
    path = Path(path)
    return keep_informative(path, read_records(path), "examples", _conversation, why_empty=conversation_is_empty,
                            key=tuple)


# ---- encoding and batches -----------------------------------------------------------------------------------------

def encode_conversation(conversation: Sequence[Message], template: Template, tokenizer: Tokenizer,
                        mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (IGNORE on the prompt when `mask_prompt`); the
    sequence starts with the tokenizer's begin-of-sequence token where it asks for one, as every prompt does."""
    ids: list[int] = tokenizer.starting_sequence([])
    labels: list[int] = [IGNORE] * len(ids)
    for text, learned in template.pieces(conversation):
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if (learned or not mask_prompt) else [IGNORE] * len(piece)
    return ids, labels


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
            block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs [batch, T], targets [batch, T] (labels shifted by one) and lengths [batch], right-padded; padding
    targets are IGNORE. A row longer than block_size + 1 tokens is cut."""
    rows = [(ids[: block_size + 1], labels[: block_size + 1]) for ids, labels in rows]
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        targets[i, : len(ids) - 1] = torch.tensor(labels[1:], dtype=torch.long)
    return inputs, targets, torch.tensor([len(ids) - 1 for ids, _ in rows], dtype=torch.long)


def _context_too_small(rows: Sequence[tuple[list[int], list[int]]], block_size: int) -> str:
    """Why no example fits, and the --block-size that would hold half of the examples whole."""
    prompt_lengths = sorted(next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
                            for _, labels in rows)
    median_length = sorted(len(ids) for ids, _ in rows)[len(rows) // 2]
    suggested = 1 << max(0, median_length - 1).bit_length()
    return (f"no instruction example has a response within the context window ({block_size} tokens): the shortest "
            f"prompt takes {prompt_lengths[0]} tokens and half the examples need {median_length}; fine-tune a base "
            f"model pretrained with --block-size {suggested} or more (the mini preset has 256)")


class InstructionBatches:
    """Encoded conversations; `batch(step)` (length-aware, pure in the step) and `eval_batches()`."""

    def __init__(self, conversations: Sequence[Conversation], template: Template, tokenizer: Tokenizer,
                 block_size: int, batch_size: int, mask_prompt: bool = True, seed: int = 0) -> None:
        rows = [encode_conversation(c, template, tokenizer, mask_prompt) for c in conversations]
        # an example whose response starts beyond the context has nothing to learn: it is left out
        self.rows = [r for r in rows if any(label != IGNORE for label in r[1][1: block_size + 1])]
        self.dropped = len(rows) - len(self.rows)
        if not self.rows:
            raise OwnLLMError(_context_too_small(rows, block_size))
        self.truncated = sum(len(ids) > block_size + 1 for ids, _ in self.rows)
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.block_size, self.batch_size = block_size, batch_size
        self.lengths = [min(len(ids), block_size + 1) for ids, _ in self.rows]
        self.plan = EpochBatches(self.lengths, batch_size, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def _collate(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        return collate([self.rows[i] for i in indices], self.pad_id, self.block_size)

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        return self._collate(self.plan.indices(step))

    def eval_batches(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [self._collate(b) for b in fixed_batches(self.lengths, self.batch_size)]


def real_tokens(batch: Sequence[Tensor]) -> int:
    """Real (non-padding) input tokens of an (inputs, targets, lengths) batch, for tokens/s."""
    return int(batch[2].sum())
