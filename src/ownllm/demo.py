"""The demo: a small model trained end to end on a corpus every Python installation has, then sampled.

    ownllm demo [--out runs/demo]          # or: make demo

The corpus is Python's own reference documentation (`pydoc_data.topics`, ~465 KB of English prose about the
language), so the demo runs offline on a fresh machine. It trains a byte-level BPE tokenizer, a ~2M-parameter
GPT for at most three minutes on the CPU, reports held-out loss, and prints samples for a few prompts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ownllm.checkpoint import CONFIG_FILE
from ownllm.decoding import SamplingOptions, generate
from ownllm.runs import load_run
from ownllm.pretrain import pretrain

PROMPTS = ["The with statement", "A class definition", "Exceptions are"]
DEMO_MODEL = dict(n_layer=4, n_head=4, n_embd=192, block_size=128)
DEMO_TRAIN = dict(batch_size=12, lr=2e-3, min_lr=2e-4, warmup_steps=50, max_steps=800, eval_interval=200,
                  eval_steps=10, weight_decay=0.1)
TRAIN_MINUTES = 3.0  # a budget, so the demo ends in time on a slow or busy machine


def python_docs_text() -> str:
    """Python's reference documentation topics as one text, documents separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def run_demo(out: Path, max_steps: int | None = None, max_minutes: float | None = None) -> None:
    """Train the demo model into `out` (replacing an earlier demo run there) and print samples."""
    if (out / CONFIG_FILE).exists():
        print(f"replacing the earlier demo run in {out}")
        shutil.rmtree(out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "python-docs.txt"
        corpus.write_text(python_docs_text(), encoding="utf-8")
        print(f"corpus: Python's reference docs ({corpus.stat().st_size / 1e3:.0f} KB), tokenizer: byte-level BPE")
        train = dict(DEMO_TRAIN, max_steps=max_steps or DEMO_TRAIN["max_steps"],
                     max_minutes=max_minutes or TRAIN_MINUTES)
        result = pretrain(out=out, data=corpus, preset="mini", tokenizer="bpe", vocab_size=2048, val_fraction=0.05,
                          model_overrides=DEMO_MODEL, **train)
    minutes = (time.perf_counter() - started) / 60
    print(f"\ntrained {result.step} steps in {minutes:.1f} min: train loss {result.train_loss:.3f}, "
          f"val loss {result.val_loss if result.val_loss is None else round(result.val_loss, 3)}")
    run = load_run(out)
    options = SamplingOptions(max_new_tokens=80, temperature=0.8, top_k=50, seed=1)
    for prompt, text in zip(PROMPTS, generate(run.model, run.tokenizer, PROMPTS, options)):
        print(f"\n--- {prompt!r}\n{prompt}{text}")
    print(f"\nthe run is in {out}/; try: ownllm generate {out} --prompt \"The for statement\"")
