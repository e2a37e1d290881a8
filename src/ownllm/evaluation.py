"""Evaluating a language model on held-out text: mean loss, perplexity and bits per byte.

    result = evaluate_text(run.model, run.tokenizer, "held-out.txt")
    result.perplexity, result.bits_per_byte

Every token after the first is predicted once, from non-overlapping windows of the model's context. Bits per byte
divide the total negative log-likelihood (in bits) by the UTF-8 bytes those tokens stand for, so models with
different tokenizers compare fairly. CLI: `ownllm evaluate RUN --text FILE [--json]`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ownllm.device import autocast
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer, iter_text_chunks


@dataclass
class TextEvaluation:
    loss: float  # mean negative log-likelihood per predicted token, in nats
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of the predicted tokens

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def encode_file(tokenizer: Tokenizer, path: str | Path) -> tuple[list[int], int]:
    """Token ids of a UTF-8 text file (streamed in chunks) and its size in bytes."""
    ids: list[int] = []
    size = 0
    for chunk in iter_text_chunks(Path(path)):
        ids.extend(tokenizer.encode(chunk))
        size += len(chunk.encode("utf-8"))
    return ids, size


@torch.no_grad()
def evaluate_ids(model: GPT, ids: list[int], batch_size: int = 8, precision: str = "fp32") -> tuple[float, int]:
    """Total NLL (nats) of ids[1:] given what precedes them within non-overlapping context windows; and the count."""
    window = model.config.block_size
    device = model.tok_emb.weight.device
    data = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, window))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        inputs = torch.zeros(len(group), window, dtype=torch.long)
        targets = torch.full((len(group), window), -100, dtype=torch.long)
        for row, start in enumerate(group):
            piece = data[start:start + window + 1]
            inputs[row, : len(piece) - 1] = piece[:-1]
            targets[row, : len(piece) - 1] = piece[1:]
        with autocast(device, precision):
            logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.to(device).view(-1),
                               ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return total, count


def evaluate_text(model: GPT, tokenizer: Tokenizer, path: str | Path, batch_size: int = 8,
                  precision: str = "fp32") -> TextEvaluation:
    """Loss, perplexity and bits per byte of `model` on the text file at `path`."""
    ids, size = encode_file(tokenizer, path)
    if len(ids) < 2:
        raise OwnLLMError(f"{path}: needs at least two tokens of text to evaluate")
    total, count = evaluate_ids(model, ids, batch_size=batch_size, precision=precision)
    predicted_bytes = size - len(tokenizer.token_bytes(ids[0]))
    loss = total / count
    return TextEvaluation(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                          bits_per_byte=total / math.log(2) / max(predicted_bytes, 1), tokens=count,
                          bytes=predicted_bytes)
