"""The `ownllm` command end to end, and its answers to bad input: one line, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ownllm", *args], capture_output=True, text=True, timeout=timeout)


def python_docs(chars: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:chars]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ownllm: error: "), result.stderr
    assert result.stderr.rstrip().endswith(errors[0]), result.stderr  # the last thing printed (after progress bars)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    text = python_docs(120_000)
    (folder / "part1.txt").write_text(text[:60_000], encoding="utf-8")
    (folder / "part2.md").write_text(text[60_000:], encoding="utf-8")
    return folder


def test_tokenizer_prepare_pretrain_generate_evaluate(tmp_path, corpus):
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    result = run_cli("tokenizer", "train", str(corpus / "part1.txt"), str(corpus / "part2.md"), "--kind", "bpe",
                     "--vocab-size", "400", "--out", str(tok))
    assert result.returncode == 0, result.stderr
    assert (tok / "tokenizer.json").is_file()

    result = run_cli("prepare", str(corpus), "--tokenizer", str(tok), "--out", str(data), "--val-fraction", "0.1")
    assert result.returncode == 0, result.stderr
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 400 and meta["val_tokens"] > 0

    result = run_cli("pretrain", "--data", str(data), "--out", str(run), "--model", "tiny", "--max-steps", "30",
                     "--eval-interval", "15", "--eval-steps", "2", "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    assert "finished at step 30" in result.stdout
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "loss.png", "tokenizer/tokenizer.json",
                 "checkpoint/trainer_state.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "train_loss", "lr", "tokens_per_sec"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [15, 30]

    result = run_cli("generate", str(run), "--prompt", "The class", "--max-new-tokens", "20", "--seed", "1",
                     "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The class") and len(result.stdout) > len("The class\n")
    again = run_cli("generate", str(run), "--prompt", "The class", "--max-new-tokens", "20", "--seed", "1",
                    "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95")
    assert again.stdout == result.stdout

    held_out = tmp_path / "held.txt"
    held_out.write_text(python_docs(140_000)[120_000:], encoding="utf-8")
    result = run_cli("evaluate", str(run), "--text", str(held_out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "unknown"}
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-6)
    assert 0 < report["loss"] < 6.0 and report["bytes"] > report["tokens"] > 1000


def test_pretrain_on_raw_text_with_char_tokenizer(tmp_path, corpus):
    run = tmp_path / "run"
    result = run_cli("pretrain", "--data", str(corpus / "part1.txt"), "--out", str(run), "--tokenizer", "char",
                     "--model", "tiny", "--max-steps", "5", "--eval-interval", "0")
    assert result.returncode == 0, result.stderr
    assert (run / "tokenizer" / "char_vocab.json").is_file() and (run / "data" / "train.bin").is_file()
    assert_user_error(run_cli("pretrain", "--data", str(corpus), "--out", str(run)), "already holds a run")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(run_cli("pretrain", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "run"),
                              "--tokenizer", "char", "--model", "tiny"), "empty.txt")
    assert not (tmp_path / "run").exists()


def test_binary_and_non_utf8_files_are_named(tmp_path):
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    assert_user_error(run_cli("tokenizer", "train", str(binary), "--out", str(tmp_path / "tok")), "image.txt",
                      "UTF-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 20)
    assert_user_error(run_cli("pretrain", "--data", str(latin), "--out", str(tmp_path / "run"), "--tokenizer", "char",
                              "--model", "tiny"), "latin.txt", "UTF-8")
    assert not (tmp_path / "run").exists()


def test_block_size_larger_than_data(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a few words\n" * 4)
    assert_user_error(run_cli("pretrain", "--data", str(small), "--out", str(tmp_path / "run"), "--tokenizer", "char",
                              "--model", "tiny", "--block-size", "64", "--val-fraction", "0"), "block size 64")
    assert not (tmp_path / "run").exists()


def test_unknown_preset_and_missing_run_directory(tmp_path, corpus):
    assert_user_error(run_cli("pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--model", "gpt5"),
                      "unknown model preset 'gpt5'")
    assert not (tmp_path / "run").exists()
    assert_user_error(run_cli("generate", str(tmp_path / "nothing"), "--prompt", "hi"), "no such run directory")
    assert_user_error(run_cli("pretrain", "--out", str(tmp_path / "nothing"), "--resume"), "no such run directory")


def test_corrupt_weights_are_reported(tmp_path, corpus):
    run = tmp_path / "run"
    result = run_cli("pretrain", "--data", str(corpus / "part1.txt"), "--out", str(run), "--tokenizer", "char",
                     "--model", "tiny", "--max-steps", "2", "--eval-interval", "0")
    assert result.returncode == 0, result.stderr
    weights = run / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # the checkpoint keeps its own link to the good file
    weights.write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("generate", str(run), "--prompt", "x"), "model.safetensors", "corrupt")
    # the checkpoint itself is intact, so the run still resumes
    resumed = run_cli("pretrain", "--out", str(run), "--resume", "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr
