"""The options of the training stages, typed: one dataclass per stage over one shared base.

    from ownllm.options import InstructOptions
    finetune_instruct(InstructOptions(out="runs/assistant", model="runs/base", data="instructions.json",
                                      lora_rank=16, train={"max_steps": 200}))
    finetune_instruct(out="runs/assistant", model="runs/base", data="instructions.json", lora_rank=16,
                      max_steps=200)                          # the same: a stage function takes either

`StageOptions` holds what every stage shares: the run directory (`out`, `resume`, `force`), the device and the
train settings (`train`: the TrainConfig fields given; the stage's defaults fill the rest). `FinetuneOptions` adds
what every fine-tuning stage shares (the base model, the data and its split, what trains, LoRA); each stage adds
its own. A field made with `ownllm.config.option` is one flag of the stage's verb, with its help, spelling, choices
and group: ownllm.cli.options derives the parser from the dataclass (as litgpt derives its CLI from signatures), so
an option is written once, here, with its default.

A run's config.json keeps the options once (`ownllm.checkpoint.RunConfig`): under "options", or, for those that
loading reads (the base model, LoRA, the classifier's pooling, the prompt template, ...), as the top-level section
their `section` names, resolved; a resume reads both back into the same dataclass. What holds for one invocation
(`out`, `resume`, `force`, `device`, `show_progress`, `final_eval`) is never stored; the train settings are stored resolved, as
the run's TrainConfig.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ownllm.config import PRESETS, TRAIN_GROUP, ModelConfig, TrainConfig, option
from ownllm.errors import OwnLLMError
from ownllm.lora import TARGETS

PER_INVOCATION = ("out", "resume", "force", "device", "show_progress", "train",  # not among the stored options
                  "final_eval")
TEMPLATES = ("alpaca", "chatml")  # ownllm.data.instructions.TEMPLATES
BALANCES = ("none", "undersample", "weight")
Options = TypeVar("Options", bound="StageOptions")


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or f"--{field.name.replace('_', '-')}"


@dataclass(kw_only=True)
class StageOptions:
    """What every training stage takes."""

    out: str | Path = option(help="run directory")
    resume: bool = option(False, "continue the run in --out exactly where it stopped")
    force: bool = option(False, "start over in --out even if it holds a run")
    device: str = option("auto")
    show_progress: bool = True
    train: dict[str, Any] = option(default_factory=dict, fields_of=TrainConfig, group=TRAIN_GROUP)

    KEPT_ON_RESUME: ClassVar[tuple[str, ...]] = ()  # options that set what a resume keeps: refused with --resume
    KEPT_WHAT: ClassVar[str] = ""  # what they set, for that refusal
    TRAIN_FLAGS_LEFT_OUT: ClassVar[tuple[str, ...]] = ("eval_tasks", "eval_limit")  # pretraining's alone

    def __post_init__(self) -> None:
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train) - train_fields)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown train setting(s) {', '.join(unknown)}")
        check_ranges(dataclasses.fields(self), lambda name: getattr(self, name))
        check_ranges(dataclasses.fields(TrainConfig), self.train.get)

    @classmethod
    def given(cls: type[Options], options: Options | None, keywords: dict[str, Any]) -> Options:
        """`options`, or the options `keywords` give (a stage function takes either, not both)."""
        if options is None:
            return cls.from_keywords(**keywords)
        if not isinstance(options, cls):
            raise TypeError(f"expected a {cls.__name__}, not a {type(options).__name__}")
        if keywords:
            raise TypeError(f"give a {cls.__name__} or its fields as keywords, not both")
        return options

    @classmethod
    def from_keywords(cls: type[Options], **keywords: Any) -> Options:
        """The options of keyword arguments; a field of a dict option's dataclass (a TrainConfig field, such as
        max_steps) goes into that option (`train`)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {name: value for name, value in keywords.items() if name in fields}
        for name, value in keywords.items():
            if name in fields:
                continue
            holders = [f.name for f in fields.values() if f.metadata.get("fields_of")
                       and name in {g.name for g in dataclasses.fields(f.metadata["fields_of"])}]
            if not holders:
                raise TypeError(f"{cls.__name__}: no option {name!r}")
            values[holders[0]] = {**values.get(holders[0], {}), name: value}
        return cls(**values)

    def stored(self) -> dict[str, Any]:
        """What config.json keeps under "options": every option but those of one invocation and those kept as a
        section of their own."""
        return {f.name: _as_json(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in PER_INVOCATION and not f.metadata.get("section")}

    @classmethod
    def from_run(cls: type[Options], stored: dict[str, Any], sections: dict[str, Any], now: StageOptions) -> Options:
        """The options a run keeps (config.json's "options" and its sections), with this invocation's own from `now`
        (the run directory, the device, the train settings given now)."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in PER_INVOCATION:
                values[field.name] = getattr(now, field.name)
            elif field.metadata.get("section"):
                found = _section_value(sections, field.metadata["section"])
                if found is not MISSING:
                    values[field.name] = found
            elif field.name in stored:
                values[field.name] = stored[field.name]
        return cls(**values)

    def check_resume(self) -> None:
        """A resume continues the run as it is: --force, and the options that set the run's model and data, are
        refused with it, in one line."""
        if self.force:
            raise OwnLLMError("--force and --resume: choose one (--resume continues the run, --force starts it over)")
        fields = {f.name: f for f in dataclasses.fields(self)}
        given = []
        for name in self.KEPT_ON_RESUME:
            value = getattr(self, name)
            if isinstance(value, dict):
                given += [f"--{key.replace('_', '-')}" for key, item in value.items() if item is not None]
            elif value is not None:
                given.append(flag_of(fields[name]))
        if given:
            raise OwnLLMError(f"{', '.join(given)}: cannot change when resuming (the run keeps its {self.KEPT_WHAT}); "
                              "drop them, or start a new run with another --out")


def check_ranges(fields: Sequence[dataclasses.Field], value_of: Any) -> None:
    """Refuse a number outside its field's range (`at_least` / `above` in `ownllm.config.option`), naming the flag:
    `--stop-at 0` is not silently ignored."""
    for field in fields:
        value = value_of(field.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        at_least, above = field.metadata.get("at_least"), field.metadata.get("above")
        if at_least is not None and value < at_least:
            raise OwnLLMError(f"{flag_of(field)} must be at least {at_least:g}, not {value:g}")
        if above is not None and value <= above:
            raise OwnLLMError(f"{flag_of(field)} must be more than {above:g}, not {value:g}")


def _as_json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_as_json(item) for item in value]
    return value


def _section_value(sections: dict[str, Any], where: str) -> Any:
    """The value at `where` ("pooling", or "lora.rank": a key of a section) in a run's sections; MISSING when it
    is not there (a section that is null, e.g. no LoRA: the option's default)."""
    name, _, key = where.partition(".")
    value = sections.get(name, MISSING)
    if key:
        return value.get(key, MISSING) if isinstance(value, dict) else MISSING
    return value


@dataclass(kw_only=True)
class PretrainOptions(StageOptions):
    """`pretrain`: next-token prediction on raw text or a prepared dataset. The None defaults are the preset's or
    documented in the help (mini, bpe, 8000, 0.05); a resume refuses them given."""

    data: str | Path | Sequence[str | Path] | None = option(
        None, "a prepared dataset directory, or text files/folders", nargs="+", section="data")
    preset: str | None = option(None, f"preset (default mini): {', '.join(PRESETS)}", flag="--model",
                                section="preset")
    tokenizer: str | None = option(None, "for raw text: bpe (default), char, or a tokenizer path",
                                   section="tokenizer")
    vocab_size: int | None = option(None, "BPE vocabulary size for raw text (default 8000)", at_least=1)
    val_fraction: float | None = option(None, "held-out share of raw text (default 0.05)", at_least=0)
    model_overrides: dict[str, Any] = option(default_factory=dict, fields_of=ModelConfig, section="model")

    KEPT_ON_RESUME = ("data", "preset", "tokenizer", "vocab_size", "val_fraction", "model_overrides")
    KEPT_WHAT = "model, data and tokenizer"
    TRAIN_FLAGS_LEFT_OUT = ()


@dataclass(kw_only=True)
class FinetuneOptions(StageOptions):
    """What every fine-tuning stage takes: the base model, the data and its split, what trains, LoRA."""

    model: str | Path | None = option(None, "base model: an ownllm run directory (or a Hugging Face model "
                                            "directory)", section="base")
    data: str | Path | None = option(None, "training data file")
    val_file: str | Path | None = option(None, "validation data (default: a --val-fraction of --data)")
    test_file: str | Path | None = option(None, "test data (default: a --test-fraction of --data)")
    val_fraction: float | None = option(None, "held-out share of --data for validation (default 0.05; none for a "
                                              "file of fewer than 200 records, which validates on a copy of the "
                                              "training set)", at_least=0)
    test_fraction: float | None = option(None, "held-out share of --data for the final test (default 0.1; none for a "
                                               "file of fewer than 200 records)", at_least=0)
    split_seed: int = option(123, "seed of the val/test split")
    train_layers: str = option("all", "all | last:N | head (classification only)")
    lora_rank: int = option(0, "train LoRA adapters of this rank (0 = off)", section="lora.rank", at_least=0)
    lora_alpha: float | None = option(None, "LoRA alpha (default 2 * rank)", section="lora.alpha", above=0)
    lora_dropout: float = option(0.0, section="lora.dropout", at_least=0)
    lora_targets: Sequence[str] = option(TARGETS, f"modules that get adapters (default: all of {' '.join(TARGETS)})",
                                         nargs="+", choices=TARGETS, metavar="MODULE", section="lora.targets")
    epochs: float = option(1, "passes over the training data (unless --max-steps)", above=0)
    dropout: float | None = option(None, "dropout while fine-tuning (default: the base's)", at_least=0)
    final_eval: bool = option(True, "evaluate on the held-out data at the end (skipped after Ctrl-C, and when "
                                    "--max-minutes, which bounds the whole command, runs out)")

    KEPT_ON_RESUME = ("model", "data", "val_file", "test_file")
    KEPT_WHAT = "base model and data"
    HELD_OUT: ClassVar[tuple[float, float]] = (0.05, 0.1)  # the val and test fractions not given (large data)
    PATHS: ClassVar[tuple[str, ...]] = KEPT_ON_RESUME

    def paths(self) -> list[str | Path | None]:
        return [getattr(self, name) for name in self.PATHS]

    def with_resolved_paths(self: Options) -> Options:
        """The same options with absolute paths, which a resume started elsewhere finds again."""
        return dataclasses.replace(self, **{name: str(Path(value).resolve()) if value else None
                                            for name, value in zip(self.PATHS, self.paths())})


def stage_default(options: type, name: str, default: Any) -> Any:
    """The option `name` of `options` again, with a stage's own default (the same flag and help)."""
    (field,) = [f for f in dataclasses.fields(options) if f.name == name]
    return option(default, field.metadata["help"], flag=field.metadata["flag"], group=field.metadata["group"],
                  section=field.metadata["section"], at_least=field.metadata["at_least"],
                  above=field.metadata["above"], **field.metadata["argparse"])


@dataclass(kw_only=True)
class ClassifyOptions(FinetuneOptions):
    """`finetune classify`: labelled texts -> a classifier."""

    val_fraction: float = option(0.1, "held-out share of --data for validation", at_least=0)
    test_fraction: float = option(0.2, "held-out share of --data for the final test", at_least=0)
    epochs: float = stage_default(FinetuneOptions, "epochs", 5)
    text_column: str | None = option(None, "text column name (or number, 1 = first, in a file without a header)")
    label_column: str | None = option(None, "label column name (or number)")
    balance: str = option("none", "undersample every class to the smallest, or weight the loss by inverse class "
                                  "frequency", choices=BALANCES)
    pooling: str = option("last", "read the last real token (default) or the mean over the real tokens",
                          choices=["last", "mean"], section="pooling")
    max_length: int | None = option(None, "tokens kept per text (default: the context)", section="max_length",
                                    at_least=1)


@dataclass(kw_only=True)
class InstructOptions(FinetuneOptions):
    """`finetune instruct`: conversations in a prompt template -> an assistant."""

    epochs: float = stage_default(FinetuneOptions, "epochs", 2)
    template: str | None = option(None, "prompt template (default: the model's own, from its instruct run or chat "
                                        "template; alpaca for a model with none)", choices=TEMPLATES,
                                  section="template")
    system: str | None = option(None, "system prompt of the conversations that have none, kept as the run's chat "
                                      "default (default: the model's own)", section="chat.system")
    mask_prompt: bool = option(True, "learn only the responses (default) or the whole text")
    max_new_tokens: int = option(256, "length of the held-out responses", at_least=1)


@dataclass(kw_only=True)
class PreferOptions(FinetuneOptions):
    """`finetune prefer`: pairs of a chosen and a rejected answer -> a model that prefers the chosen (DPO)."""

    test_fraction: float | None = option(None, "held-out share of --data for the final test (default 0)",
                                         at_least=0)
    HELD_OUT = (0.05, 0.0)
    template: str | None = stage_default(InstructOptions, "template", None)
    system: str | None = stage_default(InstructOptions, "system", None)
    beta: float = option(0.1, "DPO beta: how far the model may move from where it started")
    loss: str = option("sigmoid", "DPO (sigmoid) or IPO loss", choices=["sigmoid", "ipo"])
    sft_weight: float = option(0.0, "add this much of the chosen answers' mean NLL per token to the loss (RPO; "
                                    "trl's rpo_alpha; default 0): keeps DPO from lowering the chosen answers' "
                                    "likelihood too, e.g. 1.0", metavar="ALPHA")


@dataclass(kw_only=True)
class EmbedOptions(FinetuneOptions):
    """`finetune embed`: (query, passage) pairs, or a folder of documents -> an embedding model for retrieval."""

    data: str | Path | None = option(None, "JSONL pairs: one {\"query\", \"positive\"[, \"negative\"]} per line "
                                           "(or a folder of documents, as --docs)")
    docs: str | Path | None = option(None, "no pairs: make them from this folder of documents (.txt/.md/.rst): a "
                                           "sentence of a passage is the query, the passage without it the "
                                           "positive (the inverse cloze task)")
    epochs: float = stage_default(FinetuneOptions, "epochs", 3)
    pooling: str = option("mean", "how a text's hidden states become its vector (read by embed, index, ask and the "
                                  "server)", choices=["mean", "last", "weighted-mean"], section="embedding_pooling")
    temperature: float = option(0.05, "softmax temperature of the contrastive loss over cosine similarities",
                                above=0)
    symmetric: bool = option(False, "also match each passage to its query (the loss both ways)")
    query_prefix: str = option("query: ", "put before every query, in training and when asking",
                               section="embedding_prefixes.query")
    document_prefix: str = option("passage: ", "put before every passage, in training and when indexing",
                                  section="embedding_prefixes.document")
    max_length: int = option(256, "tokens kept per text (at most the context)", section="max_length", at_least=8)

    KEPT_ON_RESUME = ("model", "data", "docs", "val_file", "test_file")
    PATHS = ("model", "data", "val_file", "test_file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.docs is not None:  # --docs FOLDER is --data FOLDER
            if self.data is not None and str(self.data) != str(self.docs) and not self.resume:
                raise OwnLLMError("--data and --docs: give one (pairs, or a folder of documents to make them from)")
            if not self.resume:
                self.data, self.docs = self.docs, None
