"""The output rules of tests/test_outputs.py for the verbs added since: `finetune prefer`, `embed`, `index`, `ask`,
`import` of a GGUF file and `download`. Every path flag given a path of the wrong kind (a binary or non-UTF-8 file,
a folder for a file, a file for a folder, a text file named .gguf, an empty folder, a missing path, a file that is
not an index, an index made by another model): one line naming it, exit code 2, nothing written. An output that is
(in) an input: refused, even with --force. An existing output: replaced only with --force, then as a whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedding_helpers import tiny_run
from finetune_helpers import write_json
from output_helpers import assert_one_line_error, make_path, run_main, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = "tiny-org/tiny-llama"  # never reached: every case here is refused before the Hub is asked


@pytest.fixture(scope="module")
def inputs(base, tmp_path_factory) -> dict[str, Path]:
    """The tiny base run, good inputs for each verb (preference pairs, texts, documents and their index, the run as
    a GGUF file), another model (`other`) and a classifier made from it (`clf`)."""
    import ownllm
    from ownllm.finetune import finetune_classify
    from ownllm.interop.writers.gguf import export_gguf
    from ownllm.retrieval import build_index

    root = tmp_path_factory.mktemp("newer")
    write_json(root / "prefs.json", [{"prompt": f"Say {word}.", "chosen": f"Please: {word}.", "rejected": f"{word}!"}
                                     for word in ("apple", "pear", "plum", "fig", "kiwi", "lime")])
    (root / "texts.txt").write_text("The with statement wraps a block.\nA list holds items.\n", encoding="utf-8")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"query": f"what is {w}?", "positive": f"{w} is a fruit."}) + "\n"
                                              for w in ("apple", "pear", "plum", "fig")), encoding="utf-8")
    (root / "questions.jsonl").write_text('{"question": "Where is the town hall?"}\n', encoding="utf-8")
    (root / "labelled.tsv").write_text("good phone\t1\nbad phone\t0\nlovely\t1\nawful\t0\n", encoding="utf-8")
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("To renew a permit, bring the old one to the town hall.\n", encoding="utf-8")
    (root / "docs" / "b.txt").write_text("Water the tomatoes in the morning.\n", encoding="utf-8")
    build_index(root / "docs", base, root / "docs.index", chunk_size=20, overlap=2)
    export_gguf(ownllm.load(base), root / "model.gguf", quant="f32")
    (root / "other").mkdir()
    other = tiny_run(root / "other", block_size=128)
    finetune_classify(out=root / "clf", model=other, data=root / "labelled.tsv", max_steps=1, batch_size=2,
                      val_fraction=0, test_fraction=0, show_progress=False, precision="fp32")
    return {"lm": base, "other": other, "clf": root / "clf", **{
        name: root / file for name, file in (("prefs", "prefs.json"), ("texts", "texts.txt"), ("docs", "docs"),
                                             ("index", "docs.index"), ("gguf", "model.gguf"), ("pairs", "pairs.jsonl"),
                                             ("questions", "questions.jsonl"))}}


# ---- every path flag of every newer verb against paths of the wrong kind -----------------------------------------

TEXT_IN = ("dir", "missing", "binary", "latin1")  # a UTF-8 file is right
MODEL_IN = ("file", "dir", "missing", "binary", "latin1", "textgguf")  # a run, HF folder or GGUF file is right
DIR_OUT = ("file", "fulldir", "binary", "latin1")  # an output folder: exists and is a file or holds files
FILE_OUT = ("file", "dir", "binary", "latin1")  # an output file: exists, or is a folder
DOCS_IN = ("file", "dir", "missing", "binary", "latin1")  # a folder holding documents is right (`dir` is empty)
INDEX = ("file", "dir", "fulldir", "binary", "latin1")  # an index file is right
PREFER = ["finetune", "prefer", "--max-steps", "1", "--batch-size", "2", "--precision", "fp32"]
EMBED = ["finetune", "embed", "--max-steps", "1", "--batch-size", "2", "--precision", "fp32"]

# verb, argv with {X} for the path under test ({out}: a fresh output path, {lm} etc.: the module's inputs), kinds
PATH_FLAGS = [
    ("finetune prefer --model", [*PREFER, "--model", "{X}", "--data", "{prefs}", "--out", "{out}"], MODEL_IN),
    ("finetune prefer --data", [*PREFER, "--model", "{lm}", "--data", "{X}", "--out", "{out}"], TEXT_IN),
    ("finetune prefer --val-file", [*PREFER, "--model", "{lm}", "--data", "{prefs}", "--val-file", "{X}", "--out",
                                    "{out}"], TEXT_IN),
    ("finetune prefer --out", [*PREFER, "--model", "{lm}", "--data", "{prefs}", "--out", "{X}"], DIR_OUT),
    ("finetune embed --model", [*EMBED, "--model", "{X}", "--data", "{pairs}", "--out", "{out}"], MODEL_IN),
    ("finetune embed --data", [*EMBED, "--model", "{lm}", "--data", "{X}", "--out", "{out}"], TEXT_IN),
    ("finetune embed --docs", [*EMBED, "--model", "{lm}", "--docs", "{X}", "--out", "{out}"], DOCS_IN),
    ("finetune embed --out", [*EMBED, "--model", "{lm}", "--data", "{pairs}", "--out", "{X}"], DIR_OUT),
    ("ask --questions", ["ask", "{lm}", "--index", "{index}", "--questions", "{X}", "--sources-only", "--json"],
     TEXT_IN),
    ("embed MODEL", ["embed", "{X}", "--input", "{texts}", "--output", "{out}"], MODEL_IN),
    ("embed --input", ["embed", "{lm}", "--input", "{X}", "--output", "{out}"], TEXT_IN),
    ("embed --output", ["embed", "{lm}", "--input", "{texts}", "--output", "{X}"], FILE_OUT),
    ("index DOCS", ["index", "{X}", "--model", "{lm}", "--out", "{out}"], DOCS_IN),
    ("index --model", ["index", "{docs}", "--model", "{X}", "--out", "{out}"], MODEL_IN),
    ("index --out", ["index", "{docs}", "--model", "{lm}", "--out", "{X}"], INDEX),
    ("index --out --force", ["index", "{docs}", "--model", "{lm}", "--out", "{X}", "--force"], INDEX),
    ("ask MODEL", ["ask", "{X}", "--index", "{index}", "Where is the town hall?", "--embed-model", "{lm}"],
     (*MODEL_IN, "clf")),  # clf: a classifier cannot answer
    ("ask --index", ["ask", "{lm}", "--index", "{X}", "Where is the town hall?"], ("missing", *INDEX)),
    ("ask --embed-model", ["ask", "{lm}", "--index", "{index}", "Where is the town hall?", "--embed-model", "{X}"],
     (*MODEL_IN, "other")),  # other: a model that did not embed the index
    ("import SOURCE", ["import", "{X}", "--out", "{out}"], ("textgguf",)),  # the other kinds: tests/test_outputs.py
    ("import GGUF --out", ["import", "{gguf}", "--out", "{X}"], DIR_OUT),
    ("download --out", ["download", REPO, "--out", "{X}"], DIR_OUT),
    ("download --out --force", ["download", REPO, "--out", "{X}", "--force"], ("file", "binary", "latin1")),
]
CASES = [pytest.param(argv, kind, id=f"{verb} <- {kind}") for verb, argv, kinds in PATH_FLAGS for kind in kinds]


@pytest.mark.parametrize("argv,kind", CASES)
def test_every_path_flag_of_the_wrong_kind_gets_one_line_and_nothing_is_written(argv, kind, inputs, tmp_path, capsys):
    given = inputs[kind] if kind in ("other", "clf") else make_path(tmp_path, kind)
    names = {name: str(path) for name, path in inputs.items()}
    argv = [arg.format(X=given, out=tmp_path / "out", **names) for arg in argv]
    before = snapshot(tmp_path, inputs["lm"], inputs["prefs"].parent)
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, str(given))
    assert snapshot(tmp_path, inputs["lm"], inputs["prefs"].parent) == before


# ---- an output that is (in) one of the inputs is refused, even with --force ----------------------------------------

SAME_AS_INPUT = [  # what {X} is (a copy of an input), argv naming it as input and output, what the line says
    ("embed --input = --output", "texts", ["embed", "{lm}", "--input", "{X}", "--output", "{X}", "--force"],
     "is the input"),
    ("embed --output in MODEL", "lm", ["embed", "{X}", "--input", "{texts}", "--output", "{X}/config.json",
                                       "--force"], "is in the input"),
    ("finetune prefer --data = --out", "prefs", [*PREFER, "--model", "{lm}", "--data", "{X}", "--out", "{X}"],
     "is the input"),
    ("finetune prefer --data inside --out", "docs", [*PREFER, "--model", "{lm}", "--data", "{X}/prefs.json",
                                                     "--out", "{X}"], "is the input"),
    ("import GGUF = --out", "gguf", ["import", "{X}", "--out", "{X}", "--force"], "is the input"),
    ("index DOCS = --out", "docs", ["index", "{X}", "--model", "{lm}", "--out", "{X}", "--force"],
     "is a directory"),
    ("index --out = a document", "docs", ["index", "{X}", "--model", "{lm}", "--out", "{X}/a.md", "--force"],
     "not an ownllm index"),
]


@pytest.mark.parametrize("given,argv,fragment", [pytest.param(g, a, f, id=i) for i, g, a, f in SAME_AS_INPUT])
def test_an_output_that_is_an_input_is_refused_even_with_force(given, argv, fragment, inputs, tmp_path, capsys):
    source = tmp_path / "in" / inputs[given].name
    source.parent.mkdir()
    (shutil.copytree if inputs[given].is_dir() else shutil.copy)(inputs[given], source)
    if given == "docs":
        shutil.copy(inputs["prefs"], source / "prefs.json")
    names = {name: str(path) for name, path in inputs.items()}
    argv = [arg.format(X=source, **names) for arg in argv]
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, fragment)
    assert snapshot(tmp_path) == before


# ---- an existing output is replaced only with --force, and then as a whole ---------------------------------------

REPLACEABLE = [  # argv writing to {X}; its kind; what the new output holds
    ("embed --output", ["embed", "{lm}", "--input", "{texts}", "--output", "{X}"], "file", '{"line": 1, "embedding"'),
    ("import GGUF --out", ["import", "{gguf}", "--out", "{X}"], "dir", "config.json"),
]  # `finetune prefer --out`: refused above (<- fulldir); its --force is tested with every training verb's


@pytest.mark.parametrize("argv,kind,made", [pytest.param(a, k, m, id=i) for i, a, k, m in REPLACEABLE])
def test_an_existing_output_is_replaced_only_with_force_and_as_a_whole(argv, kind, made, inputs, tmp_path, capsys):
    target = make_path(tmp_path, "file" if kind == "file" else "fulldir")
    names = {name: str(path) for name, path in inputs.items()}
    argv = [arg.format(X=target, **names) for arg in argv]
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, str(target), "--force")
    assert snapshot(tmp_path) == before
    code, _, err = run_main(capsys, [*argv, "--force"])
    assert code == 0, err
    if kind == "file":
        assert target.read_text(encoding="utf-8").startswith(made)
    else:
        assert not (target / "keep.txt").exists() and (target / made).exists()  # replaced, not mixed into
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary or old copy left
