"""Length-aware batches of variable-length examples, as a pure function of the micro-step.

    plan = EpochBatches(lengths, batch_size=8, seed=1)
    indices = plan.indices(step)          # the example indices of micro-step `step` (any step, any order)

Each epoch shuffles the examples with (seed, epoch), sorts them by length inside windows of `window` batches and
cuts the windows into batches, then shuffles the batch order. Short examples are padded to their neighbours'
length rather than to the longest in the data, and the batch of a step depends only on the step: resuming a run
gives exactly the batches an uninterrupted run would have had.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch


class EpochBatches:
    """Example indices per micro-step; `batches_per_epoch` is the same every epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, window: int = 32) -> None:
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        chunk = batch_size * window
        n = len(self.lengths)
        self.batches_per_epoch = sum(-(-min(chunk, n - start) // batch_size) for start in range(0, n, chunk))
        self._epoch = lru_cache(maxsize=2)(self._plan)

    def _plan(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        chunk = self.batch_size * self.window
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            window = sorted(order[start:start + chunk], key=lambda i: self.lengths[i])
            batches.extend(window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size))
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.batches_per_epoch)
        return self._epoch(epoch)[position]


def fixed_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: every example once, in length order (little padding), deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
