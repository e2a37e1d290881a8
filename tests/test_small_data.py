"""Small data: a --data of fewer than 200 records is not cut unless asked (every record trains, validation runs on a
copy of the training set, said in a note); one summary line before training; held-out metrics named with their
sizes."""

from __future__ import annotations

import re

import pytest

from finetune_helpers import instruction_records, numbered_instructions, preference_records, write_json
from ownllm.cli import main
from ownllm.finetune import finetune_instruct

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_small_file_keeps_every_record_for_training_and_validates_on_a_copy(base, tmp_path, capsys):
    data = write_json(tmp_path / "facts.json", instruction_records(34))
    assert main(["finetune", "instruct", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("template: alpaca (the project's default")
    assert lines[1].startswith(f"note: 34 records in {data} (fewer than 200): none held out")
    summary = next(line for line in lines if line.startswith("data: "))
    assert re.fullmatch(r"data: train \(34 records\), val \(a copy of the training set, 34 records\), test \(0 "
                        r"records\); template alpaca; [\d,]+ of [\d,]+ parameters train; [\d,]+ tokens per epoch",
                        summary), summary
    assert "val (a copy of the training set, 34 records) loss" in lines[-1]


def test_fractions_given_hold_out_and_large_files_keep_the_defaults(base, tmp_path, capsys):
    small = write_json(tmp_path / "small.json", instruction_records(34))
    result = finetune_instruct(out=tmp_path / "a", model=base, data=small, val_fraction=0.1, max_steps=1,
                               precision="fp32")
    out = capsys.readouterr().out
    assert "note: 34 records" not in out and "data: train (31 records), val (3 records), test (0 records)" in out
    assert result.names["val"] == "val (3 records)" and result.val_loss is not None and result.test_loss is None
    large = write_json(tmp_path / "large.json", numbered_instructions(200))
    result = finetune_instruct(out=tmp_path / "b", model=base, data=large, max_steps=1, max_new_tokens=2,
                               precision="fp32")
    assert result.names == {"train": "train (170 records)", "val": "val (10 records)", "test": "test (20 records)"}


def test_prefer_on_a_small_file_validates_on_a_copy_too(base, tmp_path, capsys):
    data = write_json(tmp_path / "prefs.json", preference_records(12))
    assert main(["finetune", "prefer", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "data: train (12 records), val (a copy of the training set, 12 records), test (0 records)" in out
    assert "val (a copy of the training set, 12 records): preference accuracy" in out.splitlines()[-1]
