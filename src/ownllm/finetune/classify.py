"""Fine-tuning a language model into a text classifier (spam, sentiment, ...), fully or with LoRA.

    from ownllm.finetune import finetune_classify
    result = finetune_classify(out="runs/spam", model="runs/base", data="sms.tsv", balance="undersample",
                               train_layers="all")          # or lora_rank=8; or train_layers="last:2" / "head"
    result.test["accuracy"]
    classify_texts(ownllm.load("runs/spam"), ["WINNER!! Claim your prize now"])   # ownllm.classification

CLI: `ownllm finetune classify --model RUN --data FILE --out RUN [...]`, `ownllm classify RUN --text TEXT`.

The head is a linear layer (`score`, as in Hugging Face's *ForSequenceClassification) on the final-normed hidden
state of the last real token of each text (`pooling="last"`; batches are right-padded and each row's length says
where its last token is, so padding is never read) or on the mean over its real tokens (`pooling="mean"`). An
end-of-text token closes every text, so the last token is always the same symbol, which reads out the text
before it. At the end, accuracy, per-class precision / recall / F1 and the confusion matrix on val and test go to
RUN/metrics.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ownllm import distributed
from ownllm.checkpoint import write_json_atomic
from ownllm.classification import predict_probabilities
from ownllm.config import ModelConfig
from ownllm.data.labelled import (ClassificationBatches, Example, check_labels, class_weights, encode_texts,
                                  read_labelled, split_examples, undersample)
from ownllm.errors import OwnLLMError
from ownllm.evaluation import classification_metrics
from ownllm.finetune.common import RESULTS_FILE, FinalEvaluation, FinetuneStage, Splits, StageTraining, run_stage
from ownllm.lora import LoRAConfig
from ownllm.model import GPTClassifier
from ownllm.options import BALANCES, ClassifyOptions
from ownllm.tokenizer import Tokenizer
from ownllm.training import TrainResult

@dataclass
class ClassifyResult:
    run_dir: Path
    train: TrainResult
    labels: list[str]
    val: dict[str, Any] | None
    test: dict[str, Any] | None
    final_eval: str = "done"  # or "skipped (...)", "cut ..." (ownllm.finetune.common.FinalEvaluation)
    names: dict[str, str] = field(default_factory=dict)  # the splits with their sizes (Splits.name)


# ---- data ---------------------------------------------------------------------------------------------------------

def load_splits(data: str | Path, *, val_file: str | Path | None, test_file: str | Path | None,
                text_column: str | None, label_column: str | None, val_fraction: float, test_fraction: float,
                split_seed: int, balance: str) -> tuple[list[Example], list[Example], list[Example], list[str]]:
    """Train / val / test examples and the sorted training labels. Val and test come from their files, or are cut
    (seeded) from the data file; `undersample` balances the data file before the cut (the book's protocol)."""
    if balance not in BALANCES:
        raise OwnLLMError(f"--balance must be one of {', '.join(BALANCES)}, not {balance!r}")
    data_file = read_labelled(data, text_column, label_column)
    pool = data_file.examples
    text_column, label_column = data_file.text_column, data_file.label_column  # the same columns in val/test files
    if balance == "undersample":
        pool = undersample(pool, split_seed)
    train, val, test = split_examples(pool, 0.0 if val_file else val_fraction, 0.0 if test_file else test_fraction,
                                      split_seed)
    if val_file:
        val = read_labelled(val_file, text_column, label_column).examples
    if test_file:
        test = read_labelled(test_file, text_column, label_column).examples
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise OwnLLMError(f"{data}: the training data has only one label ({labels[0]!r}); a classifier needs two")
    check_labels(val, labels)
    check_labels(test, labels)
    return train, val, test, labels


# ---- metrics ------------------------------------------------------------------------------------------------------

def evaluate_examples(model: GPTClassifier, examples: Sequence[Example], tokenizer, labels: Sequence[str],
                      max_length: int, append_eot: bool = True) -> dict[str, Any] | None:
    if not examples:
        return None
    rows = encode_texts([e.text for e in examples], tokenizer, max_length, append_eot)
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    predicted = predict_probabilities(model, rows, pad_id).argmax(dim=-1).tolist()
    index = {label: i for i, label in enumerate(labels)}
    return classification_metrics([index[e.label] for e in examples], predicted, labels)


# ---- the stage ----------------------------------------------------------------------------------------------------

def finetune_classify(options: ClassifyOptions | None = None, /, **keywords: Any) -> ClassifyResult:
    """Fine-tune the language model run `model` into a classifier of `data` in the run directory `out`: a
    `ClassifyOptions`, or its fields as keywords (ownllm.options).

    `train_layers`: all | head | last:N; `lora_rank` > 0 trains LoRA adapters and the head instead. Train
    settings (lr, batch_size, max_steps, ...) are TrainConfig fields; by default `epochs` passes over the data.
    """
    return run_stage(ClassifyStage(ClassifyOptions.given(options, keywords)))


class ClassifyStage(FinetuneStage):
    """Labelled texts -> a `GPTClassifier` (a head on the last real token); accuracy and F1 on val and test."""

    task = "classify"
    data_kind = "a CSV, TSV or JSONL file of labelled texts"
    peft_task_type = "SEQ_CLS"
    head = ("score",)
    options: ClassifyOptions

    def read_data(self) -> None:
        o = self.options
        self.train_set, self.val_set, self.test_set, self.labels = load_splits(
            o.data, val_file=o.val_file, test_file=o.test_file, text_column=o.text_column,
            label_column=o.label_column, val_fraction=o.val_fraction, test_fraction=o.test_fraction,
            split_seed=o.split_seed, balance=o.balance)
        self.split = Splits(self.train_set, self.val_set, self.test_set)

    def default_lr(self, lora: LoRAConfig | None) -> float:
        return 1e-3 if (lora or self.options.train_layers == "head") else 1e-4

    def new_model(self, model_config: ModelConfig) -> GPTClassifier:
        return GPTClassifier(model_config, len(self.labels), self.options.pooling)

    def max_length(self, model_config: ModelConfig) -> int:
        return min(self.options.max_length or model_config.block_size, model_config.block_size)

    def config_sections(self, model_config: ModelConfig) -> dict[str, Any]:
        return dict(labels=self.labels, pooling=self.options.pooling, max_length=self.max_length(model_config),
                    append_eot=True)

    def training(self, tokenizer: Tokenizer, model_config: ModelConfig, batch_size: int, seed: int,
                 device: torch.device) -> StageTraining:
        max_length = self.max_length(model_config)
        batches = ClassificationBatches(self.train_set, tokenizer, self.labels, max_length, batch_size, seed=seed)
        host_weights = torch.tensor(class_weights(self.train_set, self.labels)) \
            if self.options.balance == "weight" else None
        weights = host_weights.to(device) if host_weights is not None else None

        def loss_fn(net: torch.nn.Module, batch) -> Tensor:
            return F.cross_entropy(net(batch[0], batch[1]).float(), batch[2], weight=weights)

        fixed = ClassificationBatches(self.val_set, tokenizer, self.labels, max_length, batch_size).eval_batches() \
            if self.val_set else None
        return StageTraining(micro_batch=batches.batch, batches_per_epoch=batches.plan.batches_per_epoch,
                             tokens_per_epoch=sum(batches.plan.lengths), longest=max(batches.plan.lengths, default=0),
                             loss_fn=loss_fn, eval_batches=(lambda: fixed) if fixed else None,
                             tokens_in=lambda b: int(b[1].sum()),
                             loss_weight=(lambda b: float(host_weights[b[2]].sum())) if host_weights is not None
                             else None)

    def finish(self, model: GPTClassifier, tokenizer: Tokenizer, run_dir: Path, result: TrainResult,
               device: torch.device, precision: str, final: FinalEvaluation) -> ClassifyResult:
        if not distributed.is_main():  # rank 0 evaluates and writes the results
            return ClassifyResult(run_dir=run_dir, train=result, labels=self.labels, val=None, test=None)
        model.eval()
        max_length = self.max_length(model.config)
        metrics: dict[str, Any] = {}
        if not final.skipped():
            for name, items in (("val", self.val_set), ("test", self.test_set)):
                if final.out_of_time():
                    final.note(f"cut at --max-minutes (no {name} metrics)")
                    break
                metrics[name] = evaluate_examples(model, items, tokenizer, self.labels, max_length)
        val_metrics, test_metrics = metrics.get("val"), metrics.get("test")
        write_json_atomic(run_dir / RESULTS_FILE, {"step": result.step, "labels": self.labels, "val": val_metrics,
                                                   "test": test_metrics, "train_examples": len(self.train_set),
                                                   "final_eval": final.outcome})
        return ClassifyResult(run_dir=run_dir, train=result, labels=self.labels, val=val_metrics, test=test_metrics,
                              final_eval=final.outcome, names=self.split.names())
