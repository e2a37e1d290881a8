"""Pretraining: next-token prediction on raw text, from a prepared dataset or straight from text files.

    from ownllm.pretrain import pretrain
    pretrain(data="corpus/shakespeare.txt", out="runs/shk", preset="baby", tokenizer="char", max_steps=2000)
    pretrain(out="runs/shk", resume=True)            # continues exactly where the run stopped

CLI: `ownllm pretrain --data DATA --out RUN [--model mini] [--tokenizer bpe|char|PATH] [train flags]`.
Raw text in `--data` is tokenized inside the run (tokenizer trained on it, dataset written to RUN/data/).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ownllm import checkpoint, distributed
from ownllm.checkpoint import TOKENIZER_DIR
from ownllm.config import ModelConfig, TrainConfig, model_config_from_preset, train_config_for
from ownllm.data.text import PreparedData, WindowSampler, eval_windows, find_text_files, load_prepared, prepare_corpus
from ownllm.device import pick_device, pick_precision
from ownllm.errors import OwnLLMError
from ownllm.model import GPT, flops_per_token
from ownllm.probe import SpeedChoice, choose_speed, planned_steps
from ownllm.outputs import warn
from ownllm.tokenizer import Tokenizer, load_tokenizer, train_bpe, train_char
from ownllm.training import (TrainJob, TrainResult, discard_run_dir, resumed_train_config, start_run_dir,
                             train)


def is_prepared_dataset(path: str | Path) -> bool:
    return (Path(path) / "meta.json").is_file()


def build_tokenizer(spec: str, files: Sequence[Path], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """`char` or `bpe` trains one on `files`; anything else is a path to tokenizer files."""
    if spec == "char":
        return train_char(files)
    if spec == "bpe":
        return train_bpe(files, vocab_size=vocab_size, show_progress=show_progress)
    return load_tokenizer(spec)


def prepare_run_data(data: Sequence[str | Path], run_dir: Path, tokenizer_spec: str, vocab_size: int,
                     val_fraction: float, show_progress: bool) -> PreparedData:
    """A prepared dataset for the run: `data` itself when it is one, else raw text tokenized into RUN/data/."""
    if len(data) == 1 and is_prepared_dataset(data[0]):
        return load_prepared(data[0])
    files = find_text_files(data)
    tokenizer = build_tokenizer(tokenizer_spec, files, vocab_size, show_progress)
    return prepare_corpus(files, tokenizer, run_dir / "data", val_fraction=val_fraction, show_progress=show_progress)


def pretrain(
    out: str | Path,
    data: str | Path | Sequence[str | Path] | None = None,
    preset: str | None = None,
    *,
    resume: bool = False,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    val_fraction: float | None = None,
    model_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    show_progress: bool = True,
    force: bool = False,
    **train_overrides: Any,
) -> TrainResult:
    """Train a GPT on `data` into the run directory `out`, or resume the run in `out`.

    `model_overrides` change preset fields (n_layer, n_head, n_embd, block_size, dropout, ...); `train_overrides`
    are TrainConfig fields (lr, max_steps, batch_size, ...). On resume, only the train settings given here change;
    a model, data or tokenizer setting given with `resume` is refused (the run's own are used). Defaults: preset
    mini, tokenizer bpe, vocab_size 8000, val_fraction 0.05. `force` starts over in a folder that holds a run.
    """
    run_dir = Path(out)
    given = _data_and_model_settings(data, preset, tokenizer, vocab_size, val_fraction, model_overrides)
    if resume:
        if force:
            raise OwnLLMError("--force and --resume: choose one (--resume continues the run, --force starts it over)")
        if given:
            raise OwnLLMError(f"{', '.join(given)}: cannot change when resuming (the run keeps its model, data and "
                              "tokenizer); drop them, or start a new run with another --out")
        return _resume(run_dir, device, show_progress, train_overrides)
    preset, tokenizer = preset or "mini", tokenizer or "bpe"
    vocab_size = 8000 if vocab_size is None else vocab_size
    val_fraction = 0.05 if val_fraction is None else val_fraction
    distributed.init(pick_device(device))
    if not distributed.is_main():  # under torchrun: rank 0 prepares the run (tokenizer, dataset, config) meanwhile
        distributed.barrier()
        return _resume(run_dir, device, show_progress, train_overrides, new_run=True)
    if data is None:
        raise OwnLLMError("--data is required for a new run (a prepared dataset or text files/folders)")
    inputs = [data] if isinstance(data, (str, Path)) else list(data)
    model_config = model_config_from_preset(preset, **(model_overrides or {}))  # fail fast on a bad preset
    train_config = train_config_for(preset, **train_overrides)
    distributed.check_batch_size(train_config.batch_size)
    _check_tokenizer_flags(inputs, tokenizer, given)
    if train_config.eval_tasks:  # a missing data set or a misspelt task fails now, not at the first evaluation
        from ownllm.benchmarks import training_hook

        training_hook(train_config.eval_tasks, 1, tokenizer=None)
    run_dir, created = start_run_dir(run_dir, force=force, inputs=inputs)
    try:
        prepared = prepare_run_data(inputs, run_dir, tokenizer, vocab_size, val_fraction, show_progress)
        model_config = ModelConfig.from_dict({**model_config.to_dict(), "vocab_size": prepared.vocab_size})
        WindowSampler(prepared.train, model_config.block_size, train_config.batch_size)  # enough data?
        tok = load_tokenizer(prepared.directory / TOKENIZER_DIR)
        target = run_dir / TOKENIZER_DIR
        if target.resolve() != (prepared.directory / TOKENIZER_DIR).resolve():
            shutil.rmtree(target, ignore_errors=True)
            tok.save(target)
    except BaseException:
        discard_run_dir(run_dir, created)  # leave nothing behind for a run that never started
        raise
    checkpoint.write_run_config(run_dir, model_config, task="lm", preset=preset,
                                train=train_config.to_dict(), data=str(prepared.directory.resolve()),
                                tokenizer=tok.kind)
    distributed.barrier()
    return _train_prepared(run_dir, model_config, train_config, prepared, device, show_progress, resume=False)


def _data_and_model_settings(data: Any, preset: str | None, tokenizer: str | None, vocab_size: int | None,
                             val_fraction: float | None, model_overrides: dict[str, Any] | None) -> list[str]:
    """The flags given among those that set a new run's data, tokenizer and model."""
    values = {"--data": data, "--model": preset, "--tokenizer": tokenizer, "--vocab-size": vocab_size,
              "--val-fraction": val_fraction}
    values.update({f"--{name.replace('_', '-')}": value for name, value in (model_overrides or {}).items()})
    return [flag for flag, value in values.items() if value is not None]


def _check_tokenizer_flags(inputs: list[Any], tokenizer: str, given: list[str]) -> None:
    """Say so when tokenizer flags cannot apply: a prepared dataset has its tokenizer and split already, and only
    a BPE tokenizer trained here has a vocabulary size to choose."""
    if len(inputs) == 1 and is_prepared_dataset(inputs[0]):
        ignored = [flag for flag in ("--tokenizer", "--vocab-size", "--val-fraction") if flag in given]
        if ignored:
            warn(f"{', '.join(ignored)}: ignored, {inputs[0]} is a prepared dataset with its own tokenizer and split")
    elif "--vocab-size" in given and tokenizer != "bpe":
        warn(f"--vocab-size: ignored, it applies to a BPE tokenizer trained here, not to --tokenizer {tokenizer}")


def _resume(run_dir: Path, device: str, show_progress: bool, train_overrides: dict[str, Any],
            new_run: bool = False) -> TrainResult:
    """Continue the run in `run_dir`; `new_run`: start the run rank 0 has just prepared (other torchrun ranks)."""
    config = checkpoint.read_run_config(run_dir)
    model_config = ModelConfig.from_dict(config["model"])
    train_config = resumed_train_config(config, train_overrides)
    prepared = load_prepared(config["data"])
    if train_config.to_dict() != config.get("train") and distributed.is_main():
        checkpoint.write_run_config(run_dir, model_config, **{**{k: v for k, v in config.items()
                                                                  if k not in ("format", "model")},
                                                               "train": train_config.to_dict()})
    return _train_prepared(run_dir, model_config, train_config, prepared, device, show_progress, resume=not new_run)


def _train_prepared(run_dir: Path, model_config: ModelConfig, train_config: TrainConfig, prepared: PreparedData,
         device_name: str, show_progress: bool, resume: bool) -> TrainResult:
    device = distributed.init(pick_device(device_name))
    speed = _speed_choice(run_dir, model_config, train_config, device)
    if show_progress and distributed.is_main():
        print(f"speed: {speed.reason}", flush=True)
    sampler = WindowSampler(prepared.train, model_config.block_size, train_config.batch_size, seed=train_config.seed)
    eval_batches = None
    if train_config.eval_steps > 0 and len(prepared.val) > model_config.block_size:
        fixed = eval_windows(prepared.val, model_config.block_size, train_config.batch_size, train_config.eval_steps)
        eval_batches = lambda: fixed  # noqa: E731 - the same batches at every evaluation
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    benchmarks = None
    if train_config.eval_tasks:
        from ownllm.benchmarks import training_hook

        benchmarks = training_hook(train_config.eval_tasks, train_config.eval_limit,
                                   load_tokenizer(run_dir / TOKENIZER_DIR), precision=speed.precision)
    job = TrainJob(model=model, config=train_config, run_dir=run_dir, micro_batch=sampler.batch,
                   eval_batches=eval_batches, device=device, precision=speed.precision,
                   flops_per_token=flops_per_token(model), compile_model=speed.compile, benchmarks=benchmarks)
    return train(job, resume=resume, show_progress=show_progress)


def _speed_choice(run_dir: Path, model_config: ModelConfig, train_config: TrainConfig,
                  device: torch.device) -> SpeedChoice:
    """Precision and compilation for this run: the run's recorded choice when the settings are unchanged (a
    resumed run stays bit-exact), else measured (ownllm.probe); recorded in RUN/config.json under "speed"."""
    config = checkpoint.read_run_config(run_dir)
    asked = {"precision": train_config.precision, "compile": train_config.compile}
    recorded = config.get("speed")
    if isinstance(recorded, dict) and recorded.get("asked") == asked:
        return SpeedChoice(recorded["precision"], recorded["compile"], recorded["reason"] + " (as recorded in the run)",
                           recorded.get("step_ms", {}))
    if distributed.world_size() > 1:  # every process must agree: the width rule, no per-process measurement
        precision = pick_precision(train_config.precision, device, n_embd=model_config.n_embd)
        compiled = train_config.compile is True
        choice = SpeedChoice(precision, compiled, f"precision {precision} (rule of ownllm.device.pick_precision "
                             f"under torchrun), compile {'on' if compiled else 'off'}")
    else:
        start = 0
        state = checkpoint.checkpoint_dir(run_dir)
        if state is not None:
            start = int(checkpoint.read_json(state / checkpoint.STATE_FILE).get("step", 0))
        choice = choose_speed(model_config, train_config, device, planned_steps(train_config, start))
    if distributed.is_main():
        checkpoint.write_run_config(run_dir, model_config, **{**{k: v for k, v in config.items()
                                                                 if k not in ("format", "model")},
                                                              "speed": {**choice.to_dict(), "asked": asked}})
    return choice
