"""Fine-tuning a language model into a retrieval embedder: in-batch-negatives contrastive learning on (query,
passage) pairs, or on pairs made from a folder of documents, fully or with LoRA.

    from ownllm.finetune.embed import finetune_embed
    finetune_embed(out="runs/notes-embed", model="runs/smol", data="pairs.jsonl", lora_rank=16)
    finetune_embed(out="runs/notes-embed", model="runs/smol", docs="notes/")     # no labelled pairs

CLI: `ownllm finetune embed --model RUN (--data pairs.jsonl | --docs FOLDER) --out RUN [...]`.

The loss (sentence-transformers' MultipleNegativesRankingLoss, E5, GTE): each query's pooled, L2-normalised vector
is scored against every passage of the batch (its own positive, the other queries' positives, and the hard
negatives of the records that have one) by cosine / temperature, and cross-entropy picks its own positive;
`symmetric` adds the passages picking their query. Without pairs (`docs`), the inverse cloze task (Lee et al.
2019) makes them: a passage (200-word chunks, as `ownllm index` cuts them) with at least two sentences gives up to
three pairs, a sentence as the query and the passage without it as the positive.

The run's config.json keeps the pooling (`embedding_pooling`) and the prefixes put before queries and passages
(`embedding_prefixes`: {"query", "document"}, E5's "query: " / "passage: " by default); `ownllm embed`, `index`,
`ask` and the server's /v1/embeddings read them (ownllm.embeddings). At each evaluation and at the end, the held-out
retrieval accuracy: the share of val (test) queries whose own positive is the nearest of all the split's positives
(chance: 1 / pairs), beside the base model's before training, in metrics.json.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ownllm import distributed
from ownllm.checkpoint import write_json_atomic
from ownllm.config import ModelConfig
from ownllm.data.batching import EpochBatches, fixed_batches
from ownllm.data.labelled import pad_right
from ownllm.embeddings import encode_for_embedding
from ownllm.errors import OwnLLMError
from ownllm.finetune.common import RESULTS_FILE, FinalEvaluation, FinetuneStage, StageTraining, run_stage, \
    split_records
from ownllm.lora import LoRAConfig
from ownllm.model import GPT, pool
from ownllm.options import EmbedOptions
from ownllm.tokenizer import Tokenizer
from ownllm.training import TrainResult

ICT_PAIRS_PER_PASSAGE = 3


@dataclass
class Pair:
    query: str
    positive: str
    negative: str | None = None


@dataclass
class EmbedResult:
    run_dir: Path
    train: TrainResult
    val: dict[str, float] | None  # {"accuracy", "accuracy_before", "chance", "pairs"}
    test: dict[str, float] | None
    final_eval: str = "done"
    names: dict[str, str] = field(default_factory=dict)


# ---- data ---------------------------------------------------------------------------------------------------------

def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a JSONL file: {"query", "positive"[, "negative"]} per line (blank lines skipped); a bad line is
    an OwnLLMError naming the file, line and field."""
    from ownllm.data.records import json_lines

    pairs = []
    for number, record in json_lines(path):
        for name in ("query", "positive", "negative"):
            value = record.get(name)
            if (name != "negative" or value is not None) and (not isinstance(value, str) or not value.strip()):
                raise OwnLLMError(f"{path}:{number}: field \"{name}\" must be a non-empty string")
        pairs.append(Pair(record["query"], record["positive"], record.get("negative")))
    if len(pairs) < 2:
        raise OwnLLMError(f"{path}: {len(pairs)} pair(s); in-batch contrastive training needs at least 2")
    return pairs


def sentences_of(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if len(s.split()) >= 3]


def pairs_from_documents(folder: str | Path, seed: int, chunk_size: int = 200) -> list[Pair]:
    """Inverse-cloze pairs from the documents under `folder` (see the module docstring), in a seeded order."""
    from ownllm.documents import find_documents, read_documents
    from ownllm.retrieval import chunk_file

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    texts, _ = read_documents(folder, find_documents(folder))  # an unreadable file gives no pairs
    for name, text in texts.items():
        for chunk in chunk_file(text, name, chunk_size, 0):
            sentences = sentences_of(chunk.text)
            if len(sentences) < 2:
                continue
            picked = torch.randperm(len(sentences), generator=generator)[:ICT_PAIRS_PER_PASSAGE].tolist()
            for i in picked:
                pairs.append(Pair(sentences[i], " ".join(sentences[:i] + sentences[i + 1:])))
    if len(pairs) < 2:
        raise OwnLLMError(f"{folder}: too little text to make pairs from (passages with at least two sentences "
                          f"of 3+ words; found {len(pairs)} pair(s))")
    return pairs


# ---- the model and the loss ---------------------------------------------------------------------------------------

class GPTEmbedder(GPT):
    """A GPT whose forward pools its final hidden states into one vector per text (no new weights: the run saves
    and loads as a language model)."""

    def __init__(self, config: ModelConfig, pooling: str) -> None:
        super().__init__(config)
        self.pooling = pooling

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:  # type: ignore[override]
        return F.normalize(pool(self.hidden_states(ids).float(), lengths, self.pooling), dim=-1)


def contrastive_loss(net: torch.nn.Module, batch: Sequence[Tensor], temperature: float,
                     symmetric: bool) -> Tensor:
    """In-batch-negatives cross-entropy: each query against every passage of the batch (and its hard negatives)."""
    queries = net(batch[0], batch[1])
    passages = net(batch[2], batch[3])
    if batch[4].shape[0]:
        passages = torch.cat([passages, net(batch[4], batch[5])])
    scores = queries @ passages.T / temperature
    targets = torch.arange(len(queries), device=scores.device)
    loss = F.cross_entropy(scores, targets)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(scores[:, :len(queries)].T, targets))
    return loss


class PairBatches:
    """Encoded pairs: `batch(step)` for training, `eval_batches()` for the validation loss."""

    def __init__(self, pairs: Sequence[Pair], tokenizer: Tokenizer, prefixes: tuple[str, str], max_length: int,
                 batch_size: int, seed: int = 0) -> None:
        def encode(texts: list[str], prefix: str) -> list[list[int]]:
            return [row[:max_length] for row in encode_for_embedding(tokenizer, [prefix + t for t in texts])]

        self.queries = encode([p.query for p in pairs], prefixes[0])
        self.positives = encode([p.positive for p in pairs], prefixes[1])
        self.negatives = encode([p.negative or "" for p in pairs], prefixes[1])
        self.has_negative = [p.negative is not None for p in pairs]
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.batch_size = batch_size
        self.lengths = [len(q) + len(d) for q, d in zip(self.queries, self.positives)]
        self.plan = EpochBatches(self.lengths, batch_size, seed=seed)

    def collate(self, indices: Sequence[int]) -> tuple[Tensor, ...]:
        with_negative = [i for i in indices if self.has_negative[i]]
        negatives = pad_right([self.negatives[i] for i in with_negative], self.pad_id) if with_negative \
            else (torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        return (*pad_right([self.queries[i] for i in indices], self.pad_id),
                *pad_right([self.positives[i] for i in indices], self.pad_id), *negatives)

    def batch(self, step: int) -> tuple[Tensor, ...]:
        return self.collate(self.plan.indices(step))

    def eval_batches(self) -> list[tuple[Tensor, ...]]:
        return [self.collate(b) for b in fixed_batches(self.lengths, self.batch_size) if len(b) > 1]


@torch.inference_mode()
def retrieval_accuracy(net: torch.nn.Module, batches: PairBatches, device: torch.device) -> float:
    """The share of queries whose own positive is the nearest of all the positives."""
    was_training = net.training
    net.eval()

    def vectors(rows: list[list[int]]) -> Tensor:
        out = []
        for indices in fixed_batches([len(r) for r in rows], batches.batch_size):
            ids, lengths = pad_right([rows[i] for i in indices], batches.pad_id)
            out.append((torch.tensor(indices), net(ids.to(device), lengths.to(device)).float().cpu()))
        result = torch.empty(len(rows), out[0][1].shape[1])
        for indices, block in out:
            result[indices] = block
        return result

    nearest = (vectors(batches.queries) @ vectors(batches.positives).T).argmax(dim=1)
    net.train(was_training)
    return float((nearest == torch.arange(len(nearest))).float().mean())


# ---- the stage ----------------------------------------------------------------------------------------------------

def finetune_embed(options: EmbedOptions | None = None, /, **keywords: Any) -> EmbedResult:
    """Fine-tune the language model run `model` into a retrieval embedder in the run directory `out`: an
    `EmbedOptions`, or its fields as keywords (ownllm.options); `data` pairs or `docs` a folder."""
    return run_stage(EmbedStage(EmbedOptions.given(options, keywords)))


class EmbedStage(FinetuneStage):
    """(query, passage) pairs -> a model whose pooled vectors put each query nearest its passage."""

    task = "embed"
    data_kind = "a JSONL file of {\"query\", \"positive\"} pairs, or --docs FOLDER"
    peft_task_type = "FEATURE_EXTRACTION"
    options: EmbedOptions

    def read_data(self) -> None:
        o = self.options
        folder = Path(o.data).is_dir()
        pool_ = pairs_from_documents(o.data, o.split_seed) if folder else read_pairs(o.data)
        self.split = split_records(pool_, read_pairs, o)
        self.before: dict[str, float] = {}

    def default_lr(self, lora: LoRAConfig | None) -> float:
        return 1e-3 if lora else 2e-5

    def new_model(self, model_config: ModelConfig) -> GPTEmbedder:
        return GPTEmbedder(model_config, self.options.pooling)

    def max_length(self, model_config: ModelConfig) -> int:
        return min(self.options.max_length, model_config.block_size)

    def config_sections(self, model_config: ModelConfig) -> dict[str, Any]:
        o = self.options
        return dict(embedding_pooling=o.pooling, max_length=self.max_length(model_config),
                    embedding_prefixes={"query": o.query_prefix, "document": o.document_prefix})

    def _batches(self, pairs: Sequence[Pair], tokenizer: Tokenizer, model_config: ModelConfig, batch_size: int,
                 seed: int = 0) -> PairBatches | None:
        if len(pairs) < 2:
            return None
        prefixes = (self.options.query_prefix, self.options.document_prefix)
        return PairBatches(pairs, tokenizer, prefixes, self.max_length(model_config), batch_size, seed)

    def training(self, tokenizer: Tokenizer, model_config: ModelConfig, batch_size: int, seed: int,
                 device: torch.device) -> StageTraining:
        if batch_size < 2:
            raise OwnLLMError("--batch-size must be at least 2: the other pairs of a batch are the negatives")
        o = self.options
        train = self._batches(self.split.train, tokenizer, model_config, batch_size, seed)
        if train is None:
            raise OwnLLMError(f"{o.data}: fewer than 2 training pairs after the split")
        self.held_out = {name: self._batches(getattr(self.split, name), tokenizer, model_config, batch_size)
                         for name in ("val", "test")}
        val = self.held_out["val"]
        fixed = val.eval_batches() if val is not None else []
        return StageTraining(
            micro_batch=train.batch, batches_per_epoch=train.plan.batches_per_epoch,
            tokens_per_epoch=sum(train.lengths), longest=max(train.lengths, default=0),
            loss_fn=lambda net, batch: contrastive_loss(net, batch, o.temperature, o.symmetric),
            eval_batches=(lambda: fixed) if fixed else None,
            tokens_in=lambda b: int(b[1].sum() + b[3].sum() + b[5].sum()),
            eval_metrics=(lambda net: {"val_accuracy": retrieval_accuracy(net, val, device)}) if val else None)

    def prepare(self, model: GPT, run_dir: Path, device: torch.device, precision: str) -> None:
        """The base model's held-out accuracy, to compare with at the end."""
        model.to(device)
        self.before = {name: retrieval_accuracy(model, batches, device)
                       for name, batches in self.held_out.items() if batches is not None}

    def finish(self, model: GPT, tokenizer: Tokenizer, run_dir: Path, result: TrainResult, device: torch.device,
               precision: str, final: FinalEvaluation) -> EmbedResult:
        if not distributed.is_main():
            return EmbedResult(run_dir=run_dir, train=result, val=None, test=None)
        metrics: dict[str, Any] = {}
        if not final.skipped():
            for name, batches in self.held_out.items():
                if batches is None:
                    continue
                if final.out_of_time():
                    final.note(f"cut at --max-minutes (no {name} metrics)")
                    break
                metrics[name] = {"accuracy": retrieval_accuracy(model, batches, device),
                                 "accuracy_before": self.before.get(name), "chance": 1.0 / len(batches.queries),
                                 "pairs": len(batches.queries)}
        write_json_atomic(run_dir / RESULTS_FILE, {"step": result.step, **metrics,
                                                   "train_pairs": len(self.split.train),
                                                   "final_eval": final.outcome})
        return EmbedResult(run_dir=run_dir, train=result, val=metrics.get("val"), test=metrics.get("test"),
                           final_eval=final.outcome, names=self.split.names())
