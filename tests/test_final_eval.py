"""The held-out evaluation at the end of a fine-tuning stage: --max-minutes bounds the whole command (the final
evaluation is skipped when the time is spent, cut between batches when it runs out during it), Ctrl-C during
training skips it, and --no-final-eval leaves it out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from finetune_helpers import numbered_instructions, write_json
from ownllm.finetune import finetune_instruct
from ownllm.finetune.common import FinalEvaluation

pytestmark = pytest.mark.usefixtures("one_thread")


def _instruct(base, tmp_path, **options):
    data = write_json(tmp_path / "instructions.json", numbered_instructions(200))
    common = dict(model=base, data=data, val_fraction=0.1, test_fraction=0.2, max_new_tokens=24, batch_size=8,
                  show_progress=False, precision="fp32")
    return finetune_instruct(out=tmp_path / "run", **{**common, **options})


def test_max_minutes_bounds_the_whole_command_and_skips_the_final_evaluation(base, tmp_path):
    started = time.monotonic()
    result = _instruct(base, tmp_path, max_steps=100_000, max_minutes=0.05)
    elapsed = time.monotonic() - started
    assert result.train.stopped_early and result.train.step < 100_000
    assert result.final_eval == "skipped (--max-minutes reached)" and result.rouge_l_f1 is None
    assert elapsed < 0.05 * 60 + 3  # the deadline plus the last step and its checkpoint
    assert not (tmp_path / "run" / "responses.json").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final_eval"] == result.final_eval


def test_a_final_evaluation_that_runs_out_of_time_is_cut_between_batches(base, tmp_path, monkeypatch, capsys):
    checks = []

    def out_of_time(self) -> bool:  # the time runs out after the first batch of answers
        checks.append(1)
        return len(checks) > 2

    monkeypatch.setattr(FinalEvaluation, "out_of_time", out_of_time)
    result = _instruct(base, tmp_path, max_steps=2, show_progress=True)
    assert result.final_eval == "cut at --max-minutes: 16 of 40 test instructions answered"
    assert len(json.loads((tmp_path / "run" / "responses.json").read_text())) == 16
    assert result.test_loss is not None and result.rouge_l_f1 is not None
    assert f"note: final evaluation {result.final_eval}; the run is saved" in capsys.readouterr().out


def test_no_final_eval_leaves_it_out(base, tmp_path):
    result = _instruct(base, tmp_path, max_steps=2, final_eval=False)
    assert result.final_eval == "skipped (--no-final-eval)" and result.test_loss is None
    assert not (tmp_path / "run" / "responses.json").exists()


def test_ctrl_c_during_training_skips_the_final_evaluation(base, tmp_path):
    data = write_json(tmp_path / "instructions.json", numbered_instructions(200))
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "ownllm", "finetune", "instruct", "--model", str(base), "--data", str(data), "--out",
         str(run), "--max-steps", "100000", "--log-interval", "1", "--batch-size", "8", "--precision", "fp32",
         "--test-fraction", "0.5", "--max-new-tokens", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert time.monotonic() - sent < 20
    assert "note: final evaluation skipped (Ctrl-C); the run is saved" in out
    assert "final evaluation skipped (Ctrl-C)" in out.strip().splitlines()[-1]
    assert not (run / "responses.json").exists() and (run / "checkpoint").is_dir()
