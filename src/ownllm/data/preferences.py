"""Preference pairs for DPO: a prompt, a preferred (chosen) and a dispreferred (rejected) answer.

    pairs = read_preferences("prefs.json")                 # JSON list or JSON Lines
    batches = PreferenceBatches(pairs, get_template("chatml"), tokenizer, block_size=1024, batch_size=8, seed=1)
    inputs, targets, lengths, index = batches.batch(step)  # pure in the step (exact resume)

Formats, one record per pair (the two may be mixed in one file):
- the book's (LLMs-from-scratch ch07 bonus): {"instruction", "input" (optional), "chosen", "rejected"} (any other
  field, e.g. "output", is ignored);
- trl's standard: {"prompt": "...", "chosen": "...", "rejected": "..."};
- trl's conversational: {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}, or
  without "prompt", "chosen" and "rejected" as whole conversations that differ only in their last (assistant)
  message, which is the answer.

A pair that carries nothing (chosen = rejected: no preference and no gradient; an empty answer or prompt; a repeat)
is skipped and counted in one line (`ownllm.data.records`); a malformed record is an error naming its item.

The prompt is rendered with the run's chat template exactly as instruction tuning renders it, each answer ends with
the template's end marker (as learned in instruction tuning), and only answer tokens are counted (prompt and padding
targets are -100): a sequence's log-probability is the sum over its answer tokens.

A batch of B pairs holds inputs and targets [B, 2, T] (row 0 chosen, row 1 rejected, right-padded), the real lengths
[B, 2] and the pairs' indices [B] (to look up their reference log-probabilities). Pairs whose prompt leaves no room
in the context for an answer are dropped; answers that run past it are cut (`dropped`, `truncated` say how many).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ownllm.chat_templates import Conversation, Message, Template, encode_prompt
from ownllm.data.batching import EpochBatches, fixed_batches
from ownllm.data.instructions import IGNORE, parse_messages, read_records
from ownllm.data.records import Location, keep_informative
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import Tokenizer


@dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # ends with a user message
    chosen: str
    rejected: str


# ---- reading ------------------------------------------------------------------------------------------------------

def _answer(where: Location, field: str, value: object) -> tuple[Conversation, str]:
    """(the conversation before the answer, the answer) of a chosen/rejected field."""
    if isinstance(value, str):
        return [], value
    messages = parse_messages(where, field, value)
    if messages[-1].role != "assistant":
        raise OwnLLMError(f"{where}: the last message of {field!r} must be the assistant's answer")
    return messages[:-1], messages[-1].content


def _prompt(where: Location, record: dict) -> Conversation:
    if "prompt" in record:
        prompt = record["prompt"]
        return [Message("user", prompt)] if isinstance(prompt, str) else parse_messages(where, "prompt", prompt)
    if "instruction" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise OwnLLMError(f"{where}: fields 'instruction' and 'input' must be strings")
        return [Message("user", instruction, extra)]
    return []


def parse_pair(where: Location, record: object) -> PreferencePair:
    """One pair from a record in either format; `where` names it in errors ("prefs.json item 3"). A pair that
    carries nothing (`pair_is_empty`) is returned as it is: the reader skips it."""
    if not isinstance(record, dict):
        raise OwnLLMError(f"{where}: expected a JSON object")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise OwnLLMError(f"{where}: missing field {field!r} (a pair needs a prompt or instruction, chosen and "
                              "rejected)")
    chosen_context, chosen = _answer(where, "chosen", record["chosen"])
    rejected_context, rejected = _answer(where, "rejected", record["rejected"])
    if chosen_context != rejected_context:
        raise OwnLLMError(f"{where}: 'chosen' and 'rejected' continue different conversations")
    prompt = _prompt(where, record) + chosen_context
    if not prompt:
        raise OwnLLMError(f"{where}: missing field 'prompt' (or 'instruction')")
    if prompt[-1].role != "user":
        raise OwnLLMError(f"{where}: the prompt must end with a user message")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def pair_is_empty(pair: PreferencePair) -> str | None:
    """Why a pair carries no preference (`ownllm.data.records`), or None: equal answers give DPO no gradient."""
    if not pair.prompt[-1].content.strip():
        return "with an empty prompt"
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "with an empty answer"
    if pair.chosen.strip() == pair.rejected.strip():
        return "with chosen = rejected"
    return None


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from a JSON list or JSON Lines file in the book's or trl's format; pairs that carry nothing
    (chosen = rejected, an empty answer or prompt, a repeat) are skipped and counted (`ownllm.data.records`)."""
    path = Path(path)
    return keep_informative(path, read_records(path), "pairs", parse_pair, why_empty=pair_is_empty,
                            key=lambda pair: (tuple(pair.prompt), pair.chosen, pair.rejected))


# ---- encoding and batches -----------------------------------------------------------------------------------------

def encode_pair(pair: PreferencePair, template: Template, tokenizer: Tokenizer) -> tuple[list[int], list[int],
                                                                                         list[int]]:
    """Token ids of the prompt, the chosen answer and the rejected answer, each answer closed by the template's
    end marker, encoded piece by piece as instruction tuning encodes a conversation."""
    prompt = encode_prompt(pair.prompt, template, tokenizer)
    return prompt, tokenizer.encode(pair.chosen + template.end), tokenizer.encode(pair.rejected + template.end)


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int],
             block_size: int) -> tuple[list[int], list[int]] | None:
    """The two sequences (prompt + answer) cut to block_size + 1 tokens (the inputs are all but the last), or None
    when the prompt leaves no room for an answer token."""
    limit = block_size + 1
    if not prompt or len(prompt) >= limit:
        return None
    return (prompt + chosen)[:limit], (prompt + rejected)[:limit]


def collate_pairs(rows: Sequence[tuple[list[int], list[int], int]], index: Sequence[int],
                  pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs and targets [B, 2, T] (targets shifted by one, IGNORE on the prompt and padding), lengths [B, 2] and
    the pairs' indices [B], from (chosen ids, rejected ids, prompt length) rows."""
    width = max(len(ids) for chosen, rejected, _ in rows for ids in (chosen, rejected)) - 1
    inputs = torch.full((len(rows), 2, width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), 2, width), IGNORE, dtype=torch.long)
    lengths = torch.zeros((len(rows), 2), dtype=torch.long)
    for i, (chosen, rejected, prompt_length) in enumerate(rows):
        for j, ids in enumerate((chosen, rejected)):
            n = len(ids) - 1
            inputs[i, j, :n] = torch.tensor(ids[:-1], dtype=torch.long)
            targets[i, j, prompt_length - 1:n] = torch.tensor(ids[prompt_length:], dtype=torch.long)
            lengths[i, j] = n
    return inputs, targets, lengths, torch.tensor(list(index), dtype=torch.long)


class PreferenceBatches:
    """Encoded pairs; `batch(step)` (length-aware, pure in the step), `eval_batches()` (every pair once)."""

    def __init__(self, pairs: Sequence[PreferencePair], template: Template, tokenizer: Tokenizer, block_size: int,
                 batch_size: int, seed: int = 0) -> None:
        self.rows: list[tuple[list[int], list[int], int]] = []
        self.truncated = 0
        for pair in pairs:
            prompt, chosen, rejected = encode_pair(pair, template, tokenizer)
            fitted = fit_pair(prompt, chosen, rejected, block_size)
            if fitted is not None:
                self.truncated += len(prompt) + max(len(chosen), len(rejected)) > block_size + 1
                self.rows.append((*fitted, len(prompt)))
        self.dropped = len(pairs) - len(self.rows)
        if not self.rows:
            raise OwnLLMError(f"no preference pair has room for an answer within the context window ({block_size} "
                              "tokens): the prompts are too long for this model")
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.batch_size = batch_size
        self.lengths = [max(len(c), len(r)) for c, r, _ in self.rows]
        self.plan = EpochBatches(self.lengths, batch_size, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def _collate(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return collate_pairs([self.rows[i] for i in indices], indices, self.pad_id)

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._collate(self.plan.indices(step))

    def eval_batches(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        return [self._collate(b) for b in fixed_batches(self.lengths, self.batch_size)]


def pair_tokens(batch: Sequence[Tensor]) -> int:
    """Real (non-padding) input tokens of a preference batch, for tokens/s."""
    return int(batch[2].sum())
