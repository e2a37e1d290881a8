"""`ownllm serve RUN --index FILE`: chat completions that answer from the documents and return their sources (the
real `openai` client, streamed and not), and the chat page's "search my documents" switch in a real browser."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

import ownllm

from embedding_helpers import tiny  # noqa: F401  (a fixture)
from finetune_helpers import single_thread
from serve_helpers import serve_in_thread, serve_process
from test_chat_page import browser  # noqa: F401  (a fixture: Debian's chromium through Playwright)
from test_retrieval_ranking import NOTES, notes_index  # noqa: F401  (a fixture)

WIFI = "What is the guest wifi password?"
OFF_TOPIC = "Who won the football championship in Brazil?"


@pytest.fixture(scope="module")
def served(tiny, notes_index):  # noqa: F811
    from ownllm.retrieval import open_index
    from ownllm.serve.app import create_app
    from ownllm.serve.documents import Documents

    run = ownllm.load(tiny)
    app = create_app(run, model_name="notes", documents=Documents(open_index(notes_index), run))
    with serve_in_thread(app) as url:
        yield url, run


def test_openai_client_gets_an_answer_and_its_sources(served, notes_index):  # noqa: F811
    from ownllm.decoding import SamplingOptions
    from ownllm.retrieval import answer, open_index

    url, run = served
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert client.models.list().data[0].model_extra["documents"] == {"chunks": 4, "files": 4}
    asked = dict(model="notes", messages=[{"role": "user", "content": WIFI}], max_tokens=8, temperature=0,
                 extra_body={"retrieval": {"k": 2}})
    reply = client.chat.completions.create(**asked)
    sources = reply.model_extra["sources"]
    assert sources[0]["index"] == 1 and sources[0]["file"] == "wifi.txt" and sources[0]["lines"] == [1, 1]
    assert "sunflower42" in sources[0]["text"] and 0 < sources[0]["relevance"] <= 1
    with single_thread():
        expected, hits = answer(run, open_index(notes_index), WIFI, k=2,
                                options=SamplingOptions(max_new_tokens=8, temperature=0))
    assert reply.choices[0].message.content == expected  # the prompt `ownllm ask` builds, decoded by the engine
    assert [s["file"] for s in sources] == [h.chunk.path for h in hits]

    chunks = list(client.chat.completions.create(**asked, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.model_extra.get("sources") for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].model_extra["sources"] == sources

    plain = client.chat.completions.create(**{**asked, "extra_body": None})
    assert "sources" not in (plain.model_extra or {})

    refused = client.chat.completions.create(**{**asked, "messages": [{"role": "user", "content": OFF_TOPIC}]})
    assert refused.choices[0].message.content == "The documents do not say."
    assert refused.model_extra["sources"] == []
    with pytest.raises(BadRequestError, match="retrieval.k must be between 1 and 20"):
        client.chat.completions.create(**{**asked, "extra_body": {"retrieval": {"k": 0}}})


def test_retrieval_without_an_index_is_a_400(tiny):  # noqa: F811
    from ownllm.serve.app import create_app

    with serve_in_thread(create_app(ownllm.load(tiny), model_name="plain")) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        with pytest.raises(BadRequestError, match="no document index"):
            client.chat.completions.create(model="plain", messages=[{"role": "user", "content": WIFI}],
                                           extra_body={"retrieval": {"k": 2}})


def test_chat_page_shows_the_sources_under_the_answer(tiny, notes_index, browser):  # noqa: F811
    with serve_process(tiny, "--model-name", "notes", "--index", str(notes_index)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#documents-switch:not([hidden])")
        assert "4 passages of 4 files" in page.inner_text("#documents-switch")
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.check("#use-documents")
        page.fill("#input", WIFI)
        page.press("#input", "Enter")
        page.wait_for_selector(".sources", timeout=60_000)
        shown = page.inner_text(".sources")
        assert shown.startswith("Sources:") and "wifi.txt:1-1" in shown and "sunflower42" in shown
        page.fill("#input", OFF_TOPIC)
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.sources').length === 2", timeout=60_000)
        assert page.locator(".message.assistant").nth(1).text_content() == "The documents do not say."
        assert "nothing in your documents" in page.locator(".sources").nth(1).inner_text()
        page.uncheck("#use-documents")
        page.fill("#input", WIFI)
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.message.assistant:not(.streaming)').length === 3",
                               timeout=60_000)
        assert page.locator(".sources").count() == 2  # no retrieval asked: no sources shown
        page.close()


def test_embeddings_put_the_runs_prefix_for_the_input_type_first(tiny, tmp_path):  # noqa: F811
    import json
    import shutil

    from ownllm.embeddings import embed_texts
    from ownllm.serve.app import create_app

    run_dir = shutil.copytree(tiny, tmp_path / "embedder")  # a run as `finetune embed` leaves one: with prefixes
    config = json.loads((run_dir / "config.json").read_text())
    config["embedding_prefixes"] = {"query": "query: ", "document": "passage: "}
    (run_dir / "config.json").write_text(json.dumps(config))
    run = ownllm.load(run_dir)
    with serve_in_thread(create_app(run, model_name="embedder")) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        got = {role: client.embeddings.create(model="embedder", input=WIFI, encoding_format="float",
                                              extra_body={"input_type": role} if role else None).data[0].embedding
               for role in ("query", "document", None)}
        with pytest.raises(BadRequestError, match="input_type must be one of"):
            client.embeddings.create(model="embedder", input=WIFI, extra_body={"input_type": "passage"})
    for role in ("query", "document"):
        expected = embed_texts(run, [WIFI], role=role).vectors[0].tolist()
        assert got[role] == pytest.approx(expected, abs=1e-5)
    assert got[None] == got["document"] and got["query"] != pytest.approx(got["document"], abs=1e-3)


def test_serve_refuses_a_lone_embed_model_and_another_models_index(tiny, notes_index, tmp_path, capsys):  # noqa: F811
    from embedding_helpers import assert_one_line_error, tiny_run
    from ownllm.cli import main

    code = main(["serve", str(tiny), "--embed-model", str(tiny), "--port", "1"])
    assert_one_line_error(code, capsys.readouterr().err, "--embed-model", "--index")
    other = tiny_run(tmp_path, seed=1)  # same shape, other weights: not the model that embedded the index
    code = main(["serve", str(tiny), "--index", str(notes_index), "--embed-model", str(other), "--port", "1"])
    assert_one_line_error(code, capsys.readouterr().err, str(notes_index), "pass that model, or re-index")
