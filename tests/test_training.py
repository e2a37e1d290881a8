"""The training loop: schedule, weight decay groups, loss that falls on real text, exact resume, graceful stop."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ownllm.runs import load_run
from ownllm.config import TrainConfig, model_config_from_preset
from ownllm.model import GPT
from ownllm.pretrain import pretrain
from ownllm.training import lr_at, make_optimizer


def python_docs(chars: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:chars]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ownllm", *args], capture_output=True, text=True, timeout=timeout)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(110, config) == pytest.approx(1e-4)
    values = [lr_at(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = GPT(model_config_from_preset("tiny", vocab_size=50))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith(".weight") and ("qkv" in n or "proj" in n or "fc" in n) for n in names)
    assert "tok_emb.weight" not in names and "pos_emb.weight" not in names
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_loss_falls_well_below_unigram_entropy_on_real_text(tmp_path):
    text = python_docs(200_000)
    corpus = tmp_path / "docs.txt"
    corpus.write_text(text, encoding="utf-8")
    counts = Counter(text)
    unigram = -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())  # nats per char
    result = pretrain(out=tmp_path / "run", data=corpus, preset="tiny", tokenizer="char", show_progress=False,
                      model_overrides=dict(n_embd=64, n_head=4, block_size=64), max_steps=250, batch_size=16,
                      lr=3e-3, warmup_steps=20, eval_interval=250, eval_steps=8, precision="fp32")
    assert result.val_loss is not None
    assert result.val_loss < unigram - 0.6, (result.val_loss, unigram)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _losses(run: Path) -> list[tuple[int, float, float | None]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text(python_docs(60_000), encoding="utf-8")
    common = ["--model", "tiny", "--tokenizer", "char", "--max-steps", "24", "--eval-interval", "8",
              "--eval-steps", "2", "--log-interval", "4", "--dropout", "0.1", "--batch-size", "4", "--grad-accum", "2"]
    straight = run_cli("pretrain", "--data", str(corpus), "--out", str(tmp_path / "a"), *common)
    assert straight.returncode == 0, straight.stderr
    first = run_cli("pretrain", "--data", str(corpus), "--out", str(tmp_path / "b"), *common, "--stop-at", "12")
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 12
    second = run_cli("pretrain", "--out", str(tmp_path / "b"), "--resume")
    assert second.returncode == 0, second.stderr
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_ctrl_c_finishes_the_step_saves_and_resumes(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text(python_docs(60_000), encoding="utf-8")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ownllm", "pretrain", "--data", str(corpus), "--out", str(run),
                             "--model", "tiny", "--tokenizer", "char", "--max-steps", "100000", "--log-interval", "1",
                             "--eval-interval", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and (run / "metrics.jsonl").read_text().count("\n") >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resume with --resume" in out
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert step >= 5
    loaded = load_run(run)  # the saved weights load
    assert loaded.config.n_layer == 2
    resumed = run_cli("pretrain", "--out", str(run), "--resume", "--max-steps", str(step + 3), "--eval-interval", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == step + 3


@pytest.mark.parametrize("peak, shown", [(1.0, False), (1e18, True)], ids=["busy-peak", "stable-peak"])
def test_mfu_is_not_shown_above_100_percent(tmp_path, monkeypatch, capsys, peak, shown):
    from ownllm import training

    monkeypatch.setattr(training, "matmul_peak_flops", lambda device_type, precision: peak)
    corpus = tmp_path / "docs.txt"
    corpus.write_text(python_docs(20_000), encoding="utf-8")
    pretrain(out=tmp_path / "run", data=corpus, preset="tiny", tokenizer="char", max_steps=3, log_interval=1,
             model_overrides=dict(block_size=32), batch_size=4, eval_interval=0, precision="fp32")
    assert ("mfu=" in capsys.readouterr().err) == shown


@pytest.mark.parametrize("flags, error", [
    (["--stop-at", "0"], "--stop-at must be at least 1, not 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, not -2"),
    (["--max-minutes", "0"], "--max-minutes must be more than 0, not 0"),
    (["--lora-rank", "-4"], "--lora-rank must be at least 0, not -4"),
    (["--val-fraction", "-0.1"], "--val-fraction must be at least 0, not -0.1"),
])
def test_a_flag_out_of_its_range_gets_one_line_and_exit_2(tmp_path, capsys, flags, error):
    from ownllm.cli import main

    assert main(["finetune", "instruct", "--model", "m", "--data", "d.json", "--out", str(tmp_path / "r"),
                 *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ownllm: error: {error}"]
    assert not (tmp_path / "r").exists()
