"""Instruction fine-tuning: a language model learns to answer in a prompt template, fully or with LoRA.

    from ownllm.finetune import finetune_instruct
    result = finetune_instruct(out="runs/assistant", model="runs/base", data="instructions.json",
                               template="alpaca", lora_rank=16, lora_alpha=32)
    result.test_loss, result.rouge_l_f1

CLI: `ownllm finetune instruct --model RUN --data FILE --out RUN [...]`, then `ownllm chat RUN` or
`ownllm generate RUN --instruction "..." [--input "..."]`.

Loss is on the responses only by default (the prompt and padding are -100), and every response ends with the
template's end marker (`<|endoftext|>` or `<|im_end|>`), learned, so the model stops. Batches group examples of
similar length. At the end the held-out (test) loss is measured and the model answers every held-out instruction
(greedy): RUN/responses.json holds instruction, input, reference output and response; RUN/metrics.json the
losses, ROUGE-L F1 and exact match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ownllm import distributed
from ownllm.chat import ChatFormat, answer_all
from ownllm.chat_templates import Conversation, get_template, with_system
from ownllm.checkpoint import write_json_atomic
from ownllm.config import ModelConfig
from ownllm.data.instructions import InstructionBatches, read_instructions, real_tokens
from ownllm.decoding import SamplingOptions
from ownllm.evaluation import exact_match, rouge_l_f1
from ownllm.finetune.common import (RESULTS_FILE, FinalEvaluation, FinetuneStage, StageChat, StageTraining,
                                    run_stage, split_records)
from ownllm.lora import LoRAConfig
from ownllm.model import GPT
from ownllm.options import InstructOptions
from ownllm.runs import LoadedRun
from ownllm.tokenizer import Tokenizer
from ownllm.training import TrainResult, counted_targets, evaluate_loss, lm_loss

RESPONSES_FILE = "responses.json"
ANSWER_BATCH = 16  # test instructions answered at once (the final evaluation may be cut between batches)


@dataclass
class InstructResult:
    run_dir: Path
    train: TrainResult
    val_loss: float | None
    test_loss: float | None
    rouge_l_f1: float | None
    exact_match: float | None
    final_eval: str = "done"  # or "skipped (...)", "cut ..." (ownllm.finetune.common.FinalEvaluation)
    names: dict[str, str] = field(default_factory=dict)  # the splits with their sizes (Splits.name)


def _record(conversation: Conversation, response: str) -> dict[str, Any]:
    prompt, reference = conversation[:-1], conversation[-1].content
    if len(prompt) == 1 and prompt[0].role == "user":
        return {"instruction": prompt[0].content, "input": prompt[0].input, "output": reference,
                "response": response}
    return {"messages": [{"role": m.role, "content": m.content} for m in prompt], "output": reference,
            "response": response}


def finetune_instruct(options: InstructOptions | None = None, /, **keywords: Any) -> InstructResult:
    """Fine-tune the language model run `model` on the instructions in `data` into the run directory `out`: an
    `InstructOptions`, or its fields as keywords (ownllm.options)."""
    options = InstructOptions.given(options, keywords)
    if not options.resume and options.template:
        get_template(options.template)  # fail fast
    return run_stage(InstructStage(options))


class InstructStage(FinetuneStage):
    """Conversations in a prompt template -> a GPT that answers; held-out loss, ROUGE-L and exact match."""

    task = "instruct"
    data_kind = "Alpaca JSON/JSONL or chat JSONL"
    options: InstructOptions

    def read_data(self) -> None:
        self.split = split_records(read_instructions(self.options.data), read_instructions, self.options)
        self.train_set, self.val_set, self.test_set = self.split.train, self.split.val, self.split.test

    def use_base(self, base: LoadedRun) -> None:
        """The model's own template and default system prompt (unless --template / --system), said first."""
        self.chat = StageChat.of(base, self.options.template, self.options.system)
        self.chat.announce(self.options.show_progress)
        self.template = self.chat.template

    def _in_chat(self, conversations: list[Conversation]) -> list[Conversation]:
        return [with_system(c, self.chat.system) for c in conversations]

    def default_lr(self, lora: LoRAConfig | None) -> float:
        return 5e-4 if lora else 1e-4

    def config_sections(self, model_config: ModelConfig) -> dict[str, Any]:
        return self.chat.sections()

    def training(self, tokenizer: Tokenizer, model_config: ModelConfig, batch_size: int, seed: int,
                 device: torch.device) -> StageTraining:
        mask_prompt, context = self.options.mask_prompt, model_config.block_size
        batches = InstructionBatches(self._in_chat(self.train_set), self.template, tokenizer, context, batch_size,
                                     mask_prompt=mask_prompt, seed=seed)
        if (batches.truncated or batches.dropped) and self.options.show_progress and distributed.is_main():
            print(f"note: {batches.truncated} training examples are longer than the context ({context} tokens) "
                  f"and were cut; {batches.dropped} with no response inside it were left out")
        self.held_out = {name: InstructionBatches(self._in_chat(items), self.template, tokenizer, context, batch_size,
                                                  mask_prompt=mask_prompt).eval_batches() if items else None
                         for name, items in (("val", self.val_set), ("test", self.test_set))}
        val = self.held_out["val"]
        return StageTraining(micro_batch=batches.batch, batches_per_epoch=batches.plan.batches_per_epoch,
                             tokens_per_epoch=sum(batches.plan.lengths), longest=max(batches.plan.lengths, default=0),
                             loss_fn=lm_loss, eval_batches=(lambda: val) if val else None, tokens_in=real_tokens,
                             loss_weight=counted_targets)

    def finish(self, model: GPT, tokenizer: Tokenizer, run_dir: Path, result: TrainResult, device: torch.device,
               precision: str, final: FinalEvaluation) -> InstructResult:
        if not distributed.is_main():  # rank 0 evaluates, answers the test prompts and writes the results
            return InstructResult(run_dir=run_dir, train=result, val_loss=None, test_loss=None, rouge_l_f1=None,
                                  exact_match=None)
        summary: dict[str, Any] = {"step": result.step, "val_loss": None, "test_loss": None, "rouge_l_f1": None,
                                   "exact_match": None}
        if not final.skipped():
            self._evaluate(model, tokenizer, run_dir, device, precision, final, summary)
        summary["final_eval"] = final.outcome
        write_json_atomic(run_dir / RESULTS_FILE, summary)
        return InstructResult(run_dir=run_dir, train=result, val_loss=summary["val_loss"],
                              test_loss=summary["test_loss"], rouge_l_f1=summary["rouge_l_f1"],
                              exact_match=summary["exact_match"], final_eval=final.outcome,
                              names=self.split.names())

    def _evaluate(self, model: GPT, tokenizer: Tokenizer, run_dir: Path, device: torch.device, precision: str,
                  final: FinalEvaluation, summary: dict[str, Any]) -> None:
        """Held-out losses, then greedy answers to the test instructions (RUN/responses.json, ROUGE-L, exact match),
        in batches until `final` runs out of time."""
        for name, batches in self.held_out.items():
            if batches:
                summary[f"{name}_loss"] = evaluate_loss(model, batches, lm_loss, device, precision)
        test_set = [c for c in self.test_set if c[-1].role == "assistant" and len(c) >= 2 and c[-2].role == "user"]
        options = SamplingOptions(max_new_tokens=self.options.max_new_tokens, temperature=0.0)
        chat_format = ChatFormat(tokenizer, self.template, system=self.chat.system)
        answers: list[str] = []
        for first in range(0, len(test_set), ANSWER_BATCH):
            if final.out_of_time():
                final.note(f"cut at --max-minutes: {len(answers)} of {len(test_set)} test instructions answered")
                break
            answers += answer_all(model, chat_format, [c[:-1] for c in test_set[first:first + ANSWER_BATCH]],
                                  options, batch_size=ANSWER_BATCH)
        if answers:
            records = [_record(c, a) for c, a in zip(test_set, answers)]
            write_json_atomic(run_dir / RESPONSES_FILE, records)
            summary["rouge_l_f1"] = sum(rouge_l_f1(r["response"], r["output"]) for r in records) / len(records)
            summary["exact_match"] = sum(exact_match(r["response"], r["output"]) for r in records) / len(records)
