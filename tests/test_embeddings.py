"""Embeddings: the three poolings, batch independence, long texts, `ownllm embed`, and POST /v1/embeddings
answered by a real `ownllm serve` process to the real `openai` client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from openai import BadRequestError, OpenAI

from embedding_helpers import assert_one_line_error, tiny  # noqa: F401  (tiny is a fixture)
from parity import assert_parity
from serve_helpers import API_KEY, assert_openai_error, http, serve_process

TEXTS = ["The for statement iterates over a sequence.", "x", "Lists are mutable sequences, typically used to "
         "store collections of homogeneous items.", "def f(): return 1", "Dictionaries map keys to values."]


@pytest.fixture(scope="module")
def loaded(tiny):  # noqa: F811
    import ownllm

    return ownllm.load(tiny)


def test_pool_reads_only_real_tokens_with_each_weighting():
    from ownllm.model import pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    lengths = torch.tensor([4, 2])
    assert torch.equal(pool(hidden, lengths, "last"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    assert torch.allclose(pool(hidden, lengths, "mean"), torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)]))
    expected = torch.stack([(hidden[0] * torch.tensor([1., 2, 3, 4])[:, None]).sum(0) / 10,
                            (hidden[1, :2] * torch.tensor([1., 2])[:, None]).sum(0) / 3])
    assert torch.allclose(pool(hidden, lengths, "weighted-mean"), expected)


@pytest.mark.parametrize("pooling", ["mean", "last", "weighted-mean"])
def test_a_texts_vector_does_not_depend_on_its_batch(loaded, pooling, one_thread):
    from ownllm.embeddings import embed_texts

    together = embed_texts(loaded, TEXTS, pooling=pooling, batch_size=4).vectors
    alone = torch.stack([embed_texts(loaded, [t], pooling=pooling).vectors[0] for t in TEXTS])
    reversed_ = embed_texts(loaded, TEXTS[::-1], pooling=pooling, batch_size=3).vectors.flip(0)
    assert_parity(together, alone, layers=loaded.config.n_layer, what="batch vs alone")
    assert_parity(together, reversed_, layers=loaded.config.n_layer, what="batch vs reversed batch")
    assert torch.allclose(together.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (together @ together.T - torch.eye(len(TEXTS))).abs().max() > 1e-3  # different texts, different vectors


def test_poolings_differ_and_raw_vectors_are_the_normalised_ones_scaled(loaded, one_thread):
    from ownllm.embeddings import embed_texts

    mean, last = (embed_texts(loaded, TEXTS[:2], pooling=p).vectors for p in ("mean", "last"))
    assert not torch.allclose(mean, last, atol=1e-3)
    raw = embed_texts(loaded, TEXTS[:2], normalize=False).vectors
    assert_parity(raw / raw.norm(dim=1, keepdim=True), mean, layers=0, what="raw normalised vs normalised")


def test_long_texts_are_cut_or_chunked_with_a_warning(tmp_path, one_thread):
    import ownllm
    from embedding_helpers import tiny_run
    from ownllm.embeddings import embed_texts, encode_for_embedding

    run = ownllm.load(tiny_run(tmp_path, block_size=16))
    text = "for x in range(10): print(x) and then the for statement iterates over items of a sequence"
    ids = encode_for_embedding(run.tokenizer, [text])[0]
    assert len(ids) > 32
    with pytest.warns(UserWarning, match="cut to their first 16 tokens"):
        cut = embed_texts(run, [text])
    head = embed_texts(run, [run.tokenizer.decode(ids[:16])])
    assert cut.shortened == 1 and cut.token_counts == [16]
    assert_parity(cut.vectors, head.vectors, layers=run.config.n_layer, what="cut vs its head")
    with pytest.warns(UserWarning, match="split into pieces of 16 tokens"):
        chunked = embed_texts(run, [text], long_texts="chunk", normalize=False)
    pieces = [ids[i:i + 16] for i in range(0, len(ids), 16)]
    from ownllm.embeddings import embed_ids

    expected = sum(len(p) * embed_ids(run.model, [p])[0] for p in pieces) / len(ids)
    assert_parity(chunked.vectors[0], expected, layers=run.config.n_layer, what="chunked vs pieces")


def test_embed_cli_writes_one_line_per_text_in_order(tiny, loaded, tmp_path, capsys):  # noqa: F811
    from ownllm.cli import main
    from ownllm.embeddings import embed_texts

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    assert main(["embed", str(tiny), "--input", str(source), "--output", str(out), "--pooling", "last"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    expected = embed_texts(loaded, TEXTS, pooling="last").vectors
    assert_parity([r["embedding"] for r in rows], expected,
                  layers=loaded.config.n_layer, what="embed CLI vs embed_texts")


def test_embed_cli_skips_blank_lines_saying_which_and_refuses_a_file_of_only_those(tiny, loaded, tmp_path,
                                                                                    capsys):  # noqa: F811
    from ownllm.cli import main
    from ownllm.embeddings import embed_texts

    source = tmp_path / "texts.txt"
    source.write_text("first\n\n  \nfourth\n", encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    capsys.readouterr()
    assert main(["embed", str(tiny), "--input", str(source), "--output", str(out)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"ownllm: warning: {source}: skipped 2 of 4 texts that carry nothing: 2 blank (lines 2, 3)",
        f"2 vectors of 32 dimensions (mean pooling) written to {out}"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 4]  # each vector keeps its text's line number
    assert_parity([r["embedding"] for r in rows], embed_texts(loaded, ["first", "fourth"]).vectors,
                  layers=loaded.config.n_layer, what="embed CLI, blank lines skipped")

    source.write_text("\n \n", encoding="utf-8")
    code = main(["embed", str(tiny), "--input", str(source), "--output", str(out), "--force"])
    assert_one_line_error(code, capsys.readouterr().err, f"{source}: no texts left: all 2 carry nothing")
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 4]  # the earlier output stays


# ---- the server ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):  # noqa: F811
    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text(API_KEY + "\n")
    with serve_process(tiny, "--model-name", "tiny", key_file=key_file) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_openai_embeddings_equal_ownllm_embed_and_do_not_depend_on_the_batch(client, tiny, loaded,  # noqa: F811
                                                                         tmp_path):
    from ownllm.cli import main

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    assert main(["embed", str(tiny), "--input", str(source), "--output", str(out)]) == 0
    expected = np.array([json.loads(line)["embedding"] for line in out.read_text().splitlines()])
    batch = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    assert_parity([d.embedding for d in batch.data], expected,
                  layers=loaded.config.n_layer, dtype=torch.float32, what="server vs embed CLI")
    floats = client.embeddings.create(model="tiny", input=TEXTS[::-1], encoding_format="float")
    assert_parity([d.embedding for d in floats.data][::-1], expected,
                  layers=loaded.config.n_layer, dtype=torch.float32, what="reversed, as floats")
    one = client.embeddings.create(model="tiny", input=TEXTS[2], dimensions=32)
    assert len(one.data) == 1
    assert_parity(one.data[0].embedding, expected[2],
                  layers=loaded.config.n_layer, dtype=torch.float32, what="one text")
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > len(TEXTS)


def test_openai_embeddings_of_token_ids(client, loaded):
    from ownllm.embeddings import embed_texts, encode_for_embedding

    rows = encode_for_embedding(loaded.tokenizer, TEXTS[:2])
    expected = embed_texts(loaded, TEXTS[:2], pooling="weighted-mean").vectors.numpy()
    lists = client.embeddings.create(model="tiny", input=rows, extra_body={"pooling": "weighted-mean"})
    single = client.embeddings.create(model="tiny", input=rows[0], extra_body={"pooling": "weighted-mean"})
    assert_parity([d.embedding for d in lists.data], expected,
                  layers=loaded.config.n_layer, dtype=torch.float32, what="token id lists")
    assert_parity(single.data[0].embedding, expected[0],
                  layers=loaded.config.n_layer, dtype=torch.float32, what="one token id list")
    assert lists.usage.prompt_tokens == len(rows[0]) + len(rows[1])


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "dimensions": 8}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": []}, "input"),
    ({"input": [[1, 2], [99999]]}, "input[1]"),
    ({"input": "hi", "pooling": "max"}, "pooling"),
    ({"input": [list(range(1, 300)) * 2]}, "input[0]"),
    ({"input": 5}, "input"),
])
def test_bad_embedding_requests_get_400_in_openais_shape(server, body, param):
    status, answer = http("POST", server + "/v1/embeddings", {"model": "tiny", **body})
    assert status == 400, answer
    assert assert_openai_error(answer)["param"].split(".")[0] == param  # a wrong type: "input.str"


def test_embedding_errors_reach_the_openai_client(client, server):
    with pytest.raises(BadRequestError) as raised:
        client.embeddings.create(model="tiny", input="hi", dimensions=3)
    assert "dimensions" in raised.value.message
    status, answer = http("POST", server + "/v1/embeddings", {"model": "other", "input": "hi"})
    assert status == 404 and assert_openai_error(answer)["code"] == "model_not_found"
    status, answer = http("POST", server + "/v1/embeddings", {"model": "tiny", "input": "hi"}, key="wrong")
    assert status == 401 and assert_openai_error(answer)["code"] == "invalid_api_key"
