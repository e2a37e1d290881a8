"""The rules for every verb's input and output paths: nothing lost, nothing half-written, nothing overwritten unasked.

- every path flag of every verb, given a file, a directory, a missing path, a binary or a non-UTF-8 file where that
  is wrong: one line on stderr, exit code 2, nothing written;
- an output that is one of the inputs is refused, even with --force;
- an existing output is replaced only with --force, and then as a whole;
- an output is written under a temporary name and renamed at the end: a failure half-way leaves no truncated file
  and the earlier output intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune_helpers import instruction_records, sentiment_lines, write_json
from output_helpers import assert_one_line_error, make_path, run_main, snapshot
from parity import assert_parity
from ownllm.cli import main
from ownllm.outputs import atomic_file, replaced_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict[str, Path]:
    """The tiny base run, a classifier and a LoRA instruct run made from it (a few steps each), and good inputs."""
    from ownllm.finetune import finetune_classify, finetune_instruct

    root = tmp_path_factory.mktemp("runs")
    (root / "texts.tsv").write_text("\n".join(sentiment_lines(40)) + "\n", encoding="utf-8")
    write_json(root / "instructions.json", instruction_records(24))
    (root / "corpus.txt").write_text("The with statement is used to wrap a block.\n" * 40, encoding="utf-8")
    common = dict(model=base, max_steps=2, batch_size=4, show_progress=False, precision="fp32")
    finetune_classify(out=root / "clf", data=root / "texts.tsv", **common)
    finetune_instruct(out=root / "lora", data=root / "instructions.json", lora_rank=2, max_new_tokens=2, **common)
    return {"lm": base, "clf": root / "clf", "lora": root / "lora", "tok": base / "tokenizer", **{
        name: root / file for name, file in (("corpus", "corpus.txt"), ("tsv", "texts.tsv"),
                                             ("json", "instructions.json"))}}


# ---- every path flag of every verb against paths of the wrong kind ------------------------------------------------

TEXT_IN = ("dir", "missing", "binary", "latin1")  # a text input: a UTF-8 file is right
MODEL_IN = ("file", "dir", "missing", "binary", "latin1")  # a model: only a run or HF directory is right
DIR_OUT = ("file", "fulldir", "binary", "latin1")  # an output folder: exists and is a file or holds files
FILE_OUT = ("file", "dir", "binary", "latin1")  # an output file: exists, or is a folder

# verb, argv with {X} for the path under test ({out}: a fresh output path, {lm} etc.: the module's runs), kinds
PATH_FLAGS = [
    ("tokenizer train INPUTS", ["tokenizer", "train", "{X}", "--kind", "char", "--out", "{out}"], TEXT_IN),
    ("tokenizer train --out", ["tokenizer", "train", "{corpus}", "--kind", "char", "--out", "{X}"], DIR_OUT),
    ("prepare INPUTS", ["prepare", "{X}", "--tokenizer", "{tok}", "--out", "{out}"], TEXT_IN),
    ("prepare --tokenizer", ["prepare", "{corpus}", "--tokenizer", "{X}", "--out", "{out}"], MODEL_IN),
    ("prepare --out", ["prepare", "{corpus}", "--tokenizer", "{tok}", "--out", "{X}"], DIR_OUT),
    ("pretrain --data", ["pretrain", "--data", "{X}", "--out", "{out}", "--model", "tiny", "--max-steps", "1"],
     TEXT_IN),
    ("pretrain --out", ["pretrain", "--data", "{corpus}", "--out", "{X}", "--model", "tiny", "--max-steps", "1"],
     DIR_OUT),
    ("generate MODEL", ["generate", "{X}", "--prompt", "a", "--max-new-tokens", "1"], MODEL_IN),
    ("evaluate MODEL", ["evaluate", "{X}", "--text", "{corpus}"], MODEL_IN),
    ("evaluate --text", ["evaluate", "{lm}", "--text", "{X}"], TEXT_IN),
    ("import SOURCE", ["import", "{X}", "--out", "{out}"], MODEL_IN),
    ("import --out", ["import", "{lm}", "--out", "{X}"], DIR_OUT),
    ("export MODEL", ["export", "{X}", "--to", "hf", "--out", "{out}"], MODEL_IN),
    ("export --to hf --out", ["export", "{lm}", "--to", "hf", "--out", "{X}"], DIR_OUT),
    ("export --to gguf --out", ["export", "{lm}", "--to", "gguf", "--out", "{X}"], FILE_OUT),
    ("finetune classify --model", ["finetune", "classify", "--model", "{X}", "--data", "{tsv}", "--out", "{out}"],
     MODEL_IN),
    ("finetune classify --data", ["finetune", "classify", "--model", "{lm}", "--data", "{X}", "--out", "{out}"],
     TEXT_IN),
    ("finetune classify --val-file", ["finetune", "classify", "--model", "{lm}", "--data", "{tsv}", "--val-file",
                                      "{X}", "--out", "{out}"], TEXT_IN),
    ("finetune classify --out", ["finetune", "classify", "--model", "{lm}", "--data", "{tsv}", "--out", "{X}"],
     DIR_OUT),
    ("finetune instruct --data", ["finetune", "instruct", "--model", "{lm}", "--data", "{X}", "--out", "{out}"],
     TEXT_IN),
    ("finetune instruct --test-file", ["finetune", "instruct", "--model", "{lm}", "--data", "{json}",
                                       "--test-file", "{X}", "--out", "{out}"], TEXT_IN),
    ("classify MODEL", ["classify", "{X}", "--text", "hello"], MODEL_IN),
    ("classify --input", ["classify", "{clf}", "--input", "{X}", "--output", "{out}"], TEXT_IN),
    ("classify --output", ["classify", "{clf}", "--text", "hello", "--output", "{X}"], FILE_OUT),
    ("chat MODEL", ["chat", "{X}"], MODEL_IN),
    ("merge-lora MODEL", ["merge-lora", "{X}", "--out", "{out}"], MODEL_IN),
    ("merge-lora --out", ["merge-lora", "{lora}", "--out", "{X}"], DIR_OUT),
    ("serve MODEL", ["serve", "{X}", "--port", "1"], MODEL_IN),
    ("serve --api-key-file", ["serve", "{lm}", "--port", "1", "--api-key-file", "{X}"], TEXT_IN),
    ("demo --out", ["demo", "--out", "{X}", "--max-steps", "1"], DIR_OUT),
]
CASES = [pytest.param(argv, kind, id=f"{verb} <- {kind}") for verb, argv, kinds in PATH_FLAGS for kind in kinds]


@pytest.mark.parametrize("argv,kind", CASES)
def test_every_path_flag_of_the_wrong_kind_gets_one_line_and_nothing_is_written(argv, kind, runs, tmp_path, capsys):
    given = make_path(tmp_path, kind)
    names = {name: str(path) for name, path in runs.items()}
    argv = [arg.format(X=given, out=tmp_path / "out", **names) for arg in argv]
    before = snapshot(tmp_path, runs["clf"].parent, runs["lm"])
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, str(given))
    assert snapshot(tmp_path, runs["clf"].parent, runs["lm"]) == before


# ---- an output that is one of the inputs is refused, even with --force -------------------------------------------

SAME_AS_INPUT = [  # argv with {X}: a copy of the input that the output names too
    ("classify --input = --output", "texts.txt", ["classify", "{clf}", "--input", "{X}", "--output", "{X}"]),
    ("tokenizer train INPUT folder = --out", "corpus", ["tokenizer", "train", "{X}", "--kind", "char", "--out", "{X}"]),
    ("prepare INPUT folder = --out", "corpus", ["prepare", "{X}", "--tokenizer", "{tok}", "--out", "{X}"]),
    ("export MODEL = --out", "run", ["export", "{X}", "--to", "hf", "--out", "{X}"]),
    ("export MODEL inside --out", "run", ["export", "{X}", "--to", "hf", "--out", "{X}/.."]),
    ("import SOURCE = --out", "hf", ["import", "{X}", "--out", "{X}"]),
    ("merge-lora MODEL = --out", "lora", ["merge-lora", "{X}", "--out", "{X}"]),
    ("finetune --data inside --out", "data", ["finetune", "classify", "--model", "{lm}", "--data", "{X}/texts.tsv",
                                              "--out", "{X}"]),
]


@pytest.mark.parametrize("given,argv", [pytest.param(g, a, id=i) for i, g, a in SAME_AS_INPUT])
def test_an_output_that_is_an_input_is_refused_even_with_force(given, argv, runs, tmp_path, capsys):
    import shutil

    source = tmp_path / "in" / given
    if given == "texts.txt":
        source.parent.mkdir()
        source.write_text("superb phone\nawful screen\n", encoding="utf-8")
    elif given in ("corpus", "data"):
        source.mkdir(parents=True)
        shutil.copy(runs["corpus"], source / "a.txt")
        shutil.copy(runs["tsv"], source / "texts.tsv")
    elif given == "hf":
        assert main(["export", str(runs["lm"]), "--to", "hf", "--out", str(source)]) == 0
    else:
        shutil.copytree(runs["lm" if given == "run" else given], source)
    names = {name: str(path) for name, path in runs.items()}
    argv = [arg.format(X=source, **names) for arg in argv] + ["--force"]
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, "is the input")
    assert snapshot(tmp_path) == before


# ---- an existing output is replaced only with --force, and then as a whole ---------------------------------------

REPLACEABLE = [  # argv writing to {X}; what the new output holds
    ("tokenizer train", ["tokenizer", "train", "{corpus}", "--kind", "char", "--out", "{X}"], "dir", "char_vocab.json"),
    ("prepare", ["prepare", "{corpus}", "--tokenizer", "{tok}", "--out", "{X}"], "dir", "meta.json"),
    ("export --to hf", ["export", "{lm}", "--to", "hf", "--out", "{X}"], "dir", "config.json"),
    ("export --to gguf", ["export", "{lm}", "--to", "gguf", "--out", "{X}", "--quant", "f32"], "file", None),
    ("merge-lora", ["merge-lora", "{lora}", "--out", "{X}"], "dir", "model.safetensors"),
    ("classify --output", ["classify", "{clf}", "--text", "superb", "--output", "{X}"], "file", None),
    ("pretrain", ["pretrain", "--data", "{corpus}", "--out", "{X}", "--model", "tiny", "--block-size", "16",
                  "--tokenizer", "char", "--max-steps", "1", "--eval-interval", "0"], "dir", "checkpoint"),
]


@pytest.mark.parametrize("argv,kind,made", [pytest.param(a, k, m, id=i) for i, a, k, m in REPLACEABLE])
def test_an_existing_output_is_replaced_only_with_force_and_as_a_whole(argv, kind, made, runs, tmp_path, capsys):
    target = make_path(tmp_path, "file" if kind == "file" else "fulldir")
    names = {name: str(path) for name, path in runs.items()}
    argv = [arg.format(X=target, **names) for arg in argv]
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, str(target), "--force")
    assert snapshot(tmp_path) == before

    code, _, err = run_main(capsys, [*argv, "--force"])
    assert code == 0, err
    if kind == "file":
        assert target.read_bytes() != b"some text\nmore text\n" and target.stat().st_size > 0
    else:
        assert not (target / "keep.txt").exists() and (target / made).exists()  # replaced, not mixed into
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary or old copy left


# ---- written under a temporary name: a failure half-way loses nothing ---------------------------------------------

def test_a_failure_half_way_leaves_no_truncated_output_and_the_earlier_one_intact(runs, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"superb phone\n" * 500 + b"na\xefve\n" + b"awful screen\n" * 499)  # a bad line 501 of 1000
    earlier = tmp_path / "labels.jsonl"
    earlier.write_text('{"text": "earlier", "label": "1"}\n', encoding="utf-8")
    code, _, err = run_main(capsys, ["classify", runs["clf"], "--input", texts, "--output", earlier,
                                     "--force", "--batch-size", "100"])
    assert_one_line_error(code, err, str(texts), "not UTF-8")
    assert earlier.read_text(encoding="utf-8") == '{"text": "earlier", "label": "1"}\n'

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "old.txt").write_text("old\n")
    for helper, target in ((atomic_file, earlier), (replaced_dir, folder)):
        with pytest.raises(RuntimeError), helper(target) as partial:
            (partial.write("half") if helper is atomic_file else (partial / "new.txt").write_text("half"))
            raise RuntimeError("a failure half-way")
    assert earlier.read_text(encoding="utf-8") == '{"text": "earlier", "label": "1"}\n'
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "labels.jsonl", "texts.txt"]


# ---- a run killed before its first checkpoint can be started over -------------------------------------------------

@pytest.mark.parametrize("verb", ["pretrain", "finetune classify"])
def test_a_run_with_no_checkpoint_yet_starts_over_saying_so(verb, runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    if verb == "pretrain":
        argv = ["pretrain", "--data", runs["corpus"], "--out", run, "--model", "tiny", "--block-size", "16",
                "--tokenizer", "char", "--max-steps", "2", "--eval-interval", "0", "--precision", "fp32"]
    else:
        argv = ["finetune", "classify", "--model", runs["lm"], "--data", runs["tsv"], "--out", run, "--max-steps",
                "2", "--batch-size", "4", "--precision", "fp32"]
    assert run_main(capsys, argv)[0] == 0
    for name in ("checkpoint", "model.safetensors", "metrics.jsonl"):  # as a kill before the first checkpoint left it
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)

    code, _, err = run_main(capsys, [verb.split()[0], *verb.split()[1:], "--out", run, "--resume"])
    assert_one_line_error(code, err, str(run), "without --resume to start it over")
    inside = run / "data.txt"  # an input inside the run: refused, with no "starting it over" warning first
    shutil.copyfile(runs["corpus"] if verb == "pretrain" else runs["tsv"], inside)
    code, _, err = run_main(capsys, [*argv[:2], inside, *argv[3:]] if verb == "pretrain" else
                            [*argv[:5], inside, *argv[6:]])
    assert_one_line_error(code, err, f"--out {run}: is the input {inside}")
    inside.unlink()
    code, out, err = run_main(capsys, argv)
    assert code == 0, err
    assert "never saved a checkpoint: starting it over" in err and "finished at step 2" in out
    assert (run / "checkpoint").is_dir()
    code, _, err = run_main(capsys, argv)  # now it has a checkpoint: kept unless --resume or --force
    assert_one_line_error(code, err, "already holds a run", "--resume", "--force")


# ---- export writes what the run is: a classifier stays a classifier, or is refused -------------------------------

def test_a_classifier_exports_as_a_sequence_classifier_or_is_refused(runs, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    import ownllm
    from ownllm.data.labelled import encode_texts

    out = tmp_path / "hf"
    assert run_main(capsys, ["export", runs["clf"], "--to", "hf", "--out", out])[0] == 0
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    run = ownllm.load(runs["clf"])
    assert hf.config.id2label == dict(enumerate(run.run_config["labels"]))
    for text in ("superb phone, lovely screen", "awful"):
        ids = torch.tensor(encode_texts([text], run.tokenizer, run.config.block_size))
        with torch.no_grad():
            assert_parity(hf(ids).logits, run.model(ids), layers=run.config.n_layer, what="exported classifier")

    capsys.readouterr()  # transformers' loading bar
    code, _, err = run_main(capsys, ["export", runs["clf"], "--to", "gguf", "--out", tmp_path / "clf.gguf"])
    assert_one_line_error(code, err, "classifier", "--to hf")
    assert not (tmp_path / "clf.gguf").exists()


# ---- the demo replaces only what it made, and says when its time budget ended training --------------------------

def test_the_demo_replaces_only_its_own_run_and_reports_a_time_budget_stop(monkeypatch, tmp_path, capsys):
    from ownllm import demo

    monkeypatch.setattr(demo, "python_docs_text", lambda: "The with statement wraps a block of code.\n" * 400)
    monkeypatch.setattr(demo, "PROMPTS", ["The with"])
    monkeypatch.setattr(demo, "DEMO_MODEL", dict(n_layer=1, n_head=2, n_embd=32, block_size=32))
    out = tmp_path / "demo"
    code, printed, err = run_main(capsys, ["demo", "--out", out, "--max-steps", "50", "--max-minutes", "1e-9"])
    assert code == 0, err
    assert "time budget ended training at step 1 of 50" in printed and "val loss None" not in printed
    assert float(printed.split("val loss ")[1].split()[0]) > 0  # evaluated at the end, whenever it stopped
    code, printed, err = run_main(capsys, ["demo", "--out", out, "--max-steps", "1"])
    assert code == 0 and "replacing the earlier demo run" in printed, err
    (out / demo.MARKER_FILE).unlink()  # now it looks like a run the demo did not make
    code, _, err = run_main(capsys, ["demo", "--out", out, "--max-steps", "1"])
    assert_one_line_error(code, err, str(out), "--force")


# ---- what every verb writes has the modes a plain open() and mkdir() give under the user's umask -----------------

def test_every_verb_writes_with_the_modes_the_umask_gives(runs, tmp_path, capsys):
    out = tmp_path / "outputs"
    names = {name: str(path) for name, path in runs.items()}
    commands = [
        ["tokenizer", "train", "{corpus}", "--kind", "char", "--out", "{o}/tok"],
        ["prepare", "{corpus}", "--tokenizer", "{tok}", "--out", "{o}/data"],
        ["export", "{lm}", "--to", "hf", "--out", "{o}/hf"],
        ["export", "{lm}", "--to", "gguf", "--out", "{o}/m.gguf", "--quant", "f32"],
        ["merge-lora", "{lora}", "--out", "{o}/merged"],
        ["classify", "{clf}", "--text", "hello", "--output", "{o}/labels.jsonl"],
        ["finetune", "classify", "--model", "{lm}", "--data", "{tsv}", "--out", "{o}/clf", "--max-steps", "1",
         "--precision", "fp32"],
    ]
    old = os.umask(0o027)
    try:
        out.mkdir()
        for argv in commands:
            code, _, err = run_main(capsys, [arg.format(o=out, **names) for arg in argv])
            assert code == 0, (argv, err)
    finally:
        os.umask(old)
    modes = {str(path.relative_to(out)): path.stat().st_mode & 0o777 for path in out.rglob("*")}
    assert len(modes) > 20
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (out / name).is_dir() else 0o640)}
    assert wrong == {}
