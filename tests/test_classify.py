"""Classification fine-tuning: reading labelled files, the last-real-token head, metrics, the CLI end to end,
and one clear line (exit 2) for bad data."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_helpers import metrics_rows, run_cli, sentiment_lines
from parity import assert_parity
from ownllm.cli import main
from ownllm.config import model_config_from_preset
from ownllm.data.labelled import (class_weights, pad_right, read_labelled, split_examples, undersample)
from ownllm.evaluation import classification_metrics
from ownllm.model import GPTClassifier
from ownllm.finetune.common import select_trainable


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- reading --------------------------------------------------------------------------------------------------

def test_sms_spam_lines_work_as_they_are(tmp_path):
    path = tmp_path / "SMSSpamCollection"  # no suffix, no header, label first, quotes and a tab inside a text
    path.write_bytes(b'ham\tGo until jurong point, "crazy".\nspam\tWINNER!! Claim\tnow\r\n\nham\tOk lar...\n')
    data = read_labelled(path)
    assert (data.text_column, data.label_column) == ("2", "1")
    assert [(e.label, e.text) for e in data.examples] == [
        ("ham", 'Go until jurong point, "crazy".'), ("spam", "WINNER!! Claim\tnow"), ("ham", "Ok lar...")]
    assert data.examples[2].source.endswith(":4")


def test_sentiment_lines_label_last_and_a_nel_inside_the_text(tmp_path):
    path = tmp_path / "imdb_labelled.txt"
    path.write_text("A very good film\u0085 really.  \t1\nBad.  \t0\nNot bad at all\t1\n", encoding="utf-8")
    data = read_labelled(path)
    assert data.label_column == "2" and [e.label for e in data.examples] == ["1", "0", "1"]
    assert data.examples[0].text == "A very good film\u0085 really.  "


def test_csv_with_header_and_jsonl_and_named_columns(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text('stars,review,id\n5,"Great, really great",1\n1,"Awful ""phone""",2\n', encoding="utf-8")
    data = read_labelled(csv_path, text_column="review", label_column="stars")
    assert [(e.text, e.label) for e in data.examples] == [("Great, really great", "5"), ('Awful "phone"', "1")]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"text": "fine", "label": true}\n{"text": "bad", "label": false}\n', encoding="utf-8")
    assert [e.label for e in read_labelled(jsonl).examples] == ["true", "false"]


def test_split_undersample_and_weights(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"{'spam' if i < 10 else 'ham'}\ttext {i}\n" for i in range(100)), encoding="utf-8")
    examples = read_labelled(path).examples
    balanced = undersample(examples, seed=1)
    assert sorted(e.label for e in balanced).count("spam") == 10 and len(balanced) == 20
    train, val, test = split_examples(balanced, 0.1, 0.2, seed=1)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert split_examples(balanced, 0.1, 0.2, seed=1) == (train, val, test)
    assert class_weights(examples, ["ham", "spam"]) == pytest.approx([100 / 180, 100 / 20])


def test_classification_metrics():
    metrics = classification_metrics([0, 0, 0, 1, 1], [0, 0, 1, 1, 0], ["ham", "spam"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["confusion"] == [[2, 1], [1, 1]]
    assert metrics["per_class"]["ham"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["spam"]["recall"] == pytest.approx(0.5)
    assert metrics["per_class"]["spam"]["f1"] == pytest.approx(0.5)


# ---- the head reads the last real token ------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_same_text_same_logits_whatever_the_padding(preset, pooling):
    torch.manual_seed(0)
    model = GPTClassifier(model_config_from_preset(preset, vocab_size=50), num_labels=3, pooling=pooling).eval()
    text = [5, 9, 2, 7]
    alone = model(torch.tensor([text]), torch.tensor([4]))
    for others in ([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], [[3], [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]]):
        for pad_id in (0, 49):
            ids, lengths = pad_right([*others, text], pad_id)
            batched = model(ids, lengths)[-1:]
            assert_parity(batched, alone, layers=model.config.n_layer, what=f"batched with padding {pad_id}")
    # the pitfall avoided: reading the last *position* of a padded row gives something else
    ids, _ = pad_right([[1, 2, 3, 4, 5, 6, 7, 8], text], 0)
    assert not torch.allclose(model(ids)[-1:], alone, atol=1e-3)


def test_what_trains():
    model = GPTClassifier(model_config_from_preset("tiny", vocab_size=50, n_layer=3), num_labels=2)
    trainable = lambda: {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")  # noqa: E731
                         for n, p in model.named_parameters() if p.requires_grad}
    select_trainable(model, "head", head=("score",))
    assert trainable() == {"score"}
    select_trainable(model, "last:2", head=("score",))
    assert trainable() == {"score", "norm", "blocks.1", "blocks.2"}
    select_trainable(model, "all", head=("score",))
    assert all(p.requires_grad for p in model.parameters())


# ---- end to end ------------------------------------------------------------------------------------------------

def test_finetune_classify_then_classify_from_the_cli(base, tmp_path):
    data = tmp_path / "reviews.txt"
    data.write_text("\n".join(sentiment_lines(240)) + "\n", encoding="utf-8")
    run = tmp_path / "clf"
    result = run_cli("finetune", "classify", "--model", base, "--data", data, "--out", run, "--max-steps", "120",
                     "--batch-size", "16", "--lr", "3e-3", "--eval-interval", "60", "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    assert "test (48 examples): accuracy" in result.stdout and "confusion" in result.stdout
    rows = metrics_rows(run)
    first, last = rows[0]["train_loss"], sum(r["train_loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["labels"] == ["0", "1"] and metrics["test"]["accuracy"] >= 0.8
    assert set(metrics["test"]["per_class"]["1"]) == {"precision", "recall", "f1", "support"}
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "classify" and config["pooling"] == "last" and config["labels"] == ["0", "1"]

    one = run_cli("classify", run, "--text", "the screen is superb and lovely")
    assert one.returncode == 0, one.stderr
    label, probabilities, text = one.stdout.strip().split("\t")
    assert label == "1" and text == "the screen is superb and lovely" and "0 0." in probabilities
    texts = tmp_path / "texts.txt"
    texts.write_text("it is awful and broken\nsuperb phone, great battery\n", encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    many = run_cli("classify", run, "--input", texts, "--output", out)
    assert many.returncode == 0, many.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["label"] for a in answers] == ["0", "1"]
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-4 for a in answers)


# ---- bad data: one line naming the file and line, exit 2 ---------------------------------------------------------

def _error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ownllm: error: "), err
    return err[0]


def test_bad_data_gets_one_line_and_exit_2(base, tmp_path, capsys):
    common = ["finetune", "classify", "--model", base, "--max-steps", "1"]
    good = tmp_path / "good.tsv"
    good.write_text("\n".join(sentiment_lines(20)) + "\n", encoding="utf-8")

    empty_text = tmp_path / "empty.tsv"
    empty_text.write_text("text\tlabel\n   \t1\n   \t0\nnice phone\t\n", encoding="utf-8")
    assert f"{empty_text}: no examples left: all 3 carry nothing: 2 with an empty text (lines 2, 3); 1 with no label " \
           "(line 4)" in _error(capsys, *common, "--data", empty_text, "--out", tmp_path / "a")

    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes(b"nice phone\t1\nna\xefve\t0\n")
    assert f"{latin1}:2: unreadable line" in _error(capsys, *common, "--data", latin1, "--out", tmp_path / "b")

    header = tmp_path / "h.csv"
    header.write_text("review,stars\ngood,1\nbad,0\n", encoding="utf-8")
    message = _error(capsys, *common, "--data", header, "--text-column", "text", "--out", tmp_path / "c")
    assert f"{header}: no column 'text'" in message

    test_file = tmp_path / "test.tsv"
    test_file.write_text("fine\t1\nmeh\tneutral\n", encoding="utf-8")
    message = _error(capsys, *common, "--data", good, "--test-file", test_file, "--out", tmp_path / "d")
    assert f"{test_file}:2: label 'neutral' does not occur in the training data" in message

    short = tmp_path / "short.csv"
    short.write_text("text,label\ngood,1\nbad\n", encoding="utf-8")
    assert f"{short}:3: expected 2 fields, found 1" in _error(capsys, *common, "--data", short, "--out", tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "abcde")  # nothing half-made

    assert "no such run directory" in _error(capsys, "classify", tmp_path / "missing", "--text", "x")
