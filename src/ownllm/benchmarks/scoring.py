"""Log-likelihood of continuations, tokenised and scored the way lm-evaluation-harness scores them.

    pairs = [encode_pair(tokenizer, "Question: 2+2?\\nAnswer:", " 4"), encode_pair(tokenizer, ..., " 5")]
    logprobs = score_choices(model, pairs)          # sum of log p(continuation token | everything before it)

Tokenisation follows the harness's `_encode_pair`: trailing white space of the context moves to the continuation,
the context and context+continuation are encoded separately, and the continuation is the tail of the whole
encoding after the context's length (so the split lies exactly at the context's boundary). Models whose tokenizer
adds a begin-of-sequence token (Llama's `<s>`) get it in front of both, as Hugging Face's tokenizers add it.

`score_choices` scores the choices of one question together: the longest token prefix the inputs share (the
question, for ARC; the sentence up to the blank, for WinoGrande) runs once through the model into a KV cache, and
the rest of every choice runs from copies of that cache as one batch. Inputs longer than the context window are
cut from the left as the harness cuts them and scored one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ownllm.device import autocast
from ownllm.kvcache import KVCache
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def prefix_ids(tokenizer: Tokenizer) -> list[int]:
    """The begin-of-sequence token where the model's tokenizer adds one, else nothing."""
    return [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> TokenPair:
    """Context and continuation ids as the harness splits them (see the module docstring).

    An empty context becomes the begin-of-sequence token (or the end-of-text token where there is none), as the
    harness conditions unconditional continuations."""
    if not context:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
        ids = tokenizer.encode(continuation)
        if ids and ids[0] == start:
            return ids[:1], ids[1:]
        return [start], ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix = prefix_ids(tokenizer)
    whole = prefix + tokenizer.encode(context + continuation)
    context_ids = prefix + tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares."""
    shortest = min(len(row) for row in rows)
    for index in range(shortest):
        token = rows[0][index]
        if any(row[index] != token for row in rows):
            return index
    return shortest


def _continuation_logprob(logits: Tensor, targets: Tensor) -> tuple[float, bool]:
    """Sum over positions of log softmax(logits)[target], and whether every target is the most likely token;
    logits [time, vocab], targets [time]."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    greedy = bool((logprobs.argmax(dim=-1) == targets).all())
    return float(logprobs.gather(-1, targets.unsqueeze(-1)).sum()), greedy


def _fork_cache(model: GPT, prefix: KVCache, rows: int, max_len: int) -> KVCache:
    """A cache of `rows` sequences that each start with the positions already in `prefix` (a one-row cache)."""
    cache = model.new_cache(rows, max_len=max_len, dtype=prefix.keys.dtype)
    cache.keys[:, :, :, : prefix.length] = prefix.keys[:, :, :, : prefix.length]
    cache.values[:, :, :, : prefix.length] = prefix.values[:, :, :, : prefix.length]
    cache.length = prefix.length
    return cache


def score_alone(model: GPT, pair: TokenPair, precision: str = "fp32") -> float:
    """Log-likelihood of one continuation by a plain forward pass of context + continuation (left-cut to fit)."""
    return score_alone_greedy(model, pair, precision)[0]


@torch.inference_mode()
def score_alone_greedy(model: GPT, pair: TokenPair, precision: str = "fp32") -> tuple[float, bool]:
    """`score_alone`, and whether greedy decoding would produce the continuation."""
    context, continuation = pair
    window = model.config.block_size
    sequence = (context + continuation)[-(window + 1):]
    device = model.tok_emb.weight.device
    inputs = torch.tensor([sequence[:-1]], device=device)
    with autocast(device, precision):
        logits = model(inputs)[0]
    count = len(continuation)
    targets = torch.tensor(sequence[-count:], device=device)
    return _continuation_logprob(logits[-count:], targets)


def score_choices(model: GPT, pairs: Sequence[TokenPair], precision: str = "fp32") -> list[float]:
    """Log-likelihood of each (context, continuation) pair of one question, the shared prefix computed once."""
    return [logprob for logprob, _ in score_choices_greedy(model, pairs, precision)]


@torch.inference_mode()
def score_choices_greedy(model: GPT, pairs: Sequence[TokenPair], precision: str = "fp32") -> list[tuple[float, bool]]:
    """`score_choices`, each with whether greedy decoding would produce that continuation (the harness's
    `is_greedy`)."""
    if any(not continuation for _, continuation in pairs):
        raise ValueError("every continuation needs at least one token")
    window = model.config.block_size
    if any(len(context) + len(continuation) - 1 > window for context, continuation in pairs):
        return [score_alone_greedy(model, pair, precision) for pair in pairs]
    inputs = [(context + continuation)[:-1] for context, continuation in pairs]
    # The cached prefix ends before the last context token of the shortest context, so the logits that predict
    # every continuation's first token come out of the batched part.
    shared = max(0, min(common_prefix_length(inputs), min(len(context) for context, _ in pairs)) - 1)
    device = model.tok_emb.weight.device
    rests = [row[shared:] for row in inputs]
    longest = max(len(rest) for rest in rests)
    batch = torch.zeros(len(pairs), longest, dtype=torch.long, device=device)  # right padding is never attended
    for row, rest in enumerate(rests):
        batch[row, : len(rest)] = torch.tensor(rest, device=device)
    with autocast(device, precision):
        cache = None
        if shared:
            prefix = model.new_cache(1, max_len=shared)
            model.hidden_states(torch.tensor([inputs[0][:shared]], device=device), cache=prefix)
            cache = _fork_cache(model, prefix, len(pairs), shared + longest)
        hidden = model.hidden_states(batch, cache=cache)
        # The LM head once, on the continuations' positions only: with a 262k vocabulary (Gemma 3) reading its
        # weights is most of an item's time. first: the position (within a batch row) that predicts continuation[0].
        firsts = [len(context) - 1 - shared for context, _ in pairs]
        logits = model.lm_head(torch.cat([hidden[row, first:first + len(continuation)]
                                          for row, (first, (_, continuation)) in enumerate(zip(firsts, pairs))]))
    scores, start = [], 0
    for _, continuation in pairs:
        targets = torch.tensor(continuation, device=device)
        scores.append(_continuation_logprob(logits[start:start + len(continuation)], targets))
        start += len(continuation)
    return scores
