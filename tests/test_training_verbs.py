"""Every training verb (pretrain, finetune classify|instruct|prefer|embed) takes --force and --resume the same way:
over an existing run, neither is refused in one line (exit 2, the run untouched), --resume continues the run (the
step count goes on), --force starts it over (a fresh run); both together, or --resume of no run or of another verb's run, are
refused in one line; never a traceback. The options a run
stores are read back by the resume: each once in config.json (the LoRA rank in its "lora" section only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_helpers import instruction_records, metrics_rows, preference_records, sentiment_lines, write_json
from output_helpers import printed_lines, snapshot
from test_finetune_embed import synthetic_pairs, write_pairs
from ownllm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# a new run of each verb, without --out; the verb's words before the first flag also resume it
VERBS = {
    "pretrain": ["pretrain", "--data", "{data}", "--model", "tiny"],
    "classify": ["finetune", "classify", "--model", "{base}", "--data", "{tsv}", "--lora-rank", "2"],
    "instruct": ["finetune", "instruct", "--model", "{base}", "--data", "{json}", "--lora-rank", "2",
                 "--max-new-tokens", "2"],
    "prefer": ["finetune", "prefer", "--model", "{base}", "--data", "{prefs}", "--lora-rank", "2"],
    "embed": ["finetune", "embed", "--model", "{base}", "--data", "{pairs}", "--lora-rank", "2"],
}
SMALL = ["--batch-size", "4", "--precision", "fp32", "--eval-interval", "0", "--log-interval", "1"]


@pytest.fixture(scope="module")
def inputs(base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("verbs")
    (root / "texts.tsv").write_text("\n".join(sentiment_lines(24)) + "\n", encoding="utf-8")
    return {"base": str(base), "data": json.loads((base / "config.json").read_text())["data"],
            "tsv": str(root / "texts.tsv"),
            "json": str(write_json(root / "instructions.json", instruction_records(24))),
            "prefs": str(write_json(root / "prefs.json", preference_records(16))),
            "pairs": str(write_pairs(root / "pairs.jsonl", synthetic_pairs(16)))}


def run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, printed_lines(err)


def step_of(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]


def stored(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("train", "speed")}


@pytest.mark.parametrize("verb", VERBS)
def test_force_and_resume_work_the_same_way_for_every_training_verb(verb, inputs, tmp_path, capsys):
    out = tmp_path / "run"
    new = [arg.format(**inputs) for arg in VERBS[verb]] + ["--out", out, *SMALL]
    words = VERBS[verb][:VERBS[verb].index(next(a for a in VERBS[verb] if a.startswith("--")))]

    assert run(capsys, [*new, "--max-steps", "4", "--stop-at", "2"])[0] == 0
    assert step_of(out) == 2
    first = stored(out)
    assert not set(first["options"]) & set(first), "an option stored twice"
    if verb != "pretrain":
        assert first["lora"]["rank"] == 2 and "lora_rank" not in first["options"]

    before = snapshot(out, inputs["base"])
    refused = [([*new, "--max-steps", "4"], "already holds a run: pass --resume to continue it, --force"),
               ([*words, "--resume", "--force", "--out", out], "--force and --resume: choose one"),
               ([*words, "--resume", "--out", tmp_path / "missing"], "no such run directory")]
    if verb != "pretrain":  # the base is a pretraining run: not one this verb resumes
        refused.append(([*words, "--resume", "--out", inputs["base"]], "'lm' run, not a"))
    for argv, named in refused:
        code, lines = run(capsys, argv)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("ownllm: error: ") and named in lines[0], lines
    assert snapshot(out, inputs["base"]) == before

    assert run(capsys, [*words, "--resume", "--out", out])[0] == 0  # continues: to the schedule's 4 steps
    assert step_of(out) == 4 and [row["step"] for row in metrics_rows(out)] == [1, 2, 3, 4]
    assert stored(out) == first  # the options read back, stored again the same

    assert run(capsys, [*new, "--max-steps", "3", "--force"])[0] == 0  # a fresh run, not a continuation
    assert step_of(out) == 3 and [row["step"] for row in metrics_rows(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 3


def test_a_stage_function_takes_its_options_or_their_keywords():
    from ownllm.finetune import finetune_prefer
    from ownllm.options import InstructOptions, PreferOptions

    keywords = dict(out="run", model="base", lora_rank=4, max_steps=3, force=True)
    assert InstructOptions.from_keywords(**keywords) == InstructOptions(out="run", model="base", lora_rank=4,
                                                                       force=True, train={"max_steps": 3})
    with pytest.raises(TypeError, match="no option 'max_step'"):
        PreferOptions.from_keywords(out="run", max_step=3)
    with pytest.raises(TypeError, match="not both"):
        finetune_prefer(PreferOptions(out="run"), beta=0.2)
