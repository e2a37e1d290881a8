"""Batched log-likelihood scoring: the continuations of many items in one forward pass.

    scores = score_items(model, [[pair, pair, pair, pair], [pair, pair]], mode="packed")
    scores[0][2]        # (log-likelihood, is_greedy) of item 0's third choice: the same as score_choices_greedy

Two layouts, each a batch of right-padded rows:
- `packed` (keeps the shared-prefix saving): one row per item, its shared token prefix once and then the rest of
  every choice one after the other. Each token sees the prefix and the earlier tokens of its own choice only (an
  attention mask per row) and takes the position it would have alone, so every choice is scored exactly as if it
  ran alone, while the prefix (the question, a few-shot block) runs once. An item whose packed row is longer than
  the context window is laid out `padded`.
- `padded`: one row per choice (context + continuation), causal attention, no mask; more tokens, the plain
  attention path.
Rows are sorted by length and cut into batches of at most `batch_tokens` tokens (padding included). Only the
positions that predict a continuation token go through the LM head. A choice longer than the window is scored
alone, cut from the left as the harness cuts it (ownllm.benchmarks.scoring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ownllm.benchmarks.scoring import TokenPair, common_prefix_length, score_alone_greedy
from ownllm.device import autocast
from ownllm.model import GPT

MODES = ("packed", "padded")
PADDING_SEGMENT = -2
PREFIX_SEGMENT = -1


@dataclass
class Row:
    """One batch row: tokens with their positions and segments (-1 the shared prefix, i choice i), and where each
    choice's continuation is read: (item, choice, index of the token predicting its first id, its ids)."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    reads: list[tuple[int, int, int, list[int]]] = field(default_factory=list)


def pack(item: int, pairs: Sequence[tuple[int, TokenPair]], share: bool) -> Row:
    """Choices (choice index, pair) of one item in one row, the shared prefix once when `share`."""
    inputs = [(context + continuation)[:-1] for _, (context, continuation) in pairs]
    shared = 0
    if share:
        shared = max(0, min(common_prefix_length(inputs), min(len(c) for _, (c, _) in pairs)) - 1)
    row = Row(inputs[0][:shared], list(range(shared)), [PREFIX_SEGMENT] * shared)
    for segment, ((choice, (context, continuation)), ids) in enumerate(zip(pairs, inputs)):
        rest = ids[shared:]
        row.reads.append((item, choice, len(row.tokens) + len(context) - 1 - shared, continuation))
        row.tokens += rest
        row.positions += range(shared, shared + len(rest))
        row.segments += [segment] * len(rest)
    return row


def layout(items: Sequence[Sequence[TokenPair]], mode: str, window: int) -> tuple[list[Row], list[tuple[int, int]]]:
    """The rows of every item, and the (item, choice) pairs too long for the window (scored alone)."""
    rows: list[Row] = []
    alone: list[tuple[int, int]] = []
    for item, pairs in enumerate(items):
        fits = [(choice, pair) for choice, pair in enumerate(pairs) if len(pair[0]) + len(pair[1]) - 1 <= window]
        alone += [(item, choice) for choice, pair in enumerate(pairs) if len(pair[0]) + len(pair[1]) - 1 > window]
        if not fits:
            continue
        packed = pack(item, fits, share=True) if mode == "packed" else None
        if packed is not None and len(packed.tokens) <= window:
            rows.append(packed)
        else:
            rows += [pack(item, [choice], share=False) for choice in fits]
    return rows, alone


def batches(rows: Sequence[Row], batch_tokens: int) -> list[list[Row]]:
    """Rows longest first, in batches whose padded size (rows x longest) stays within `batch_tokens`."""
    ordered = sorted(rows, key=lambda row: -len(row.tokens))
    out: list[list[Row]] = []
    for row in ordered:
        if out and (len(out[-1]) + 1) * len(out[-1][0].tokens) <= batch_tokens:
            out[-1].append(row)
        else:
            out.append([row])
    return out


class RowMask:
    """The cache protocol (ownllm.kvcache.Cache) as the model asks it, holding no keys: it hands the model one
    attention mask for a whole packed batch."""

    def __init__(self, mask: Tensor, max_len: int, positions: Tensor | None = None) -> None:
        self.mask, self.max_len, self.length, self.positions = mask, max_len, 0, positions

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def attention_mask(self, time: int, device: torch.device, window: int | None = None) -> Tensor | None:
        """The batch's mask; for a local layer (Gemma 3), only keys less than `window` positions back as well."""
        if window is None or self.positions is None:
            return self.mask
        recent = self.positions[:, None, :] > self.positions[:, :, None] - window
        itself = torch.eye(self.positions.shape[1], dtype=torch.bool, device=self.positions.device)[None]
        return self.mask & (recent | itself).unsqueeze(1)

    def advance(self, time: int) -> None:
        pass


def row_mask(positions: Tensor, segments: Tensor) -> Tensor:
    """[batch, 1, time, time]: a query sees earlier positions of the shared prefix and of its own segment (and
    itself, so padding rows stay finite)."""
    earlier = positions[:, None, :] <= positions[:, :, None]
    same = (segments[:, None, :] == PREFIX_SEGMENT) | (segments[:, None, :] == segments[:, :, None])
    itself = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)[None]
    return ((earlier & same) | itself).unsqueeze(1)


def run_batch(model: GPT, rows: Sequence[Row], precision: str) -> list[tuple[int, int, float, bool]]:
    """One forward pass over `rows`: (item, choice, log-likelihood, is_greedy) for every read."""
    device = model.tok_emb.weight.device
    width = max(len(row.tokens) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), PADDING_SEGMENT, dtype=torch.long)
    for index, row in enumerate(rows):
        count = len(row.tokens)
        tokens[index, :count] = torch.tensor(row.tokens)
        positions[index, :count] = torch.tensor(row.positions)
        segments[index, :count] = torch.tensor(row.segments)
    tokens, positions, segments = tokens.to(device), positions.to(device), segments.to(device)
    plain = all(set(row.segments) == {0} for row in rows)  # one choice a row: the causal path, no mask
    cache = None if plain else RowMask(row_mask(positions, segments), model.config.block_size, positions)
    picks, targets, sizes, reads = [], [], [], []
    for index, row in enumerate(rows):
        for item, choice, first, continuation in row.reads:
            picks += [(index, first + offset) for offset in range(len(continuation))]
            targets += continuation
            sizes.append(len(continuation))
            reads.append((item, choice))
    rows_at, cols_at = (torch.tensor(axis, device=device) for axis in zip(*picks))
    with autocast(device, precision):
        hidden = model.hidden_states(tokens, positions=None if plain else positions, cache=cache)
        logits = model.lm_head(hidden[rows_at, cols_at])
    logprobs = F.log_softmax(logits.float(), dim=-1)
    wanted = torch.tensor(targets, device=device)
    chosen = logprobs.gather(-1, wanted[:, None])[:, 0].split(sizes)
    greedy = (logprobs.argmax(-1) == wanted).split(sizes)
    return [(item, choice, float(lp.sum()), bool(g.all())) for (item, choice), lp, g in zip(reads, chosen, greedy)]


@torch.inference_mode()
def score_items(model: GPT, items: Sequence[Sequence[TokenPair]], mode: str = "packed", batch_tokens: int = 4096,
                precision: str = "fp32",
                on_items: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) of every choice of every item, batched (see the module docstring);
    `on_items(count)` after each batch with the number of items it finished."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if any(not continuation for pairs in items for _, continuation in pairs):
        raise ValueError("every continuation needs at least one token")
    rows, alone = layout(items, mode, model.config.block_size)
    scores: list[list[tuple[float, bool]]] = [[(0.0, False)] * len(pairs) for pairs in items]
    waiting = [len(pairs) for pairs in items]

    def done(item: int, choice: int, score: tuple[float, bool]) -> int:
        scores[item][choice] = score
        waiting[item] -= 1
        return int(waiting[item] == 0)

    for item, choice in alone:
        finished = done(item, choice, score_alone_greedy(model, items[item][choice], precision))
        if on_items is not None and finished:
            on_items(finished)
    for batch in batches(rows, batch_tokens):
        scored = run_batch(model, batch, precision)
        finished = sum(done(item, choice, (lp, greedy)) for item, choice, lp, greedy in scored)
        if on_items is not None:
            on_items(finished)
    return scores
