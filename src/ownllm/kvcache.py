"""KV caches: the protocol the model talks to, a cache for one batch, and the server's pool of slots.

    cache = model.new_cache(batch_size=2, max_len=256)        # a KVCache
    logits = model(prompt_ids, cache=cache)                   # prefill; then one token at a time, same cache

    pool = SlotPool(model.config, slots=16, max_len=4096, device="cpu", dtype=torch.float32,   # one per request
                    on_demand=True)                                   # storage grows with use, up to 16 x 4096
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

MIN_ON_DEMAND = 256  # positions an on-demand pool allocates at least when it grows


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

    An `on_demand` pool starts empty and grows its storage as requests need rows and positions (`reserve`, called
    by both views), and gives it back when idle (`release`): a server's memory follows its use, not the worst
    case of `slots` x `max_len` (3 GB for SmolLM2-135M at 16 x 4096 in fp32).
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, on_demand: bool = False) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._per_position = (config.n_layer, config.kv_heads, config.head_size)
        self.slots, self.max_len, self.on_demand = slots, max_len, on_demand
        self.lengths = [0] * slots
        self.keys, self.values = self._allocate(0, 0) if on_demand else self._allocate(slots, max_len)

    def _allocate(self, rows: int, length: int) -> tuple[Tensor, Tensor]:
        layers, kv_heads, head_size = self._per_position
        shape = (layers, rows, kv_heads, length, head_size)
        # Zeros, not empty: a masked key's value still enters the attention product (times a weight of 0).
        return (torch.zeros(shape, device=self.device, dtype=self.dtype),
                torch.zeros(shape, device=self.device, dtype=self.dtype))

    def reserve(self, rows: int, length: int) -> None:
        """Make room for slots [0, rows) holding `length` positions each. A pool made `on_demand` grows its storage
        (at least doubling, from `MIN_ON_DEMAND` positions, up to `slots` x `max_len`) and keeps what it holds; a
        full-size pool has the room already."""
        have_rows, have_length = self.keys.shape[1], self.keys.shape[3]
        if rows <= have_rows and length <= have_length:
            return
        if rows > self.slots or length > self.max_len:
            raise ValueError(f"the KV pool holds {self.slots} slots of {self.max_len} positions, "
                             f"not {rows} of {length}")
        if rows > have_rows:
            rows = min(self.slots, max(rows, 2 * have_rows))
        if length > have_length:
            length = min(self.max_len, max(length, 2 * have_length, MIN_ON_DEMAND))
        keys, values = self._allocate(max(rows, have_rows), max(length, have_length))
        keys[:, :have_rows, :, :have_length] = self.keys
        values[:, :have_rows, :, :have_length] = self.values
        self.keys, self.values = keys, values

    def release(self) -> None:
        """Give an on-demand pool's storage back (the server calls this when no request is running)."""
        if self.on_demand:
            self.keys, self.values = self._allocate(0, 0)
            self.lengths = [0] * self.slots

    def prefill_view(self, first: int, count: int = 1, length: int = 1) -> KVCache:
        """An empty cache for slots [first, first + count) writing straight into them (earlier contents are
        overwritten), with room for prompts of `length` tokens. Prompts of different lengths go in right-padded:
        under the causal mask a real token never sees the padding after it, and the padding's keys lie beyond the
        row's length, hidden and then overwritten by decoding."""
        self.reserve(first + count, length)
        for slot in range(first, first + count):
            self.lengths[slot] = 0
        return KVCache.over(self.keys[:, first:first + count], self.values[:, first:first + count])

    def decode_view(self, active: int) -> "DecodeView":
        self.reserve(active, max(self.lengths[:active]) + 1)
        return DecodeView(self, active)

    def move(self, source: int, target: int) -> None:
        """Copy the sequence in slot `source` into slot `target` (to keep active rows contiguous)."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length

    def nbytes(self) -> int:
        """Memory held by the pool's keys and values now."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def limit_bytes(self) -> int:
        """Memory the pool's keys and values take when every slot holds `max_len` positions."""
        layers, kv_heads, head_size = self._per_position
        return 2 * layers * self.slots * kv_heads * self.max_len * head_size * self.keys.element_size()


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
