"""What the fine-tuning stages share: which parameters train, LoRA runs, train settings, the run directory, merging.

A fine-tuned run directory is an ordinary run (config.json, tokenizer/, checkpoint/, metrics.jsonl, loss.png) with
"task": "classify", "instruct" or "prefer" in its config. A full fine-tune publishes its weights as model.safetensors; a LoRA
run keeps only its adapters (and head) in the PEFT layout, adapter_config.json + adapter_model.safetensors, and
names its base run in config.json ("base"), which must stay where it was (or merge with `ownllm merge-lora`).
Loading any of these runs (and the base model a stage starts from) is ownllm.runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ownllm import checkpoint, distributed, outputs
from ownllm.chat import PROJECT_DEFAULT, chat_settings, default_system, own_template
from ownllm.chat_templates import Template, get_template
from ownllm.checkpoint import TOKENIZER_DIR, RunConfig
from ownllm.config import ModelConfig, TrainConfig
from ownllm.data.labelled import split_examples
from ownllm.device import pick_device
from ownllm.errors import OwnLLMError
from ownllm.lora import LoRAConfig, apply_lora, merge_lora, save_peft_adapter
from ownllm.model import GPT, flops_per_token
from ownllm.options import FinetuneOptions
from ownllm.runs import LoadedRun, copy_base_weights, load_base
from ownllm.tokenizer import Tokenizer
from ownllm.training import (Batch, LossFn, TrainJob, TrainResult, deadline_of, discard_run_dir, lm_loss,
                             record_run, resumed_train_config, start_run_dir, train)
RESULTS_FILE = "metrics.json"  # final metrics of a fine-tuning run (the training log is metrics.jsonl)


def with_dropout(config: ModelConfig, dropout: float | None) -> ModelConfig:
    return config if dropout is None else ModelConfig.from_dict({**config.to_dict(), "dropout": dropout})


def select_trainable(model: GPT, spec: str, head: tuple[str, ...] = ()) -> None:
    """Which parameters train: `all`, `head` (only the modules named in `head`), or `last:N` (the last N blocks,
    the final norm and the head)."""
    for param in model.parameters():
        param.requires_grad_(spec == "all")
    if spec == "all":
        return
    if spec == "head":
        if not head:
            raise OwnLLMError("--train-layers head needs a task head (classification); use last:N, all or LoRA")
        blocks = 0
    elif spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) >= 1:
        blocks = int(spec[5:])
        if blocks > len(model.blocks):
            raise OwnLLMError(f"--train-layers {spec}: the model has {len(model.blocks)} blocks; use last:N with "
                              f"N <= {len(model.blocks)}, or all")
    else:
        raise OwnLLMError(f"--train-layers {spec!r}: use all, head or last:N (N >= 1)")
    modules = [getattr(model, name) for name in head]
    if blocks:
        modules += [*model.blocks[len(model.blocks) - blocks:], model.norm]
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(True)


def lora_config_from(options: FinetuneOptions) -> LoRAConfig | None:
    if not options.lora_rank:
        return None
    alpha = options.lora_alpha if options.lora_alpha is not None else 2 * options.lora_rank
    return LoRAConfig(rank=options.lora_rank, alpha=float(alpha), dropout=options.lora_dropout,
                      targets=tuple(options.lora_targets))


SMALL_DATA = 200  # records in --data below which nothing is held out unless asked


@dataclass
class Splits:
    """A stage's train / val / test records, and whether validation runs on a copy of the training set."""

    train: list
    val: list
    test: list
    val_is_train: bool = False
    note: str | None = None  # said after the template (the first line of output)

    def name(self, split: str) -> str:
        """The split as metrics name it, with its size: "val (3 records)", "val (a copy of the training set, ...)"."""
        count = len(getattr(self, split))
        copy = "a copy of the training set, " if split == "val" and self.val_is_train else ""
        return f"{split} ({copy}{count} record{'s' if count != 1 else ''})"

    def names(self) -> dict[str, str]:
        return {split: self.name(split) for split in ("train", "val", "test")}


def split_records(pool: list, read: Callable[[str | Path], list], options: FinetuneOptions) -> Splits:
    """Train / val / test records: --val-file / --test-file, or a seeded cut of `pool` (--data) by --val-fraction and
    --test-fraction (the options' HELD_OUT when not given). A --data of fewer than SMALL_DATA records ("teach it my
    facts") is not cut unless asked: every record trains, and validation runs on a copy of the training set, said in
    a note (`Splits.note`)."""
    small = len(pool) < SMALL_DATA

    def fraction(given: float | None, default: float, file: str | Path | None) -> float:
        if file:
            return 0.0
        return given if given is not None else 0.0 if small else default

    o = options
    train, val, test = split_examples(pool, fraction(o.val_fraction, o.HELD_OUT[0], o.val_file),
                                      fraction(o.test_fraction, o.HELD_OUT[1], o.test_file), o.split_seed)
    splits = Splits(train, read(o.val_file) if o.val_file else val, read(o.test_file) if o.test_file else test)
    if small and o.val_fraction is None and not o.val_file:
        splits.val, splits.val_is_train = list(train), True
        splits.note = (f"note: {len(pool)} records in {o.data} (fewer than {SMALL_DATA}): none held out, so every "
                       "fact trains; validation runs on a copy of the training set (it shows what was learned, not "
                       "how it generalises); --val-fraction, --test-fraction or --val-file hold some out")
    return splits


DEFAULT_TEMPLATE = "alpaca"  # the prompt template of a stage whose base model has none of its own


@dataclass
class StageChat:
    """How a stage writes its conversations: the template, the system message those without one get, and the run's
    chat defaults (config.json "chat"), all from the base model unless the options say otherwise."""

    template: Template
    system: str | None
    settings: dict[str, Any]
    origin: str  # where the template comes from, for the first line of output

    @classmethod
    def of(cls, base: LoadedRun, template: str | None, system: str | None) -> "StageChat":
        """`template` (--template), else the base model's own (ownllm.chat.own_template), else DEFAULT_TEMPLATE;
        `system` (--system), else the base run's, else the default system prompt of the model's own template. The
        base run's chat defaults carry over to the new run."""
        settings = chat_settings(base.run_config)
        if system is not None:
            settings["system"] = system
        own = own_template(base.run_config, base.tokenizer)
        name = template or own or DEFAULT_TEMPLATE
        origin = "--template" if template else "the model's own" if own else PROJECT_DEFAULT
        return cls(get_template(name), default_system({"chat": settings}, base.tokenizer, name), settings, origin)

    def sections(self) -> dict[str, Any]:
        return dict(template=self.template.name, chat=self.settings or None)

    def announce(self, show: bool) -> None:
        if show and distributed.is_main():
            system = f"; system prompt {self.system!r}" if self.system else ""
            print(f"template: {self.template.name} ({self.origin}){system}", flush=True)


def train_config_for_finetune(overrides: dict[str, Any], batches_per_epoch: int, epochs: float,
                              default_lr: float) -> TrainConfig:
    """TrainConfig for a fine-tuning run: `epochs` over the training set unless --max-steps is given; warmup 5%
    of the steps; an evaluation about ten times per run."""
    given = {k: v for k, v in overrides.items() if v is not None}
    batch_size = given.get("batch_size", 8)
    grad_accum = given.get("grad_accum", 1)
    max_steps = given.get("max_steps") or max(1, math.ceil(epochs * batches_per_epoch / grad_accum))
    values: dict[str, Any] = dict(batch_size=batch_size, lr=default_lr, warmup_steps=max(1, max_steps // 20),
                                  max_steps=max_steps, eval_interval=max(1, max_steps // 10), eval_steps=0,
                                  log_interval=max(1, min(10, max_steps // 20)), weight_decay=0.1)
    values.update(given)
    return TrainConfig(**values)


def adapt_model(model: GPT, lora: LoRAConfig | None, train_layers: str, head: tuple[str, ...]) -> None:
    """Make the right parameters trainable: LoRA adapters plus the head, or a `select_trainable` spec."""
    if lora is None:
        select_trainable(model, train_layers, head)
        return
    if train_layers not in ("all", "head"):
        raise OwnLLMError("--train-layers and --lora-rank do not combine: with LoRA, adapters and the head train")
    apply_lora(model, lora)
    for name in head:
        for param in getattr(model, name).parameters():
            param.requires_grad_(True)


def merge_lora_run(run: LoadedRun, out: str | Path, force: bool = False) -> Path:
    """Fold a loaded LoRA run's adapters into its base weights and write a self-contained run at `out` (an
    existing non-empty `out` is replaced only with `force`, never when it is the LoRA run itself)."""
    if not run.run_config.get("lora"):
        raise OwnLLMError(f"{run.path}: not a LoRA run (its config has no \"lora\" section)")
    out_dir = outputs.check_output(out, "dir", inputs=[run.path], force=force)
    merge_lora(run.model)
    sections = {k: v for k, v in run.run_config.items() if k not in ("format", "model", "lora")}
    sections["merged_from"] = str(Path(run.path).resolve())
    with outputs.replaced_dir(out_dir) as staging:
        checkpoint.save_weights(run.model, staging / checkpoint.WEIGHTS_FILE)
        run.tokenizer.save(staging / TOKENIZER_DIR)
        checkpoint.write_run_config(staging, run.config, **sections)
    return out_dir


# ---- the skeleton every fine-tuning stage shares ------------------------------------------------------------------

@dataclass
class FinalEvaluation:
    """The held-out evaluation at the end of a stage: skipped with --no-final-eval, after Ctrl-C, or when the
    --max-minutes of the whole command have run out; a stage checks `out_of_time` between its parts and cuts it
    there. What happened is said in a note and kept in metrics.json ("final_eval")."""

    enabled: bool
    deadline: float | None  # time.monotonic() by which the command ends
    interrupted: bool = False
    show: bool = True
    outcome: str = "done"

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def skipped(self) -> bool:
        """Whether to skip it all (saying why, once)."""
        reason = ("--no-final-eval" if not self.enabled else "Ctrl-C" if self.interrupted
                  else "--max-minutes reached" if self.out_of_time() else None)
        if reason is not None:
            self.note(f"skipped ({reason})")
        return reason is not None

    def note(self, outcome: str) -> None:
        self.outcome = outcome
        if self.show:
            print(f"note: final evaluation {outcome}; the run is saved", flush=True)


@dataclass
class StageTraining:
    """What a stage brings to the training loop besides the model: its batches, loss and held-out batches."""

    micro_batch: Callable[[int], Batch]
    batches_per_epoch: int
    loss_fn: LossFn = lm_loss
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    tokens_in: Callable[[Batch], int] | None = None
    loss_weight: Callable[[Batch], float] | None = None  # None: the loop's default (rows)
    eval_metrics: Callable[[nn.Module], dict[str, float]] | None = None  # more metrics per evaluation (TrainJob's)
    tokens_per_epoch: int = 0  # of the training records, as batched (for the summary line)
    longest: int = 0  # tokens of the longest training row: the length the speed probe times (0: the context)


class FinetuneStage:
    """One fine-tuning stage: what `run_stage` asks of it, in the order it asks. A subclass (classify, instruct, a
    later `prefer`) reads its data, builds its batches, model and results; the skeleton does the rest."""

    task = ""  # config.json "task"
    split: Splits  # the records of each split, set by read_data
    chat: StageChat | None = None  # the template and system prompt of a stage that writes conversations
    data_kind = ""  # what --data must be, for the error of a new run without it
    peft_task_type = "CAUSAL_LM"
    head: tuple[str, ...] = ()  # modules the stage adds on top of the language model (they always train)

    def __init__(self, options: FinetuneOptions) -> None:
        self.options = options  # as given; on resume, the ones the run stored (ownllm.options)

    def read_data(self) -> None:
        raise NotImplementedError

    def use_base(self, base: LoadedRun) -> None:
        """Read what the stage needs from the base run (prefer: its prompt template); nothing by default."""

    def default_lr(self, lora: LoRAConfig | None) -> float:
        raise NotImplementedError

    def new_model(self, model_config: ModelConfig) -> GPT:
        return GPT(model_config)

    def config_sections(self, model_config: ModelConfig) -> dict[str, Any]:
        """What config.json records about the task, besides the sections every stage writes."""
        return {}

    def training(self, tokenizer: Tokenizer, model_config: ModelConfig, batch_size: int, seed: int,
                 device: torch.device) -> StageTraining:
        raise NotImplementedError

    def prepare(self, model: GPT, run_dir: Path, device: torch.device, precision: str) -> None:
        """Just before training, with the starting weights (a resume loads its checkpoint later): prefer computes
        its reference log-probs here; nothing by default."""

    def finish(self, model: GPT, tokenizer: Tokenizer, run_dir: Path, result: TrainResult, device: torch.device,
               precision: str, final: FinalEvaluation) -> Any:
        """The stage's result; on rank 0 its held-out evaluation (as `final` allows) is written to the run
        directory first."""
        raise NotImplementedError


def run_stage(stage: FinetuneStage) -> Any:
    """Start a fine-tuning run in `out` with the stage's options (a new run), or resume the run in `out` with the
    options it stored. A new run that fails before its first checkpoint leaves no directory behind; `force` starts
    over in a folder that holds a run (`ownllm.outputs.start_run_dir`)."""
    asked = stage.options
    deadline = deadline_of(asked.train.get("max_minutes"))  # --max-minutes bounds the whole command
    if asked.resume:
        asked.check_resume()
        stored = RunConfig.read(Path(asked.out), asked, stage.task)
        stage.options = stored.options
        return _fit(stage, Path(asked.out), stored, deadline)
    run_dir, created = start_run_dir(asked.out, force=asked.force, inputs=asked.paths())
    try:
        if asked.data is None:
            raise OwnLLMError(f"--data is required for a new run ({stage.data_kind})")
        stage.options = asked.with_resolved_paths()
        return _fit(stage, run_dir, None, deadline)
    except BaseException:
        if not (run_dir / checkpoint.CHECKPOINT_DIR).exists():
            discard_run_dir(run_dir, created)
        raise


def _fit(stage: FinetuneStage, run_dir: Path, stored: RunConfig | None, deadline: float | None) -> Any:
    """Read the data, build the model from the base, record the run's config, train, and let the stage finish."""
    o = stage.options
    stage.read_data()
    base = load_base(o.model)
    stage.use_base(base)
    if stage.split.note and o.show_progress and distributed.is_main():
        print(stage.split.note, flush=True)
    model_config = with_dropout(base.config, o.dropout)
    lora = lora_config_from(o)
    train_config = resumed_train_config(stored.train, o.train) if stored else None
    batch_size = (train_config.batch_size if train_config else o.train.get("batch_size")) or 8
    seed = train_config.seed if train_config else o.train.get("seed") or 1337
    device = distributed.init(pick_device(o.device))
    training = stage.training(base.tokenizer, model_config, batch_size, seed, device)
    if train_config is None:
        train_config = train_config_for_finetune(o.train, training.batches_per_epoch, o.epochs, stage.default_lr(lora))
    model = _stage_model(stage, base, model_config, lora, train_config.seed)
    if stored is None and distributed.is_main():
        base.tokenizer.save(run_dir / TOKENIZER_DIR)
    config = RunConfig(model_config, stage.task, o, train_config, sections=dict(
        base=o.model, lora=lora.to_dict() if lora else None, **stage.config_sections(model_config)))
    speed = record_run(run_dir, config, stored, device, seq_len=training.longest or None)
    if o.show_progress and distributed.is_main():
        print(data_summary(stage, model, training), flush=True)
    stage.prepare(model, run_dir, device, speed.precision)
    job = TrainJob(model=model, config=train_config, run_dir=run_dir, micro_batch=training.micro_batch,
                   loss_fn=training.loss_fn, eval_batches=training.eval_batches, device=device,
                   precision=speed.precision, flops_per_token=flops_per_token(model), compile_model=speed.compile,
                   tokens_in=training.tokens_in, save_trainable_only=lora is not None,
                   on_checkpoint=_adapter_writer(stage, model, lora), eval_metrics=training.eval_metrics,
                   deadline=deadline)
    if training.loss_weight is not None:
        job.loss_weight = training.loss_weight
    result = train(job, resume=o.resume, show_progress=o.show_progress)
    final = FinalEvaluation(o.final_eval, deadline, result.interrupted, o.show_progress and distributed.is_main())
    return stage.finish(model, base.tokenizer, run_dir, result, device, speed.precision, final)


def data_summary(stage: FinetuneStage, model: GPT, training: StageTraining) -> str:
    """The line said before training: records per split, the template, what trains, tokens per epoch."""
    names = stage.split.names()
    template = f"; template {stage.chat.template.name}" if stage.chat is not None else ""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"data: {names['train']}, {names['val']}, {names['test']}{template}; {trainable:,} of {total:,} "
            f"parameters train; {training.tokens_per_epoch:,} tokens per epoch")


def _stage_model(stage: FinetuneStage, base: LoadedRun, model_config: ModelConfig, lora: LoRAConfig | None,
                 seed: int) -> GPT:
    """The stage's model with the base's weights, and the right parameters trainable; the base's copy is let go."""
    torch.manual_seed(seed)
    model = stage.new_model(model_config)
    copy_base_weights(model, base.model)
    del base.model
    adapt_model(model, lora, stage.options.train_layers, head=stage.head)
    if stage.head and model.lm_head.weight is not model.tok_emb.weight:
        model.lm_head.weight.requires_grad_(False)  # a model with its own head never reads the LM head (DDP needs
        # a gradient for every parameter that trains)
    return model


def _adapter_writer(stage: FinetuneStage, model: GPT, lora: LoRAConfig | None) -> Callable[[Path], None] | None:
    """With LoRA: what writes the adapters (and the head) in the PEFT layout at each checkpoint."""
    if lora is None:
        return None

    def write(directory: Path) -> None:
        extra = {f"{name}.weight": getattr(model, name).weight for name in stage.head}
        save_peft_adapter(model, lora, directory, base=stage.options.model, task_type=stage.peft_task_type,
                          extra=extra or None)
    return write
