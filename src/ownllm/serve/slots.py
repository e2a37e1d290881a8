"""A KV cache pool for continuous batching: one row ("slot") per running request, each with its own length.

Rows 0..active-1 are the requests being decoded; a request that finishes hands its slot to the last active row
(one row copied), so a decoding step always works on the contiguous rows [0, active) without gathering.
Requests arriving together are prefilled together into free slots through `prefill_view`; then `decode_view`
lets one model call
append one token to every active row, at each row's own position, with a mask that hides the other rows'
unused tail of the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ownllm.model import GPT, KVCache


class SlotPool:
    """Keys and values [layers, slots, kv_heads, max_len, head_size] and each slot's length."""

    def __init__(self, model: GPT, slots: int, max_len: int, dtype: torch.dtype) -> None:
        config = model.config
        device = model.tok_emb.weight.device
        shape = (config.n_layer, slots, config.kv_heads, max_len, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.slots, self.max_len, self.device = slots, max_len, device

    def prefill_view(self, first: int, count: int = 1) -> KVCache:
        """An empty cache for slots [first, first + count) writing straight into them (earlier contents are
        overwritten). Prompts of different lengths go in right-padded: under the causal mask a real token never
        sees the padding after it, and the padding's keys lie beyond the row's length, hidden and then
        overwritten by decoding."""
        for slot in range(first, first + count):
            self.lengths[slot] = 0
        return KVCache.over(self.keys[:, first:first + count], self.values[:, first:first + count])

    def decode_view(self, active: int) -> "DecodeView":
        return DecodeView(self, active)

    def move(self, source: int, target: int) -> None:
        """Copy the sequence in slot `source` into slot `target` (to keep active rows contiguous)."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length


class DecodeView:
    """The cache protocol of `ownllm.model.KVCache` for one token appended to each of rows [0, active)."""

    def __init__(self, pool: SlotPool, active: int) -> None:
        self.pool, self.active = pool, active
        lengths = pool.lengths[:active]
        self.positions = torch.tensor(lengths, device=pool.device)  # where each row's token goes
        self.end = max(lengths) + 1
        self.length = self.end - 1  # for the model's bounds check: the longest row
        self.max_len = pool.max_len
        self.aligned = min(lengths) == self.length  # every row at the same position: plain slices, no mask
        self._rows = None if self.aligned else torch.arange(active, device=pool.device)

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        if self.aligned:
            keys[: self.active, :, self.length] = k[:, :, 0]
            values[: self.active, :, self.length] = v[:, :, 0]
        else:
            keys[self._rows, :, self.positions] = k[:, :, 0]
            values[self._rows, :, self.positions] = v[:, :, 0]
        return keys[: self.active, :, : self.end], values[: self.active, :, : self.end]

    def attention_mask(self, time: int, device: torch.device) -> Tensor | None:
        if time != 1:
            raise ValueError("a decode step appends exactly one token per row")
        if self.aligned:
            return None  # every row sees every key: no mask needed
        key_pos = torch.arange(self.end, device=device)
        return (key_pos[None, :] <= self.positions[:, None]).view(self.active, 1, 1, self.end)

    def advance(self, time: int) -> None:
        for row in range(self.active):
            self.pool.lengths[row] += time
