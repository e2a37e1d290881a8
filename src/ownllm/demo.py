"""The demo: a small model trained end to end on a corpus every Python installation has, then sampled.

    ownllm demo [--out runs/demo]          # or: make demo

The corpus is Python's own reference documentation (`pydoc_data.topics`, ~465 KB of English prose about the
language), so the demo runs offline on a fresh machine. It trains a byte-level BPE tokenizer, a ~2M-parameter
GPT for at most three minutes on the CPU, reports held-out loss, and prints samples for a few prompts.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ownllm.decoding import SamplingOptions, generate
from ownllm.outputs import check_output
from ownllm.pretrain import pretrain
from ownllm.runs import LoadedRun, load_run

PROMPTS = ["The with statement", "A class definition", "Exceptions are"]
DEMO_MODEL = dict(n_layer=4, n_head=4, n_embd=192, block_size=128)
DEMO_TRAIN = dict(batch_size=12, lr=2e-3, min_lr=2e-4, warmup_steps=50, max_steps=800, eval_interval=200,
                  eval_steps=10, weight_decay=0.1)
MARKER_FILE = ".ownllm-demo"  # marks a folder the demo made (and may replace)
TRAIN_MINUTES = 3.0  # a budget, so the demo ends in time on a slow or busy machine


def python_docs_text() -> str:
    """Python's reference documentation topics as one text, documents separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def run_demo(out: Path, max_steps: int | None = None, max_minutes: float | None = None,
             force: bool = False) -> None:
    """Train the demo model into `out` and print samples. An earlier demo run there (marked by MARKER_FILE) is
    replaced; anything else in `out` is refused unless `force`."""
    out = Path(out)
    if (out / MARKER_FILE).is_file():
        print(f"replacing the earlier demo run in {out}")
        shutil.rmtree(out)
    else:
        check_output(out, "dir", force=force)
        if out.exists():
            shutil.rmtree(out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "python-docs.txt"
        corpus.write_text(python_docs_text(), encoding="utf-8")
        print(f"corpus: Python's reference docs ({corpus.stat().st_size / 1e3:.0f} KB), tokenizer: byte-level BPE")
        train = dict(DEMO_TRAIN, max_steps=max_steps or DEMO_TRAIN["max_steps"],
                     max_minutes=max_minutes or TRAIN_MINUTES)
        try:
            result = pretrain(out=out, data=corpus, preset="mini", tokenizer="bpe", vocab_size=2048,
                              val_fraction=0.05, model_overrides=DEMO_MODEL, **train)
        finally:
            if out.is_dir():
                (out / MARKER_FILE).write_text("made by `ownllm demo`, which replaces this folder when run again\n")
    minutes = (time.perf_counter() - started) / 60
    if result.stopped_early:
        print(f"\nthe {train['max_minutes']:g}-minute time budget ended training at step {result.step} of "
              f"{train['max_steps']} (a slow or busy machine; --max-minutes gives it more time)")
    run = load_run(out)
    val_loss = held_out_loss(run, out)
    print(f"\ntrained {result.step} steps in {minutes:.1f} min: train loss {result.train_loss:.3f}, "
          f"val loss {val_loss:.3f}")
    options = SamplingOptions(max_new_tokens=80, temperature=0.8, top_k=50, seed=1)
    for prompt, text in zip(PROMPTS, generate(run.model, run.tokenizer, PROMPTS, options)):
        print(f"\n--- {prompt!r}\n{prompt}{text}")
    print(f"\nthe run is in {out}/; try: {ownllm_command()} generate {out} --prompt \"The for statement\"")


def ownllm_command() -> str:
    """How to call `ownllm` from a new shell: `ownllm` where that is on the PATH and is this installation, else the
    path of this installation's script (`.venv/bin/ownllm` after `make demo`), else `python -m ownllm`."""
    here = Path(sys.executable).parent / "ownllm"
    found = shutil.which("ownllm")
    if found and here.is_file() and Path(found).resolve() == here.resolve():
        return "ownllm"
    if not here.is_file():
        return f"{shlex.quote(sys.executable)} -m ownllm"
    try:
        return shlex.quote(str(here.absolute().relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(here.absolute()))


def held_out_loss(run: LoadedRun, out: Path) -> float:
    """The loss on the demo's validation tokens, measured now (whenever training stopped)."""
    import torch

    from ownllm.data.text import eval_windows, load_prepared
    from ownllm.training import evaluate_loss, lm_loss

    val = load_prepared(out / "data").val
    batches = eval_windows(val, run.config.block_size, DEMO_TRAIN["batch_size"], DEMO_TRAIN["eval_steps"])
    return evaluate_loss(run.model, batches, lm_loss, torch.device("cpu"), "fp32")
