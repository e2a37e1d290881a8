"""Pretraining: next-token prediction on raw text, from a prepared dataset or straight from text files.

    from ownllm.pretrain import pretrain
    pretrain(data="corpus/shakespeare.txt", out="runs/shk", preset="baby", tokenizer="char", max_steps=2000)
    pretrain(out="runs/shk", resume=True)            # continues exactly where the run stopped
    pretrain(PretrainOptions(out="runs/shk", data=["corpus/"], train={"max_steps": 2000}))   # the options, typed

CLI: `ownllm pretrain --data DATA --out RUN [--model mini] [--tokenizer bpe|char|PATH] [train flags]`.
Raw text in `--data` is tokenized inside the run (tokenizer trained on it, dataset written to RUN/data/).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ownllm import distributed
from ownllm.checkpoint import TOKENIZER_DIR, RunConfig
from ownllm.config import ModelConfig, model_config_from_preset, train_config_for
from ownllm.data.text import PreparedData, WindowSampler, eval_windows, find_text_files, load_prepared, prepare_corpus
from ownllm.device import pick_device
from ownllm.errors import OwnLLMError
from ownllm.model import GPT, flops_per_token
from ownllm.options import PretrainOptions
from ownllm.outputs import warn
from ownllm.tokenizer import Tokenizer, load_tokenizer, train_bpe, train_char
from ownllm.training import (TrainJob, TrainResult, discard_run_dir, record_run, resumed_train_config,
                             start_run_dir, train)


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


def pretrain(options: PretrainOptions | None = None, /, **keywords: Any) -> TrainResult:
    """Train a GPT on `data` into the run directory `out`, or resume the run in `out`: a `PretrainOptions`, or its
    fields as keywords (ownllm.options).

    `model_overrides` change preset fields (n_layer, n_head, n_embd, block_size, dropout, ...); the train settings
    are TrainConfig fields (lr, max_steps, batch_size, ...). On resume, only the train settings given here change;
    a model, data or tokenizer setting given with `resume` is refused (the run's own are used). Defaults: preset
    mini, tokenizer bpe, vocab_size 8000, val_fraction 0.05. `force` starts over in a folder that holds a run.
    """
    options = PretrainOptions.given(options, keywords)
    if options.resume:
        options.check_resume()
        return _resume(options)
    distributed.init(pick_device(options.device))
    if not distributed.is_main():  # under torchrun: rank 0 prepares the run (tokenizer, dataset, config) meanwhile
        distributed.barrier()
        return _resume(options, new_run=True)
    return _new_run(options)


def _new_run(options: PretrainOptions) -> TrainResult:
    """Check the settings, make the run directory, prepare the data, record the run's config and train."""
    if options.data is None:
        raise OwnLLMError("--data is required for a new run (a prepared dataset or text files/folders)")
    data, preset, tokenizer = options.data, options.preset or "mini", options.tokenizer or "bpe"
    vocab_size = 8000 if options.vocab_size is None else options.vocab_size
    val_fraction = 0.05 if options.val_fraction is None else options.val_fraction
    inputs = [data] if isinstance(data, (str, Path)) else list(data)
    model_config = model_config_from_preset(preset, **options.model_overrides)  # fail fast on a bad preset
    train_config = train_config_for(preset, **options.train)
    distributed.check_batch_size(train_config.batch_size)
    _check_tokenizer_flags(inputs, tokenizer, options)
    if train_config.eval_tasks:  # a missing data set or a misspelt task fails now, not at the first evaluation
        from ownllm.benchmarks import training_hook

        training_hook(train_config.eval_tasks, 1, tokenizer=None)
    run_dir, created = start_run_dir(options.out, force=options.force, inputs=inputs)
    try:
        prepared = prepare_run_data(inputs, run_dir, tokenizer, vocab_size, val_fraction, options.show_progress)
        model_config = ModelConfig.from_dict({**model_config.to_dict(), "vocab_size": prepared.vocab_size})
        WindowSampler(prepared.train, model_config.block_size, train_config.batch_size)  # enough data?
        tok = _copy_tokenizer(prepared, run_dir)
    except BaseException:
        discard_run_dir(run_dir, created)  # leave nothing behind for a run that never started
        raise
    config = RunConfig(model_config, "lm", options, train_config, sections=dict(
        preset=preset, data=str(prepared.directory.resolve()), tokenizer=tok.kind))
    device = distributed.init(pick_device(options.device))
    record_run(run_dir, config, None, device)
    distributed.barrier()
    return _train_prepared(run_dir, config, prepared, device, resume=False)


def _copy_tokenizer(prepared: PreparedData, run_dir: Path) -> Tokenizer:
    """The dataset's tokenizer, copied into the run (unless the dataset is the run's own RUN/data/)."""
    tok = load_tokenizer(prepared.directory / TOKENIZER_DIR)
    target = run_dir / TOKENIZER_DIR
    if target.resolve() != (prepared.directory / TOKENIZER_DIR).resolve():
        shutil.rmtree(target, ignore_errors=True)
        tok.save(target)
    return tok


def _check_tokenizer_flags(inputs: list[Any], tokenizer: str, options: PretrainOptions) -> None:
    """Say so when tokenizer flags cannot apply: a prepared dataset has its tokenizer and split already, and only
    a BPE tokenizer trained here has a vocabulary size to choose."""
    given = {"--tokenizer": options.tokenizer, "--vocab-size": options.vocab_size,
             "--val-fraction": options.val_fraction}
    if len(inputs) == 1 and is_prepared_dataset(inputs[0]):
        ignored = [flag for flag, value in given.items() if value is not None]
        if ignored:
            warn(f"{', '.join(ignored)}: ignored, {inputs[0]} is a prepared dataset with its own tokenizer and split")
    elif options.vocab_size is not None and tokenizer != "bpe":
        warn(f"--vocab-size: ignored, it applies to a BPE tokenizer trained here, not to --tokenizer {tokenizer}")


def _resume(options: PretrainOptions, new_run: bool = False) -> TrainResult:
    """Continue the run in `options.out`; `new_run`: start the run rank 0 has just prepared (other torchrun ranks)."""
    run_dir = Path(options.out)
    stored = RunConfig.read(run_dir, options, "lm")
    config = dataclasses.replace(stored, train=resumed_train_config(stored.train, options.train))
    prepared = load_prepared(config.options.data)
    device = distributed.init(pick_device(options.device))
    record_run(run_dir, config, stored, device)
    return _train_prepared(run_dir, config, prepared, device, resume=not new_run)


def _train_prepared(run_dir: Path, config: RunConfig, prepared: PreparedData, device: torch.device,
                    resume: bool) -> TrainResult:
    model_config, train_config, speed = config.model, config.train, config.speed
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
    return train(job, resume=resume, show_progress=config.options.show_progress)
