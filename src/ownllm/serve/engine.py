"""The inference engine behind the server: concurrent requests decoded together, one token per step each.

    engine = Engine(model, tokenizer, max_batch=16, max_queue=64)
    engine.start()
    request = engine.submit(prompt_ids, SamplingOptions(max_new_tokens=50, temperature=0), on_event=print)
    # on_event gets ("text", piece) as text becomes final, then ("done", finish_reason, usage) or
    # ("error", message, http_status): 500 for a failure, 503 when the engine stops (Ctrl-C) with the request unfinished

A worker thread owns the model. Each loop it prefills newly arrived requests (together, into free slots of the KV
pool) and then runs one batched decoding step over every running request: decoding a token reads every weight
once whatever the batch, so 16 requests cost little more than one. Every request samples with its own options and
its own random generator, so its tokens do not depend on what else is running. Requests finish by the rules of
`ownllm.decoding.Continuation.accept`: at the end-of-text token, at a stop string, after max tokens, or when the
context window is full; a cancelled request (a client that
went away) frees its slot at the next step. `on_event` is called on the worker thread and must not block: the
server hands events to its event loop, so a slow client never stalls the others.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ownllm.errors import OwnLLMError
from ownllm.decoding import Continuation, IncrementalText, SamplingOptions, prefill, sample_next, step
from ownllm.kvcache import SlotPool
from ownllm.model import GPT
from ownllm.quantize import model_dtype
from ownllm.tokenizer import Tokenizer

Event = tuple[Any, ...]
DEFAULT_CONTEXT = 4096  # tokens per slot unless --context says otherwise: open models declare windows of 32k+


class EngineBusy(OwnLLMError):
    """Too many requests are running and queued; the client should retry later."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False, kw_only=True)
class Request(Continuation):
    """One prompt decoded by the engine: a `Continuation` (tokens, text, the end rules) with its slot, its own
    random generator and where its events go."""

    on_event: Callable[[Event], None]
    generator: torch.Generator
    next_token: int = -1  # sampled, not yet fed to the model
    slot: int = -1
    cancelled: bool = False
    finished: bool = False  # ended, cancelled or failed

    @property
    def generated(self) -> int:
        return len(self.output)


class Engine:
    """Continuous batching over a pool of `max_batch` KV-cache slots, with at most `max_queue` requests waiting."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 context: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise OwnLLMError("--max-batch must be at least 1 and --max-queue at least 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        if context is not None and context < 2:
            raise OwnLLMError("--context must be at least 2 tokens")
        self.context = min(context or min(model.config.block_size, DEFAULT_CONTEXT), model.config.block_size)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pool = SlotPool(model.config, max_batch, self.context, model.tok_emb.weight.device, model_dtype(model),
                             on_demand=True)  # memory grows with the requests running, given back when idle
        self.device = self.pool.device
        self._waiting: deque[Request] = deque()
        self._admitted: list[Request] = []  # taken from the queue, not yet prefilled into a slot
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="ownllm-engine", daemon=True)
        self.cancelled = 0  # requests dropped because their client went away
        self.steps = 0  # decoding steps run, for /health and the benchmarks

    # ---- the caller's side -----------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run the engine on a thread of its own."""
        self._thread.start()
        return self

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Run the engine on the calling thread until `close()` or until `keep_going()` is false (checked twice a
        second while idle). `ownllm serve` runs it on the main thread: PyTorch's CPU kernels ran ~20% slower here
        on a secondary thread, whose OpenMP team competes with the main thread's."""
        self._loop(keep_going)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, prompt: list[int], options: SamplingOptions, on_event: Callable[[Event], None]) -> Request:
        """Queue a request; raises EngineBusy when max_queue requests already wait for a slot."""
        if not prompt:
            raise OwnLLMError("the prompt has no tokens")
        if len(prompt) >= self.context:
            raise OwnLLMError(f"the prompt is {len(prompt)} tokens; the context window is {self.context}")
        seed = options.seed if options.seed is not None else random.getrandbits(63)
        request = Request(prompt=list(prompt), options=options, on_event=on_event,
                          text=IncrementalText(self.tokenizer, options.stop),
                          generator=torch.Generator(device=self.device).manual_seed(seed))
        with self._wake:
            if self._closing:
                raise EngineBusy("the server is shutting down")
            # A finished request's slot is free: it is dropped before the next admission (its client may already
            # have its answer and be sending the next request).
            free = self.max_batch - sum(not r.finished for r in list(self._running))
            if len(self._waiting) + 1 - free > self.max_queue:  # this one would wait beyond the queue's room
                raise EngineBusy(f"the server is busy ({len(self._running)} running, {len(self._waiting)} queued): "
                                 "retry later")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away); its slot is freed at the next step. A finished request is left as
        it is (a stream that ended normally is not a cancellation)."""
        if request.finished:
            return
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def pool_bytes(self) -> int:
        """Memory held by the KV-cache pool now (it grows with the requests running, up to `pool_limit_bytes`)."""
        return self.pool.nbytes()

    def pool_limit_bytes(self) -> int:
        """Memory the KV-cache pool takes when all `max_batch` requests hold `context` tokens."""
        return self.pool.limit_bytes()

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "queued": len(self._waiting), "slots": self.max_batch,
                "context": self.context, "steps": self.steps, "cancelled": self.cancelled,
                "kv_cache_bytes": self.pool_bytes()}

    # ---- the worker thread -----------------------------------------------------------------------------------

    def _loop(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        try:
            with torch.inference_mode():
                while self._next_step(keep_going):
                    pass
        finally:  # closed, or interrupted (Ctrl-C on the main thread): no request is left waiting for ever
            with self._wake:
                self._closing = True
                # Ctrl-C can land between admitting requests and prefilling them: they are owed an answer too.
                unfinished = [r for r in dict.fromkeys([*self._running, *self._admitted, *self._waiting])
                              if not r.finished]
            for request in unfinished:
                request.finished = True
                self._emit(request, ("error", "the server is shutting down", 503))

    def _next_step(self, keep_going: Callable[[], bool]) -> bool:
        """Admit waiting requests, prefill them and run one decoding step; False when the engine should stop."""
        with self._wake:
            while not self._closing and not self._waiting and not self._running and keep_going():
                self._wake.wait(timeout=0.5)
            if self._closing or not keep_going():
                return False
            admitted = []
            while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                request = self._waiting.popleft()
                if not request.cancelled:
                    admitted.append(request)
            self._admitted = admitted
        try:
            for group in _prefill_groups(admitted):
                self._prefill(group)
            self._admitted = []
            self._drop_finished()
            if self._running:
                self._decode_step()
                self._drop_finished()
            if not self._running and not self._waiting:
                self.pool.release()
        except Exception as error:  # a bug or out of memory: fail the requests in flight, keep serving
            for request in [*self._running, *admitted]:
                if not request.finished:
                    request.finished = True
                    self._emit(request, ("error", f"{type(error).__name__}: {error}", 500))
            self._running, self._admitted = [], []
        return True

    def _prefill(self, requests: list[Request]) -> None:
        """Prompts into consecutive free slots in one forward pass (right-padded), and each one's first token."""
        first = len(self._running)
        for offset, request in enumerate(requests):
            request.slot = first + offset
            self._running.append(request)
        logits = prefill(self.model, self.pool, first, [r.prompt for r in requests])
        for row, request in enumerate(requests):
            self._accept(request, int(sample_next(logits[row:row + 1], request.options, request.generator)))

    def _decode_step(self) -> None:
        running = self._running
        tokens = torch.tensor([r.next_token for r in running], device=self.device)
        logits = step(self.model, self.pool, tokens)  # the compiled step where `serve --compile` set one
        self.steps += 1
        if all(r.options.temperature == 0 for r in running):  # all greedy: one argmax for the batch
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [int(sample_next(logits[row:row + 1], r.options, r.generator)) for row, r in enumerate(running)]
        for request, token in zip(running, tokens):
            self._accept(request, token)

    def _accept(self, request: Request, token: int) -> None:
        """Take a sampled token: emit its text, or finish the request."""
        if request.cancelled:
            request.finished = True
            return
        piece = request.accept(token, self.tokenizer.eot_id,
                               context_full=self.pool.lengths[request.slot] >= self.context)
        if piece:
            self._emit(request, ("text", piece))
        if request.finish_reason is not None:
            return self._finish(request, request.finish_reason)
        request.next_token = token

    def _finish(self, request: Request, reason: str) -> None:
        request.finished = True
        rest = request.text.flush()
        if rest:
            self._emit(request, ("text", rest))
        self._emit(request, ("done", reason, Usage(len(request.prompt), request.generated)))

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # the receiver is gone (its event loop closed): nobody to tell
            request.cancelled = True

    def _drop_finished(self) -> None:
        """Free the slots of finished and cancelled requests, moving the last rows into the gaps."""
        for slot in range(len(self._running) - 1, -1, -1):
            request = self._running[slot]
            if not (request.finished or request.cancelled):
                continue
            if request.cancelled:
                self.cancelled += 1
            last = len(self._running) - 1
            if slot != last:
                self.pool.move(last, slot)
                self._running[slot] = self._running[last]
                self._running[slot].slot = slot
            self._running.pop()


def _prefill_groups(requests: list[Request], max_padding: float = 0.5) -> list[list[Request]]:
    """Requests sorted by prompt length, cut into groups whose right-padding adds at most `max_padding` of their
    real tokens (so one long prompt does not make many short ones pay for its length)."""
    groups: list[list[Request]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt)):
        if groups:
            group = groups[-1]
            real = sum(len(r.prompt) for r in group) + len(request.prompt)
            if len(request.prompt) * (len(group) + 1) <= (1 + max_padding) * real:
                group.append(request)
                continue
        groups.append([request])
    return groups
