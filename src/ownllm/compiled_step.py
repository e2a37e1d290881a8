"""A decode step compiled with torch.compile: one graph for every step, that reads the KV cache and never writes it.

    from ownllm.compiled_step import use_compiled_step
    use_compiled_step(run.model)            # every decode of this model (generate, chat, ask, serve) takes this step
    ownllm generate runs/smol --prompt "..." --compile

At batch 1 a decode step is ~30 thin layers of small ops, and on a CPU Python and operator dispatch cost as much as
the matrix-vector products. `torch.compile` (inductor's C++ code generation) turns the step into one graph with the
norm / RoPE / residual / attention ops fused. Two choices keep that graph cheap:
- **The cache is an input the graph only reads.** A graph that writes its inputs (`index_put` into the cache)
  is made functional by torch.compile: it copies each layer's cache, writes the copy and copies it back, which
  moved more bytes per token than the weights (SmolLM2: 12.5 ms a step against 7.0 without the writes). So each
  layer attends over the cached keys (those before the row's position) and its new key separately, merged in one
  softmax (`attend_with_new_token`), and the graph returns the new keys and values; one `index_put` after the
  graph writes every layer's at once.
- **Lengths are dynamic.** The graph takes the cache sliced to the longest row's length and the active rows, both
  marked dynamic, so it is compiled once (batch 1 specialised, then once for batches of several rows) rather than
  per length, and never reads the unused tail of a preallocated cache.
Prefill stays eager and batched. The first step compiles (seconds to a minute; inductor keeps what it built on disk
for later processes; `compile_seconds` says how long, and the CLI prints it once); where compilation fails (no C++
compiler, an op inductor lacks) the step warns once and runs the same code eagerly. Its logits equal the eager
step's up to the order of float sums (tests/test_compiled_step.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ownllm.decoding import prefill
from ownllm.kvcache import SlotPool
from ownllm.outputs import warn
from ownllm.quantize import model_dtype


def attend_with_new_token(q: Tensor, keys: Tensor, values: Tensor, k: Tensor, v: Tensor, seen: Tensor,
                          scale: float | None) -> Tensor:
    """Attention of one new query per row q [rows, heads, 1, dim] over the cached keys/values [rows, kv_heads,
    length, dim] that `seen` [rows, 1, 1, length] allows, and over the row's own new key/value k, v [rows, kv_heads,
    1, dim]: the softmax of the two score sets together, without concatenating them. Query head h reads key head
    h // (heads // kv_heads), as SDPA's grouped-query attention does. Computed in float32 (SDPA's accumulation),
    returned in q's dtype."""
    rows, heads, _, dim = q.shape
    kv_heads, dtype = keys.shape[1], q.dtype
    q, keys, values, k, v = (t.float() for t in (q, keys, values, k, v))
    scale = dim ** -0.5 if scale is None else scale
    q = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    cached = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [rows, kv_heads, group, length]
    cached = cached.masked_fill(~seen.view(rows, 1, 1, -1), float("-inf"))
    own = (q * k.view(rows, kv_heads, 1, dim)).sum(-1, keepdim=True) * scale  # [rows, kv_heads, group, 1]
    top = torch.maximum(cached.amax(-1, keepdim=True), own)
    cached, own = (cached - top).exp(), (own - top).exp()
    out = (torch.matmul(cached, values) + own * v.view(rows, kv_heads, 1, dim)) / (cached.sum(-1, keepdim=True) + own)
    return out.reshape(rows, heads, 1, dim).to(dtype)


class ReadOnlyView:
    """The `Cache` protocol for one token per row at `positions` [rows] over cached keys/values [layers, rows,
    kv_heads, length, head_size] that it reads and never writes: the model's attention layers call `attend`, and the
    new keys and values are collected in `new_keys` / `new_values` (one [rows, kv_heads, head_size] per layer)."""

    length = 0  # the caller checks the bounds; a Python int here would be a constant of the graph

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions
        self.max_len = keys.shape[3]
        self.new_keys: list[Tensor] = []
        self.new_values: list[Tensor] = []

    def attention_mask(self, time: int, device: torch.device, window: int | None = None) -> Tensor:
        """Which cached positions each row's query sees [rows, 1, 1, length]: those before its own position (and,
        with `window`, less than `window` places before it); its own new key it always sees."""
        key_pos = torch.arange(self.max_len, device=device)[None, :]
        seen = key_pos < self.positions[:, None]
        if window is not None:
            seen = seen & (key_pos > self.positions[:, None] - window)
        return seen.view(-1, 1, 1, self.max_len)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, seen: Tensor, scale: float | None) -> Tensor:
        self.new_keys.append(k[:, :, 0])
        self.new_values.append(v[:, :, 0])
        return attend_with_new_token(q, self.keys[layer], self.values[layer], k, v, seen, scale)

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("a read-only view attends through `attend`")

    def advance(self, time: int) -> None:
        """Nothing: the pool's lengths are counted outside the graph (`CompiledStep.__call__`)."""


def read_only_step(model: nn.Module, keys: Tensor, values: Tensor, tokens: Tensor,
                   positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token logits [rows, vocab] after `tokens` [rows] at `positions` [rows], the cache keys/values [layers,
    rows, kv_heads, length, head_size] holding every row's earlier positions; and the new keys and values [layers,
    rows, kv_heads, head_size] to store at `positions`."""
    view = ReadOnlyView(keys, values, positions)
    logits = model(tokens.view(-1, 1), cache=view, positions=positions.view(-1, 1))[:, -1]
    return logits, torch.stack(view.new_keys), torch.stack(view.new_values)


class CompiledStep:
    """`step(pool, tokens)`: `decoding.step` for the pool's rows [0, len(tokens)), compiled (or eager,
    `compile=False`)."""

    def __init__(self, model: nn.Module, compile: bool = True,
                 on_compiled: Callable[[float], None] | None = None) -> None:
        self.model, self.on_compiled = model, on_compiled
        self.function = torch.compile(read_only_step) if compile else read_only_step
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._graphs: set[bool] = set()  # batch 1 and batches of several rows compile a graph each

    def __call__(self, pool: SlotPool, tokens: Tensor) -> Tensor:
        rows = len(tokens)
        lengths = pool.lengths[:rows]
        pool.reserve(rows, max(lengths) + 1)
        positions = torch.tensor(lengths, device=pool.device)
        # The cached part every row may read, at least 2 positions (a dimension of 1 would be specialised).
        length = min(max(max(lengths), 2), pool.keys.shape[3])
        keys, values = pool.keys[:, :rows, :, :length], pool.values[:, :rows, :, :length]
        graph = rows > 1
        started = time.perf_counter()
        logits, new_keys, new_values = self._run(keys, values, tokens, positions)
        if graph not in self._graphs:  # the first call of a graph compiles it
            self._graphs.add(graph)
            seconds = time.perf_counter() - started
            self.compile_seconds = (self.compile_seconds or 0.0) + seconds
            if self.compiled and self.on_compiled is not None:
                self.on_compiled(seconds)
        index = torch.arange(rows, device=pool.device)
        pool.keys[:, index, :, positions] = new_keys.transpose(0, 1)  # [rows, layers, kv_heads, head_size]
        pool.values[:, index, :, positions] = new_values.transpose(0, 1)
        for row in range(rows):
            pool.lengths[row] += 1
        return logits

    def warm_up(self) -> float:
        """Compile both graphs now (batch 1, and several rows) instead of in the first requests (the server calls
        this before it listens); the seconds it took."""
        started = time.perf_counter()
        device = self.model.tok_emb.weight.device
        with torch.inference_mode():
            for rows in (1, 2):
                # A pool with more rows and positions than the step reads: the graph then takes any strides of
                # the server's pool, which grows (a pool the step reads whole would tie the strides to the sizes).
                pool = SlotPool(self.model.config, rows + 1, 8, device, model_dtype(self.model))
                prefill(self.model, pool, 0, [[0, 0]] * rows)
                self(pool, torch.zeros(rows, dtype=torch.long, device=device))
        return time.perf_counter() - started

    def _run(self, keys: Tensor, values: Tensor, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.compiled:
            for tensor in (keys, values):  # one graph for every cache length (and batch size above 1)
                torch._dynamo.maybe_mark_dynamic(tensor, 3)
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
            for tensor in (tokens, positions):  # the rows: a static count here would specialise the cache's too
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            try:
                return self.function(self.model, keys, values, tokens, positions)
            except Exception as error:  # inductor unavailable here: the same step, eagerly
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warn(f"--compile: torch.compile failed ({reason[:200]}); decoding eagerly")
                self.compiled, self.function = False, read_only_step
        return self.function(self.model, keys, values, tokens, positions)


def use_compiled_step(model: nn.Module, compile: bool = True,
                      on_compiled: Callable[[float], None] | None = None) -> CompiledStep:
    """Make every decode of `model` through ownllm.decoding and the server's engine take the read-only step
    (compiled unless told otherwise); returns it (its `compile_seconds`). `on_compiled(seconds)` hears of each
    compilation."""
    step = CompiledStep(model, compile, on_compiled)
    model.decode_step = step
    return step
