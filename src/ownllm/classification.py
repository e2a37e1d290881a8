"""Classifying texts with a classifier run (made by `ownllm finetune classify`): labels and class probabilities.

    run = ownllm.load("runs/spam")
    classify_texts(run, ["WINNER!! Claim your prize now"])  # [{"label": "spam", "probabilities": {...}}]

Inference only (`ownllm classify`, the server's /v1/classify, the stage's own val/test metrics): texts are encoded
as in training (`ownllm.data.labelled.encode_texts`) and go through the batched loop embeddings use
(`ownllm.embeddings.encode_rows`); the head pools as `ownllm.model.pool` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ownllm.data.labelled import encode_texts
from ownllm.embeddings import encode_rows
from ownllm.errors import OwnLLMError
from ownllm.model import GPTClassifier

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun


def predict_probabilities(model: GPTClassifier, rows: Sequence[Sequence[int]], pad_id: int,
                          batch_size: int = 32) -> Tensor:
    """Class probabilities [len(rows), labels] for encoded texts, batched in length order, returned in input order."""
    return encode_rows(model, rows, lambda ids, lengths: model(ids, lengths).float().softmax(dim=-1),
                       model.score.out_features, pad_id=pad_id, batch_size=batch_size)


def classify_texts(run: "LoadedRun", texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Label and class probabilities of each text with a classifier run (`ownllm.load(RUN)`)."""
    config = run.run_config
    if config.get("task") != "classify":
        raise OwnLLMError(f"{run.path}: not a classifier run (task {config.get('task', 'lm')!r})")
    labels = config["labels"]
    rows = encode_texts(texts, run.tokenizer, config.get("max_length", run.config.block_size),
                        config.get("append_eot", True))
    pad_id = run.tokenizer.eot_id if run.tokenizer.eot_id is not None else 0
    probabilities = predict_probabilities(run.model, rows, pad_id, batch_size)
    return [{"label": labels[int(p.argmax())], "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, p)}}
            for p in probabilities]
