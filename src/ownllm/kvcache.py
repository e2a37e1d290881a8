"""KV caches: the protocol the model talks to, a cache for one batch, and the server's pool of slots.

    cache = model.new_cache(batch_size=2, max_len=256)        # a KVCache
    logits = model(prompt_ids, cache=cache)                   # prefill; then one token at a time, same cache

    pool = SlotPool(model.config, slots=16, max_len=4096, device="cpu", dtype=torch.float32)   # one per request
    model.hidden_states(ids, cache=pool.prefill_view(first, count))      # prompts into free slots
    view = pool.decode_view(active)                                       # one token for each active slot
    logits = model(tokens, cache=view, positions=view.positions.view(-1, 1))

The model knows a cache only through `Cache`: `length` (positions written so far, the longest row's), `max_len`,
`store` (write this step's keys and values of a layer, get all so far), `attention_mask` (for the new queries)
and `advance` (count the new positions once every layer has stored them). `KVCache` holds one batch whose rows
share a length (shorter prompts left-padded, marked False in `key_valid`); `SlotPool` gives each row its own
length, which continuous batching needs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ownllm.config import ModelConfig


class Cache(Protocol):
    """What the model asks of a KV cache (see the module docstring)."""

    length: int
    max_len: int

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def attention_mask(self, time: int, device: torch.device, window: int | None = None) -> Tensor | None: ...

    def advance(self, time: int) -> None: ...


class KVCache:
    """Pre-allocated keys and values of every layer for `batch_size` sequences of up to `max_len` tokens.

    `length` counts the positions written so far (the same for every row; rows shorter than others are
    left-padded and marked False in `key_valid`).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def over(cls, keys: Tensor, values: Tensor) -> "KVCache":
        """An empty cache writing into existing storage [layers, batch, kv_heads, max_len, head_size] (views of a
        larger pool, say) instead of allocating its own."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = keys, values
        cache.max_len = keys.shape[3]
        cache.key_valid = torch.ones(keys.shape[1], cache.max_len, dtype=torch.bool, device=keys.device)
        cache.length = 0
        return cache

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k/v for `layer` after the cached ones; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def attention_mask(self, time: int, device: torch.device, window: int | None = None) -> Tensor | None:
        """Boolean [batch, 1, time, keys] mask for `time` new queries, or None where SDPA's causal path applies;
        with `window`, a query sees only the keys less than `window` places before it (the window counts padding,
        as transformers' does)."""
        start = self.length
        key_valid = self.key_valid[:, : start + time]
        if (time == 1 or start == 0) and window is None and bool(key_valid.all()):
            return None  # SDPA's causal path (prefill) or one new token that sees every cached key
        query_pos = torch.arange(start, start + time, device=device).view(time, 1)
        key_pos = torch.arange(start + time, device=device).view(1, start + time)
        causal = key_pos <= query_pos
        if window is not None:
            causal = causal & (key_pos > query_pos - window)
        # A query always sees itself, so rows that are pure padding stay finite.
        allowed = (causal & key_valid[:, None, :]) | (key_pos == query_pos)
        return allowed.unsqueeze(1)

    def advance(self, time: int) -> None:
        """Count `time` newly stored positions (called by the model after every layer has stored them)."""
        self.length += time


class SlotPool:
    """Keys and values [layers, slots, kv_heads, max_len, head_size] and each slot's length: one slot per running
    request of the server.

    Rows 0..active-1 are the requests being decoded; a request that finishes hands its slot to the last active row
    (one row copied), so a decoding step always works on the contiguous rows [0, active) without gathering.
    Requests arriving together are prefilled together into free slots through `prefill_view` (a `KVCache` over
    those slots); then `decode_view` lets one model call append one token to every active row, at each row's own
    position, with a mask that hides the other rows' unused tail of the cache.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        device = torch.device(device)
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

    def nbytes(self) -> int:
        """Memory held by the pool's keys and values."""
        return 2 * self.keys.numel() * self.keys.element_size()


class DecodeView:
    """The `Cache` protocol for one token appended to each of the pool's rows [0, active), each at its own length."""

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

    def attention_mask(self, time: int, device: torch.device, window: int | None = None) -> Tensor | None:
        if time != 1:
            raise ValueError("a decode step appends exactly one token per row")
        if self.aligned and window is None:
            return None  # every row sees every key: no mask needed
        key_pos = torch.arange(self.end, device=device)[None, :]
        seen = key_pos <= self.positions[:, None]
        if window is not None:
            seen = seen & (key_pos > self.positions[:, None] - window)
        return seen.view(self.active, 1, 1, self.end)

    def advance(self, time: int) -> None:
        for row in range(self.active):
            self.pool.lengths[row] += time
