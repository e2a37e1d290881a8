"""Decoding, tokens -> text: the one core that `generate`, chat (ownllm.chat) and the server's scheduler decode with.

    texts = generate(run.model, run.tokenizer, ["To be or", "Once upon"], max_new_tokens=100, temperature=0.8,
                     top_k=50, top_p=0.95, seed=1, on_text=lambda row, piece: print(piece, end=""))

The pieces, each written once:
- `SamplingOptions`, `filter_logits`, `sample_next`: temperature, top-k, top-p, seed.
- `Continuation.accept`: the rules of when decoding ends: at `<|endoftext|>` (the tokenizer's end of sequence), at a
  stop string, after `max_new_tokens`, or (the server's) when the context window is full.
- `IncrementalText`: streamed text, O(new tokens) per token: it decodes a short window of recent ids, holds back
  incomplete UTF-8 and anything that may start a stop string, and adds up to exactly the full decode.
- `prefill` / `step` over a pool of KV-cache slots (ownllm.kvcache.SlotPool), one slot per sequence, each at its
  own length: prompts of different lengths prefill together (right-padded) and then take one token each per step.
  `BatchDecoder` runs them for one batch from start to end (when a sequence outgrows the context window, the rows
  restart from their most recent half); the server's engine (ownllm.serve.engine) runs them over requests that come
  and go. Both take tokens with `Continuation.accept`.
- `prompt_ids`: a text prompt to ids, with the begin-of-sequence rule of `Tokenizer.starting_sequence`;
  `decode_texts` and `generate`: prompts in, texts out.

Nothing here knows templates or conversations: chat formats, prompts that fit the context and the assistant's
answers are ownllm.chat, which decodes through `decode_texts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ownllm.errors import OwnLLMError
from ownllm.kvcache import SlotPool
from ownllm.model import GPT
from ownllm.quantize import model_dtype
from ownllm.tokenizer import Tokenizer


# ---- sampling -----------------------------------------------------------------------------------------------------

@dataclass
class SamplingOptions:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eot: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise OwnLLMError("--max-new-tokens must not be negative")
        if self.temperature < 0:
            raise OwnLLMError("--temperature must not be negative (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise OwnLLMError("--top-k must be at least 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise OwnLLMError("--top-p must be in (0, 1]")


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (always keeping the best token)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, options: SamplingOptions, generator: torch.Generator | None) -> Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / options.temperature, options.top_k, options.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


# ---- text as tokens arrive ----------------------------------------------------------------------------------------

class IncrementalText:
    """Incremental text of one row: holds back incomplete UTF-8 and anything that may start a stop string.

    Each token costs a decode of a short window (the tokens since the last clean character boundary, after the
    ones before it for context), not of the whole output. `text` is always what the full decode gives, cut at the
    first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.ids: list[int] = []
        self.finished = False
        self._start = self._boundary = 0  # the window is ids[_start:]; ids[:_boundary] ended on whole characters
        self._taken = 0  # characters of the window's text already taken
        self._emitted: list[str] = []
        self._tail = ""  # taken, not yet emitted: it may begin a stop string

    @property
    def text(self) -> str:
        return "".join(self._emitted) + self._tail

    def _new_text(self, final: bool) -> str:
        """Text the window gained since the last call; a trailing incomplete character waits unless `final`."""
        window = self.tokenizer.decode(self.ids[self._start:])
        end = len(window) - (1 if window.endswith("\ufffd") and not final else 0)
        new = window[self._taken:end]
        self._taken = max(self._taken, end)
        if end == len(window):  # whole characters: the window restarts at the previous boundary
            self._start, self._boundary = self._boundary, len(self.ids)
            self._taken = len(self.tokenizer.decode(self.ids[self._start:]))
        return new

    def add(self, token: int) -> str:
        """Append a token; return the newly safe text (may be empty). Sets `finished` at a stop string."""
        self.ids.append(token)
        tail = self._tail + self._new_text(final=False)
        for stop in self.stop:
            at = tail.find(stop)
            if at >= 0:
                tail, self.finished = tail[:at], True
        self._tail = tail
        if self.finished:
            return self.flush()
        safe = max(0, len(tail) - self.hold)
        piece, self._tail = tail[:safe], tail[safe:]
        self._emitted.append(piece)
        return piece

    def flush(self) -> str:
        """Everything not yet emitted (the end of the output: nothing is held back any more)."""
        if not self.finished:
            self._tail += self._new_text(final=True)
        piece, self._tail = self._tail, ""
        self._emitted.append(piece)
        return piece


# ---- the rules of when a continuation ends ------------------------------------------------------------------------

@dataclass(eq=False)
class Continuation:
    """One prompt's continuation being decoded: its tokens, its text (when it has a tokenizer) and, once it has
    ended, why: "stop" (end of text or a stop string) or "length" (max_new_tokens, or the context is full)."""

    prompt: list[int]
    options: SamplingOptions
    text: IncrementalText | None = None
    output: list[int] = field(default_factory=list)  # the tokens generated so far (end of text excluded)
    finish_reason: str | None = None

    def accept(self, token: int, eot_id: int | None, context_full: bool = False) -> str:
        """Take a sampled token; return the text it made final. Sets `finish_reason` when this token ends the
        continuation (then `text.flush()` gives the rest of the text)."""
        if self.options.stop_at_eot and token == eot_id:
            self.finish_reason = "stop"
            return ""
        self.output.append(token)
        piece = self.text.add(token) if self.text is not None else ""
        if self.text is not None and self.text.finished:
            self.finish_reason = "stop"
        elif len(self.output) >= self.options.max_new_tokens or context_full:
            self.finish_reason = "length"
        return piece


# ---- prefill and step over one batch ------------------------------------------------------------------------------

def prefill(model: GPT, pool: SlotPool, first: int, prompts: Sequence[Sequence[int]]) -> Tensor:
    """Prompts into the pool's slots [first, first + len(prompts)) in one forward pass, right-padded (a real token
    never sees the padding after it, and decoding overwrites it); next-token logits [len(prompts), vocab]."""
    ids = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    last = torch.tensor([len(p) - 1 for p in prompts], device=pool.device)
    logits = model(ids.to(pool.device), cache=pool.prefill_view(first, len(prompts), ids.shape[1]),
                   last_index=last)[:, -1]
    for row, prompt in enumerate(prompts):
        pool.lengths[first + row] = len(prompt)
    return logits


def step(model: GPT, pool: SlotPool, tokens: Tensor) -> Tensor:
    """Append `tokens` [active] to the pool's slots [0, active), each at its own position; next-token logits
    [active, vocab]. A model given a compiled step (ownllm.compiled_step.use_compiled_step) takes it."""
    compiled = getattr(model, "decode_step", None)
    if compiled is not None:
        return compiled(pool, tokens)
    view = pool.decode_view(len(tokens))
    return model(tokens.view(-1, 1), cache=view, positions=view.positions.view(-1, 1))[:, -1]


class BatchDecoder:
    """Prefill and step for one batch of sequences decoded together from start to end (a slot each); when the
    longest outgrows the context window, every row restarts from its most recent half."""

    def __init__(self, model: GPT, max_new_tokens: int | None = None) -> None:
        self.model, self.max_new_tokens = model, max_new_tokens
        self.window = model.config.block_size
        self.pool: SlotPool | None = None

    def prefill(self, rows: Sequence[Sequence[int]]) -> Tensor:
        rows = [list(r)[-self.window:] for r in rows]  # a prompt longer than the context keeps its end
        width = max(len(r) for r in rows)
        # Room for what this call can generate, not the whole context: open models declare windows of 32k+ tokens.
        needed = self.window if self.max_new_tokens is None else width + self.max_new_tokens
        length = min(self.window, needed)
        device, dtype = self.model.tok_emb.weight.device, model_dtype(self.model)  # int8 tables: float32 caches
        self.pool = SlotPool(self.model.config, len(rows), length, device, dtype)
        return prefill(self.model, self.pool, 0, rows)

    def step(self, tokens: Tensor, history: Callable[[], Sequence[Sequence[int]]]) -> Tensor:
        """Logits after appending `tokens` [batch]; `history()` gives every row's whole sequence (read only when
        the context is full and the rows restart)."""
        assert self.pool is not None
        if max(self.pool.lengths) >= self.pool.max_len:
            keep = max(1, self.window // 2)  # out of context: restart from the most recent half
            return self.prefill([list(h)[-keep:] for h in history()])
        return step(self.model, self.pool, tokens)


@torch.inference_mode()  # like no_grad, minus autograd's version counters: ~2% faster decoding on a CPU
def decode(model: GPT, continuations: Sequence[Continuation], eot_id: int | None = None,
           on_text: Callable[[int, str], None] | None = None) -> None:
    """Decode continuations (of one SamplingOptions) together until each has ended; `on_text(row, piece)` streams
    their text, the rest of which is flushed at the end."""
    if not continuations or any(len(c.prompt) == 0 for c in continuations):
        raise OwnLLMError("every prompt needs at least one token (an empty prompt can start with <|endoftext|>)")
    options = continuations[0].options
    was_training = model.training
    model.eval()
    generator = seeded_generator(options.seed, model.tok_emb.weight.device)
    decoder = BatchDecoder(model, max_new_tokens=options.max_new_tokens)
    logits = decoder.prefill([c.prompt for c in continuations]) if options.max_new_tokens else None
    for _ in range(options.max_new_tokens):
        tokens = sample_next(logits, options, generator)
        for row, token in enumerate(tokens.tolist()):
            continuation = continuations[row]
            if continuation.finish_reason is None:
                piece = continuation.accept(token, eot_id)
                if piece and on_text is not None:
                    on_text(row, piece)
        if all(c.finish_reason is not None for c in continuations):
            break
        logits = decoder.step(tokens, lambda: [c.prompt + c.output for c in continuations])
    for row, continuation in enumerate(continuations):
        rest = continuation.text.flush() if continuation.text is not None else ""
        if rest and on_text is not None:
            on_text(row, rest)
    model.train(was_training)


def generate_ids(model: GPT, prompts: Sequence[Sequence[int]], options: SamplingOptions,
                 eot_id: int | None = None) -> list[list[int]]:
    """Sample continuations of token-id prompts (no stop strings: they need a tokenizer); the new ids of each."""
    continuations = [Continuation(list(p), options) for p in prompts]
    decode(model, continuations, eot_id)
    return [c.output for c in continuations]


# ---- text in, text out --------------------------------------------------------------------------------------------

def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt: begin-of-sequence by the tokenizer's rule; an empty prompt starts a fresh
    document (`<|endoftext|>`), as in training."""
    ids = tokenizer.starting_sequence(tokenizer.encode(text))
    return ids or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])


def decode_texts(model: GPT, tokenizer: Tokenizer, prompts: Sequence[list[int]], options: SamplingOptions,
                 on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """The texts continuing token-id prompts, cut at the options' stop strings; `on_text(row, piece)` streams them."""
    continuations = [Continuation(p, options, IncrementalText(tokenizer, options.stop)) for p in prompts]
    decode(model, continuations, tokenizer.eot_id, on_text)
    return [c.text.text for c in continuations]


def generate(model: GPT, tokenizer: Tokenizer, prompts: str | Sequence[str], options: SamplingOptions | None = None,
             on_text: Callable[[int, str], None] | None = None, **option_values) -> list[str]:
    """Continue each prompt; returns the generated texts (prompt excluded). `on_text(row, piece)` streams them."""
    options = options or SamplingOptions(**option_values)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    return decode_texts(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompt_list], options, on_text)
