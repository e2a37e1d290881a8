"""A decode step compiled with torch.compile over the static shapes of a preallocated KV cache.

    from ownllm.compiled_step import use_compiled_step
    use_compiled_step(run.model)            # every decode of this model (generate, chat, ask) now takes this step
    ownllm generate runs/smol --prompt "..." --compile

At batch 1 a decode step is ~30 thin layers of small ops, and on a CPU Python and operator dispatch cost as much as
the matrix-vector products. `torch.compile` (inductor's C++ code generation) turns the step into one graph with the
norm / RoPE / residual ops fused. A graph needs fixed shapes, so the compiled step never slices the cache by its
current length: it writes each row's new key and value at the row's position (`index_put`) and attends over the
whole preallocated cache [max_len] with a mask that hides the positions after the row's own. Prefill stays eager and
batched. The first step compiles (seconds to minutes, once per process and cache shape; `compile_seconds` says how
long, and the CLI prints it once); where compilation fails (no C++ compiler, an op inductor lacks) the step warns
once and runs the same static-shape code eagerly. Its logits equal the eager step's up to the order of float sums
(tests/test_compiled_step.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ownllm.kvcache import SlotPool
from ownllm.outputs import warn


class StaticView:
    """The `Cache` protocol over a pool's whole storage for one token per row at `positions` [rows]: no shape
    depends on a length, so a compiled graph serves every step."""

    length = 0  # the caller checks the bounds (a position < max_len); a Python int here would recompile each step

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions
        self.max_len = keys.shape[3]
        self.rows = torch.arange(keys.shape[1], device=keys.device)

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys[layer, self.rows, :, self.positions] = k[:, :, 0]
        self.values[layer, self.rows, :, self.positions] = v[:, :, 0]
        return self.keys[layer], self.values[layer]

    def attention_mask(self, time: int, device: torch.device) -> Tensor:
        key_pos = torch.arange(self.max_len, device=device)
        return (key_pos[None, :] <= self.positions[:, None]).view(-1, 1, 1, self.max_len)

    def advance(self, time: int) -> None:
        """Nothing: the pool's lengths are counted outside the graph (`CompiledStep.__call__`)."""


def static_step(model: nn.Module, keys: Tensor, values: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
    """Next-token logits [rows, vocab] after appending `tokens` [rows] at `positions` [rows] to the cache storage
    keys/values [layers, rows, kv_heads, max_len, head_size] (written in place)."""
    view = StaticView(keys, values, positions)
    return model(tokens.view(-1, 1), cache=view, positions=positions.view(-1, 1))[:, -1]


class CompiledStep:
    """`step(pool, tokens)`: `decoding.step` for every row of the pool, compiled (or eager, `compile=False`)."""

    def __init__(self, model: nn.Module, compile: bool = True,
                 on_compiled: Callable[[float], None] | None = None) -> None:
        self.model, self.on_compiled = model, on_compiled
        self.function = torch.compile(static_step, dynamic=False) if compile else static_step
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._shapes: set[tuple[int, ...]] = set()

    @staticmethod
    def cache_length(needed: int, window: int, bucket: int = 256) -> int:
        """The cache length to allocate for `needed` positions: rounded up to a multiple of `bucket` (at most the
        context `window`), so that calls of different lengths share a compiled graph."""
        return min(window, -(-needed // bucket) * bucket)

    def __call__(self, pool: SlotPool, tokens: Tensor) -> Tensor:
        if len(tokens) != pool.slots:
            raise ValueError("the compiled step appends one token to every slot of the pool")
        positions = torch.tensor(pool.lengths, device=pool.device)
        shape = tuple(pool.keys.shape)
        started = time.perf_counter()
        logits = self._run(pool, tokens, positions)
        if shape not in self._shapes:  # the first call of a shape compiles
            self._shapes.add(shape)
            seconds = time.perf_counter() - started
            self.compile_seconds = (self.compile_seconds or 0.0) + seconds
            if self.compiled and self.on_compiled is not None:
                self.on_compiled(seconds)
        for row in range(pool.slots):
            pool.lengths[row] += 1
        return logits

    def _run(self, pool: SlotPool, tokens: Tensor, positions: Tensor) -> Tensor:
        if self.compiled:
            try:
                return self.function(self.model, pool.keys, pool.values, tokens, positions)
            except Exception as error:  # inductor unavailable here: the same step, eagerly
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warn(f"--compile: torch.compile failed ({reason[:200]}); decoding eagerly")
                self.compiled, self.function = False, static_step
        return self.function(self.model, pool.keys, pool.values, tokens, positions)


def use_compiled_step(model: nn.Module, compile: bool = True,
                      on_compiled: Callable[[float], None] | None = None) -> CompiledStep:
    """Make every decode of `model` through ownllm.decoding take the static-shape step (compiled unless told
    otherwise); returns it (its `compile_seconds`). `on_compiled(seconds)` hears of each compilation."""
    step = CompiledStep(model, compile, on_compiled)
    model.decode_step = step
    return step
