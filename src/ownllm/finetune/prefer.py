"""Preference tuning (DPO): shift an instruction-tuned model towards the preferred of two answers, fully or with LoRA.

    from ownllm.finetune import finetune_prefer
    result = finetune_prefer(out="runs/polite", model="runs/assistant", data="prefs.json", beta=0.1, lora_rank=16)
    result.val["preference_accuracy"], result.val["reward_margin"]

CLI: `ownllm finetune prefer --model RUN --data prefs.json --out runs/polite --beta 0.1 [--lora-rank 16]
[--loss sigmoid|ipo] [--sft-weight 1.0]`, then `ownllm chat runs/polite`. `--sft-weight` (trl's `rpo_alpha`) adds
that much of the chosen answers' mean per-token NLL to the loss (RPO), against DPO's drift to lower likelihoods.

Data: the book's {instruction, input, chosen, rejected} or trl's {prompt, chosen, rejected} (strings or chat
messages), see `ownllm.data.preferences`. The prompt is rendered in the model's own template and default system
prompt (an instruct run's, or its chat template's; `--template` / `--system` otherwise;
`ownllm.finetune.common.StageChat`), each answer ends with the template's end marker, and only answer tokens count.

The reference model is the starting model. Its log-probabilities of every pair are computed once before training,
with LoRA adapters disabled, and kept in RUN/reference_logps.safetensors (for --resume), so there is never a second
copy of the model in memory and no step pays a reference forward pass (`ownllm.finetune.dpo`). At each evaluation,
metrics.jsonl gets the validation split's DPO loss (val_loss), rewards of the chosen and rejected answers, their
margin, the preference accuracy (the share of pairs whose chosen answer gets the higher reward) and the chosen
answers' mean NLL per token (val_nll_chosen), also plotted in loss.png; at the end RUN/metrics.json holds them for
val and test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ownllm import distributed
from ownllm.chat_templates import get_template, with_system
from ownllm.checkpoint import write_json_atomic
from ownllm.config import ModelConfig
from ownllm.data.preferences import PreferenceBatches, pair_tokens, read_preferences
from ownllm.finetune.common import (RESULTS_FILE, FinalEvaluation, FinetuneStage, StageChat, StageTraining,
                                    run_stage, split_records)
from ownllm.finetune.dpo import (answer_tokens, check_loss_kind, dpo_losses, evaluate_pairs, pair_logps,
                                 reference_logps)
from ownllm.lora import LoRAConfig
from ownllm.model import GPT
from ownllm.options import PreferOptions
from ownllm.outputs import save_safetensors
from ownllm.runs import LoadedRun
from ownllm.tokenizer import Tokenizer
from ownllm.training import TrainResult

REFERENCE_FILE = "reference_logps.safetensors"  # the starting model's log-probs of every pair, kept for --resume
SPLITS = ("train", "val", "test")


@dataclass
class PreferResult:
    run_dir: Path
    train: TrainResult
    val: dict[str, float] | None  # ownllm.finetune.dpo.METRICS on the validation pairs
    test: dict[str, float] | None
    final_eval: str = "done"  # or "skipped (...)", "cut ..." (ownllm.finetune.common.FinalEvaluation)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # the splits with their sizes (Splits.name)


def finetune_prefer(options: PreferOptions | None = None, /, **keywords: Any) -> PreferResult:
    """Preference-tune the model run `model` on the pairs in `data` (DPO) into the run directory `out`: a
    `PreferOptions`, or its fields as keywords (ownllm.options)."""
    options = PreferOptions.given(options, keywords)
    if not options.resume:
        check_loss_kind(options.loss, options.beta, options.sft_weight)  # fail fast
        if options.template:
            get_template(options.template)
    return run_stage(PreferStage(options))


def dpo_loss_fn(references: list[Tensor | None], beta: float, kind: str, sft_weight: float):
    """The training loss of a preference batch (inputs, targets, lengths, index): mean DPO loss over its pairs (plus
    sft_weight times the chosen answers' NLL), against the train split's reference log-probs (references[0], filled
    in before training starts)."""
    def loss_fn(net: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        inputs, targets, _, index = batch
        policy = pair_logps(net, inputs, targets)
        reference = references[0][index.cpu()].to(policy.device)
        return dpo_losses(policy, reference, answer_tokens(targets), beta, kind, sft_weight)[0].mean()
    return loss_fn


class PreferStage(FinetuneStage):
    """Preference pairs -> a GPT that prefers the chosen answers (DPO or IPO); rewards, margin and accuracy."""

    task = "prefer"
    data_kind = "preference pairs: JSON or JSONL"
    options: PreferOptions

    def read_data(self) -> None:
        self.split = split_records(read_preferences(self.options.data), read_preferences, self.options)
        self.splits = (self.split.train, self.split.val, self.split.test)

    def use_base(self, base: LoadedRun) -> None:
        """The model's own template and default system prompt (unless --template / --system), said first."""
        self.chat = StageChat.of(base, self.options.template, self.options.system)
        self.chat.announce(self.options.show_progress)
        self.template = self.chat.template
        self.splits = tuple([dataclasses.replace(pair, prompt=with_system(pair.prompt, self.chat.system))
                             for pair in split] for split in self.splits)

    def default_lr(self, lora: LoRAConfig | None) -> float:
        return 5e-5 if lora else 5e-6

    @property
    def loss_options(self) -> dict[str, Any]:
        """beta, kind and sft_weight of the loss (a run made before --sft-weight existed has none: the default 0)."""
        return dict(beta=self.options.beta, kind=self.options.loss, sft_weight=self.options.sft_weight)

    def config_sections(self, model_config: ModelConfig) -> dict[str, Any]:
        return self.chat.sections()

    def training(self, tokenizer: Tokenizer, model_config: ModelConfig, batch_size: int, seed: int,
                 device: torch.device) -> StageTraining:
        o, context = self.options, model_config.block_size
        self.batches = [PreferenceBatches(items, self.template, tokenizer, context, batch_size, seed=seed)
                        if items else None for items in self.splits]
        if o.show_progress and distributed.is_main():
            for name, split in zip(SPLITS, self.batches):
                if split is not None and (split.truncated or split.dropped):
                    print(f"note: {name}: {split.truncated} pairs have answers that run past the context ({context} "
                          f"tokens) and were cut; {split.dropped} whose prompt leaves no room for an answer were "
                          "left out")
        self.fixed = [split.eval_batches() if split is not None else None for split in self.batches]
        self.references: list[Tensor | None] = [None, None, None]
        train = self.batches[0]
        return StageTraining(micro_batch=train.batch, batches_per_epoch=train.plan.batches_per_epoch,
                             tokens_per_epoch=sum(train.plan.lengths), longest=max(train.plan.lengths, default=0),
                             loss_fn=dpo_loss_fn(self.references, **self.loss_options), tokens_in=pair_tokens,
                             eval_metrics=self.val_metrics if self.batches[1] is not None else None)

    def prepare(self, model: GPT, run_dir: Path, device: torch.device, precision: str) -> None:
        """The reference log-probs of every pair, from the starting weights (before a resume loads the checkpoint)."""
        self.device, self.precision = device, precision
        self.references[:] = reference_for(run_dir, self.options.resume, model.to(device), self.batches,
                                           self.fixed, device, precision,
                                           self.options.show_progress and distributed.is_main())

    def val_metrics(self, net: nn.Module) -> dict[str, float]:
        stats = evaluate_pairs(net, self.fixed[1], self.references[1], device=self.device, precision=self.precision,
                               **self.loss_options)
        return {f"val_{k}": v for k, v in stats.items()}

    def finish(self, model: GPT, tokenizer: Tokenizer, run_dir: Path, result: TrainResult, device: torch.device,
               precision: str, final: FinalEvaluation) -> PreferResult:
        if not distributed.is_main():  # rank 0 evaluates and writes the results
            return PreferResult(run_dir=run_dir, train=result, val=None, test=None)
        metrics: list[dict[str, float] | None] = [None, None, None]
        if not final.skipped():
            for i in (1, 2):
                if final.out_of_time():
                    final.note(f"cut at --max-minutes (no {SPLITS[i]} metrics)")
                    break
                if self.batches[i] is not None:
                    metrics[i] = evaluate_pairs(model, self.fixed[i], self.references[i], device=device,
                                                precision=precision, **self.loss_options)
        val, test = metrics[1], metrics[2]
        write_json_atomic(run_dir / RESULTS_FILE, {"step": result.step, "val": val, "test": test,
                                                   "train_pairs": len(self.batches[0]), "final_eval": final.outcome})
        return PreferResult(run_dir=run_dir, train=result, val=val, test=test, final_eval=final.outcome,
                            names=self.split.names())


def reference_for(run_dir: Path, resume: bool, model: nn.Module, batches: Sequence[PreferenceBatches | None],
                  fixed: Sequence[list | None], device: torch.device, precision: str,
                  show: bool) -> list[Tensor | None]:
    """The reference log-probs [pairs, 2] of the train, val and test pairs: on a resume, read from
    RUN/reference_logps.safetensors when it holds them for these pairs; else computed from `model` (the starting
    weights, adapters off) and stored there."""
    path = run_dir / REFERENCE_FILE
    expected = {name: (len(split), 2) for name, split in zip(SPLITS, batches) if split is not None}
    if resume and path.is_file():
        stored = load_file(str(path))
        if {name: tuple(t.shape) for name, t in stored.items()} == expected:
            return [stored.get(name) for name in SPLITS]
    references = [reference_logps(model, rows, len(split), device, precision,
                                  desc=f"reference log-probs ({name})" if show else None) if split is not None else None
                  for name, split, rows in zip(SPLITS, batches, fixed)]
    if distributed.is_main():
        tmp = path.with_name(path.name + ".tmp")
        save_safetensors({name: t for name, t in zip(SPLITS, references) if t is not None}, tmp)
        tmp.replace(path)
    return references
