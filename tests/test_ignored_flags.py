"""A flag or an input that cannot apply is refused in one line naming it, or warned about: never dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_helpers import instruction_records, sentiment_lines, write_json
from ownllm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict[str, Path]:
    from ownllm.finetune import finetune_classify

    root = tmp_path_factory.mktemp("flags")
    (root / "texts.tsv").write_text("\n".join(sentiment_lines(40)) + "\n", encoding="utf-8")
    finetune_classify(out=root / "clf", model=base, data=root / "texts.tsv", max_steps=2, batch_size=4,
                      show_progress=False, precision="fp32")
    (root / "lines.txt").write_text("superb phone\n", encoding="utf-8")
    write_json(root / "one-object.json", instruction_records(1)[0])
    return {"lm": base, "clf": root / "clf", "tsv": root / "texts.tsv", "lines": root / "lines.txt",
            "object": root / "one-object.json", "data": Path(json.loads((base / "config.json").read_text())["data"])}


REFUSED = [  # argv; the flag (or file) the one-line error names
    (["pretrain", "--resume", "--out", "{lm}", "--model", "mini"], "--model"),
    (["pretrain", "--resume", "--out", "{lm}", "--n-layer", "4", "--data", "{data}"], "--data, --n-layer"),
    (["finetune", "classify", "--resume", "--out", "{clf}", "--data", "{tsv}"], "--data"),
    (["pretrain", "--resume", "--force", "--out", "{lm}"], "--force and --resume"),
    (["finetune", "classify", "--model", "{lm}", "--data", "{tsv}", "--out", "{new}", "--train-layers", "last:99"],
     "--train-layers last:99"),
    (["finetune", "instruct", "--model", "{lm}", "--data", "{object}", "--out", "{new}"], "one JSON object"),
    (["classify", "{clf}", "--text", "hi", "--input", "{lines}"], "--text and --input"),
    (["classify", "{clf}", "--text", ""], "--text"),
    (["evaluate", "{clf}", "--text", "{lines}"], "is a classifier run"),
    (["generate", "{lm}", "--input", "x"], "--input"),
    (["generate", "{lm}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["chat", "{lm}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["chat", "{clf}"], "is a classifier run"),
    (["tokenizer", "train", "{lines}", "--kind", "char", "--vocab-size", "100", "--out", "{new}"], "--vocab-size"),
]


@pytest.mark.parametrize("argv,named", REFUSED, ids=[" ".join(a[:2]) + " " + n for a, n in REFUSED])
def test_a_flag_that_cannot_apply_is_refused_in_one_line(argv, named, runs, tmp_path, capsys):
    names = {name: str(path) for name, path in runs.items()}
    argv = [arg.format(new=tmp_path / "new", **names) for arg in argv]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ownllm: error: ") and named in lines[0], lines
    assert not (tmp_path / "new").exists()


def warnings(err: str) -> list[str]:
    return [line.split("\r")[-1] for line in err.splitlines() if "ownllm: warning: " in line]


def test_what_is_cut_or_left_out_is_said(runs, tmp_path, capsys):
    long_prompt = "The with statement " * 100  # far more tokens than the 128-token context
    assert main(["generate", str(runs["lm"]), "--prompt", long_prompt, "--max-new-tokens", "2"]) == 0
    warning = warnings(capsys.readouterr().err)
    assert len(warning) == 1 and "--prompt takes" in warning[0] and "context (128)" in warning[0]

    assert main(["pretrain", "--data", str(runs["data"]), "--out", str(tmp_path / "run"), "--model", "tiny",
                 "--tokenizer", "char", "--max-steps", "1", "--eval-interval", "0"]) == 0
    warning = warnings(capsys.readouterr().err)  # the prepared dataset keeps its own tokenizer: said, not dropped
    assert len(warning) == 1 and "--tokenizer: ignored" in warning[0] and str(runs["data"]) in warning[0]

    texts = tmp_path / "texts.txt"
    texts.write_text("superb phone\n\n  \nawful screen\n", encoding="utf-8")  # blank lines keep their place
    out = tmp_path / "labels.jsonl"
    assert main(["classify", str(runs["clf"]), "--input", str(texts), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows] == ["superb phone", "", "  ", "awful screen"]
    assert [row["label"] is None for row in rows] == [False, True, True, False]


@pytest.mark.parametrize("argv,named", [(["generate"], "model"), (["export", "x", "--to", "onnx", "--out", "y"], "--to"),
                                        (["pretrain", "--out", "r", "--max-steps", "many"], "--max-steps"),
                                        (["finetune", "classify", "--data", "d"], "--out")])
def test_a_usage_mistake_is_one_line_too(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("ownllm: error: ") and named in lines[0]
