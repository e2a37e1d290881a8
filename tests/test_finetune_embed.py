"""`finetune embed`: contrastive training (in-batch negatives, hard negatives) raises held-out retrieval accuracy
well above the base model's and chance; a resumed run equals an uninterrupted one; `--docs` makes inverse-cloze
pairs from a folder; the trained prefixes and pooling are what embed / index / ask read; bad data is one line."""

from __future__ import annotations

import json
import random

import pytest
import torch

from finetune_helpers import assert_same_run, metrics_rows, single_thread
from parity import assert_parity
from ownllm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ["red", "blue", "green", "cat", "dog", "fish", "river", "mountain", "apple", "bread", "train", "ship",
        "winter", "summer", "violin", "drum"]
FILLER = "the of and a to in is that it for as with was on be by this are from or".split()


def synthetic_pairs(n: int, seed: int = 0, negatives: bool = False) -> list[dict]:
    """A query of two key words; its passage holds them among 14 filler words (so a base model's mean pooling is
    mostly filler). Held-out pairs are new combinations of the same keys: the model must learn to read the keys."""
    rng, pairs, seen = random.Random(seed), [], set()
    while len(pairs) < n:
        a, b = rng.sample(KEYS, 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        words = [rng.choice(FILLER) for _ in range(14)]
        words.insert(rng.randrange(15), a)
        words.insert(rng.randrange(16), b)
        pair = {"query": f"{a} {b}", "positive": " ".join(words)}
        if negatives:
            pair["negative"] = " ".join(w if w != b else rng.choice([k for k in KEYS if k not in (a, b)])
                                        for w in words)
        pairs.append(pair)
    return pairs


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


def embed_run(base, out, data, **options):
    from ownllm.finetune import finetune_embed

    settings = dict(val_fraction=0.375, test_fraction=0.0, show_progress=False, max_steps=60, batch_size=8,
                    lr=1e-3, eval_interval=0, precision="fp32")
    with single_thread():
        return finetune_embed(out=out, model=base, data=data, **{**settings, **options})


def test_training_raises_held_out_retrieval_accuracy_well_above_chance(base, tmp_path):
    import ownllm
    from ownllm.embeddings import embed_texts, embed_token_rows, encode_for_embedding

    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(80))  # 50 train, 30 held out
    result = embed_run(base, tmp_path / "run", data)
    val = result.val
    assert val["pairs"] == 30 and val["chance"] == pytest.approx(1 / 30)
    assert val["accuracy"] >= 0.4 and val["accuracy"] >= 2.5 * val["accuracy_before"], val  # chance is 3.3%
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val"] == val and saved["train_pairs"] == 50
    rows = metrics_rows(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and (tmp_path / "run" / "loss.png").is_file()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == "embed" and config["embedding_pooling"] == "mean"
    assert config["embedding_prefixes"] == {"query": "query: ", "document": "passage: "}

    run = ownllm.load(tmp_path / "run")  # what embed / index / ask read: the trained prefixes and pooling
    as_query = embed_texts(run, ["red cat"], role="query").vectors
    by_hand = embed_token_rows(run.model, encode_for_embedding(run.tokenizer, ["query: red cat"])).vectors
    assert_parity(as_query, by_hand, layers=run.config.n_layer, what="embed --as query vs the prefix by hand")
    as_document = embed_texts(run, ["red cat"]).vectors
    assert not torch.allclose(as_query, as_document, atol=1e-3)


def test_hard_negatives_and_lora_train_too(base, tmp_path):
    import ownllm

    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=1, negatives=True))
    result = embed_run(base, tmp_path / "lora", data, lora_rank=4, max_steps=30, lr=3e-3, symmetric=True,
                       val_fraction=0.25)
    assert result.val["accuracy"] > result.val["chance"]
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    run = ownllm.load(tmp_path / "lora")
    assert run.run_config["lora"]["rank"] == 4 and run.run_config["embedding_prefixes"]["query"] == "query: "


def test_a_resumed_run_equals_an_uninterrupted_one(base, tmp_path):
    from ownllm.finetune import finetune_embed

    data = write_pairs(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=2, negatives=True))
    common = dict(max_steps=12, eval_interval=4, val_fraction=0.25, dropout=0.1)
    straight = embed_run(base, tmp_path / "a", data, **common)
    embed_run(base, tmp_path / "b", data, stop_at=6, **common)
    with single_thread():
        resumed = finetune_embed(out=tmp_path / "b", resume=True, show_progress=False)
    assert resumed.train.step == straight.train.step == 12
    assert_same_run(tmp_path / "a", tmp_path / "b", "val_accuracy")
    assert resumed.val == straight.val


DOCS = {
    "boat.md": "The ferry leaves the harbour at seven. It carries cars and bicycles across the bay. "
               "Tickets are sold on board by the captain.",
    "bees.txt": "Bees visit the lavender every morning. Their hive sits behind the shed. "
                "In autumn the honey is harvested and stored in jars.",
    "short.txt": "One sentence only here.",
}


def test_docs_mode_makes_inverse_cloze_pairs_from_a_folder(base, tmp_path, capsys):
    from ownllm.finetune.embed import pairs_from_documents

    folder = tmp_path / "notes"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    pairs = pairs_from_documents(folder, seed=0)
    assert len(pairs) == 6  # three per passage of three sentences; a one-sentence file gives none
    for pair in pairs:
        source = next(text for text in DOCS.values() if pair.query in text)
        assert pair.query not in pair.positive and all(w in source for w in pair.positive.split())
    out = tmp_path / "notes-embed"
    code = main(["finetune", "embed", "--model", str(base), "--docs", str(folder), "--out", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--precision", "fp32", "--eval-interval", "0"])
    assert code == 0, capsys.readouterr().err
    assert "embedder saved in" in capsys.readouterr().out
    stored = json.loads((out / "config.json").read_text())
    assert stored["options"]["data"] == str(folder.resolve()) and stored["task"] == "embed"


@pytest.mark.parametrize("line, named", [
    ('{"query": "a"}', 'field "positive" must be a non-empty string'),
    ('{"query": "a", "positive": "b", "negative": 3}', 'field "negative" must be a non-empty string'),
    ("not json", "not a JSON object"),
])
def test_bad_pairs_get_one_line_and_exit_2(base, tmp_path, capsys, line, named):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(3)) + line + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["finetune", "embed", "--model", str(base), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ownllm: error: {data}:4: ") and named in err[0], err
    assert not out.exists()
