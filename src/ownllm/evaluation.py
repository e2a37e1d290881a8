"""Evaluating a language model on held-out text: mean loss, perplexity and bits per byte.

    result = evaluate_text(run.model, run.tokenizer, "held-out.txt")
    result.perplexity, result.bits_per_byte

Every token after the first is predicted once, from non-overlapping windows of the model's context. Bits per byte
divide the total negative log-likelihood (in bits) by the UTF-8 bytes those tokens stand for, so models with
different tokenizers compare fairly. CLI: `ownllm evaluate RUN --text FILE [--json]`.

Also here: `classification_metrics` (accuracy, per-class precision / recall / F1, confusion matrix) for classifier
runs, and `rouge_l_f1` / `exact_match` for scoring instruction responses against references.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    tokens: int  # tokens predicted (unknown characters included)
    bytes: int  # UTF-8 bytes of the predicted tokens
    unknown: int = 0  # characters the tokenizer cannot spell, each scored as a uniform guess over the vocabulary

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def encode_file(tokenizer: Tokenizer, path: str | Path) -> tuple[list[int], int, int]:
    """Token ids of a UTF-8 text file (streamed in chunks), its size in bytes, and the number of characters the
    tokenizer cannot spell (left out of the ids; see `Tokenizer.encode_known`)."""
    ids: list[int] = []
    size = unknown = 0
    for chunk in iter_text_chunks(Path(path)):
        chunk_ids, chunk_unknown = tokenizer.encode_known(chunk)
        ids.extend(chunk_ids)
        unknown += chunk_unknown
        size += len(chunk.encode("utf-8"))
    return ids, size, unknown


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
    """Loss, perplexity and bits per byte of `model` on the text file at `path`.

    A character a char tokenizer never saw has no id: it is left out of what the model reads and scored as a
    uniform guess over the vocabulary (ln vocab_size nats), so every byte of the file is accounted for and bits
    per byte stay comparable across models; `unknown` reports how many there were."""
    ids, size, unknown = encode_file(tokenizer, path)
    if len(ids) < 2:
        raise OwnLLMError(f"{path}: needs at least two tokens of text to evaluate")
    total, count = evaluate_ids(model, ids, batch_size=batch_size, precision=precision)
    total += unknown * math.log(tokenizer.vocab_size)
    count += unknown
    predicted_bytes = size - len(tokenizer.token_bytes(ids[0]))
    loss = total / count
    return TextEvaluation(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                          bits_per_byte=total / math.log(2) / max(predicted_bytes, 1), tokens=count,
                          bytes=predicted_bytes, unknown=unknown)


# ---- classification ----------------------------------------------------------------------------------------------

def classification_metrics(truth: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 / support, macro F1 and the confusion matrix
    (`confusion[i][j]`: examples of class i predicted as class j)."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted_i = sum(confusion[r][i] for r in range(k))
        actual_i = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_i}
    total = len(truth)
    return {"accuracy": sum(confusion[i][i] for i in range(k)) / total if total else 0.0,
            "macro_f1": sum(c["f1"] for c in per_class.values()) / k if k else 0.0,
            "examples": total, "per_class": per_class, "labels": list(labels), "confusion": confusion}


def format_classification_table(metrics: dict[str, Any], title: str = "") -> str:
    """A plain-text table of `classification_metrics`: per-class rows, accuracy, then the confusion matrix."""
    labels = metrics["labels"]
    width = max(8, *(len(str(label)) for label in labels))
    lines = [f"{title} ({metrics['examples']} examples): accuracy {100 * metrics['accuracy']:.2f}%, "
             f"macro F1 {metrics['macro_f1']:.4f}" if title else f"accuracy {100 * metrics['accuracy']:.2f}%",
             f"  {'label':<{width}}  precision  recall      f1  support"]
    for label in labels:
        c = metrics["per_class"][label]
        lines.append(f"  {label:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:6.4f}  {c['support']:7d}")
    lines.append(f"  confusion (rows: true, columns: predicted): {' '.join(str(label) for label in labels)}")
    for label, row in zip(labels, metrics["confusion"]):
        lines.append(f"  {label:<{width}}  " + " ".join(f"{n:6d}" for n in row))
    return "\n".join(lines)


# ---- instruction responses ---------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens: the longest common subsequence against both lengths."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal after stripping surrounding white space and collapsing inner runs of it."""
    return " ".join(candidate.split()) == " ".join(reference.split())
