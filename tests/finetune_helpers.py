"""Shared by the fine-tuning tests: a tiny pretrained base run (made once per session), small data, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

_BASE: dict[str, Path] = {}


def python_docs(chars: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:chars]


def tiny_base(tmp_path_factory) -> Path:
    """A `tiny` GPT (block 128) pretrained for a few hundred steps on Python's docs with a 400-token BPE."""
    if "base" not in _BASE:
        from ownllm.pretrain import pretrain

        root = tmp_path_factory.mktemp("base")
        corpus = root / "docs.txt"
        corpus.write_text(python_docs(150_000), encoding="utf-8")
        with single_thread():
            pretrain(out=root / "run", data=corpus, preset="tiny", tokenizer="bpe", vocab_size=400,
                     model_overrides=dict(block_size=128), show_progress=False, max_steps=200, batch_size=16,
                     eval_interval=0, precision="fp32")
        _BASE["base"] = root / "run"
    return _BASE["base"]


class single_thread:
    """Tiny models train several times faster on one thread than on two busy ones (and tests share machines)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)


def sentiment_lines(n: int, seed: int = 0) -> list[str]:
    """`text<TAB>label` lines: label 1 texts hold a positive word, label 0 texts a negative one."""
    rng = random.Random(seed)
    good, bad = ["great", "excellent", "lovely", "superb"], ["awful", "terrible", "broken", "poor"]
    filler = ["the", "phone", "was", "really", "and", "it", "is", "battery", "screen"]
    lines = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(2, 10))]
        words.insert(rng.randint(0, len(words)), rng.choice(good if label else bad))
        lines.append(f"{' '.join(words)}\t{label}")
    return lines


WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "grape", "peach"]
SAY = ["Say {}.", "Say {}!", "Please say {}.", "Say the word {}.", "Say {}, please.", "Write {}.", "Answer {}.",
       "Reply {}.", "Say only {}.", "Just say {}.", "Tell me {}.", "Say {} now."]
REPEAT = ["Repeat the word.", "Repeat this word.", "Say the word twice.", "Write the word twice.", "Repeat it.",
          "Double the word.", "Say it twice.", "Write it twice.", "Repeat the word, please.", "Say this word twice.",
          "Repeat it please.", "Give the word twice."]


def instruction_records(n: int) -> list[dict[str, str]]:
    """Up to 96 distinct records (a repeated one would be skipped): "Say plum." -> "plum", and "Repeat the word."
    with an input word -> the word twice, in a dozen phrasings each."""
    records = []
    for i in range(n):
        word, phrasing = WORDS[i % len(WORDS)], i // len(WORDS)
        if i % 3 == 0:
            records.append({"instruction": REPEAT[phrasing], "input": word, "output": f"{word} {word}"})
        else:
            records.append({"instruction": SAY[phrasing].format(word), "input": "", "output": word})
    return records


def numbered_instructions(n: int) -> list[dict[str, str]]:
    """Any number of distinct records ("Say plum, number 7." -> "plum"), for files of 200 records and more."""
    return [{"instruction": f"Say {WORDS[i % len(WORDS)]}, number {i}.", "input": "", "output": WORDS[i % len(WORDS)]}
            for i in range(n)]


def preference_records(n: int) -> list[dict[str, str]]:
    """The chosen answer says please, the rejected one is curt; alternately in the book's and trl's format; no two
    alike."""
    records = []
    for i in range(n):
        word = WORDS[i % len(WORDS)] + ("s" * (i // len(WORDS)))
        if i % 2:
            records.append({"instruction": f"Name the fruit {word}.", "input": "", "chosen": f"Please: {word}.",
                            "rejected": f"{word}!"})
        else:
            records.append({"prompt": f"Say {word}.", "chosen": f"Please: {word}.", "rejected": f"{word}!"})
    return records


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ownllm", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ownllm: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(straight: Path, resumed: Path, logged_metric: str) -> None:
    """A resumed run equals the uninterrupted one: the same weights bit for bit and the same logged metrics (timings
    left out), among which `logged_metric`."""
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "model.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [[{k: v for k, v in row.items() if k not in ("tokens_per_sec", "time")} for row in metrics_rows(run)]
              for run in (straight, resumed)]
    assert logged[0] == logged[1] and any(logged_metric in row for row in logged[0])
