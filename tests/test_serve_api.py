"""The OpenAI-compatible server, end to end: a real `ownllm serve` process answered by the real `openai` client."""

from __future__ import annotations

import http.client as http_client
import json
import threading

import pytest
from openai import OpenAI

from finetune_helpers import sentiment_lines, single_thread
from serve_helpers import API_KEY, assert_openai_error, greedy_chat, http, serve_in_thread, serve_process

PROMPTS = ["The list", "def ", "Return the", "In Python,", "class A", "import", "A string", "for x in"]


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text(API_KEY + "\n")
    with serve_process(base, "--model-name", "tiny", key_file=key_file) as url:
        yield url


@pytest.fixture(scope="module")
def loaded(base):
    import ownllm

    return ownllm.load(base)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def greedy_completion(run, prompt: str, max_tokens: int) -> tuple[str, int]:
    """What the model continues `prompt` with, decoded alone in this process, and how many tokens that took."""
    from ownllm.decoding import SamplingOptions, generate_ids

    with single_thread():
        ids = generate_ids(run.model, [run.tokenizer.encode(prompt)], SamplingOptions(max_new_tokens=max_tokens,
                                                                                      temperature=0),
                           eot_id=run.tokenizer.eot_id)[0]
    return run.tokenizer.decode(ids), len(ids)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completions_match_decoding_alone_with_usage(client, loaded):
    for prompt in PROMPTS[:3]:
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        expected, tokens = greedy_completion(loaded, prompt, 12)
        choice = response.choices[0]
        assert choice.text == expected
        assert choice.finish_reason == ("length" if tokens == 12 else "stop")
        assert response.usage.prompt_tokens == len(loaded.tokenizer.encode(prompt))
        assert response.usage.completion_tokens == tokens
        assert response.usage.total_tokens == response.usage.prompt_tokens + tokens


def test_completions_with_a_list_of_prompts(client, loaded):
    response = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    by_index = {choice.index: choice.text for choice in response.choices}
    assert by_index == {i: greedy_completion(loaded, p, 8)[0] for i, p in enumerate(PROMPTS[:3])}
    assert response.usage.prompt_tokens == sum(len(loaded.tokenizer.encode(p)) for p in PROMPTS[:3])


def test_chat_streamed_equals_not_streamed(client, loaded):
    messages = [{"role": "user", "content": "What is a list?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == greedy_chat(loaded, ["What is a list?"], 20)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_seeded_sampling_is_repeatable_streamed_or_not(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=24, temperature=1.0,
                  top_p=0.9, seed=7)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    again = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True))
    assert first == again == streamed
    other = client.chat.completions.create(**{**kwargs, "seed": 8}).choices[0].message.content
    assert other != first


def test_stop_strings_end_the_answer(client, loaded):
    expected, _ = greedy_completion(loaded, "The list", 30)
    stop = expected[len(expected) // 2: len(expected) // 2 + 2]
    assert stop.strip(), expected
    response = client.completions.create(model="tiny", prompt="The list", max_tokens=30, temperature=0, stop=[stop])
    assert response.choices[0].text == expected[: expected.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_32_concurrent_streaming_clients(server, loaded):
    expected = {p: greedy_completion(loaded, p, 16)[0] for p in PROMPTS}
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            client = OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
            stream = client.completions.create(model="tiny", prompt=PROMPTS[index % len(PROMPTS)], max_tokens=16,
                                               temperature=0, stream=True)
            results[index] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        except BaseException as error:  # noqa: BLE001 - counted and reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert errors == []
    assert {i: results[i] for i in range(32)} == {i: expected[PROMPTS[i % len(PROMPTS)]] for i in range(32)}


def _stream_then_hang_up(server: str) -> None:
    """Start a streamed chat, read its first event, and close the connection."""
    connection = http_client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}],
                       "stream": True, "max_tokens": 60, "temperature": 1.0})
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    connection.close()


def test_clients_hanging_up_mid_stream_do_not_break_others(server, loaded, client):
    expected = greedy_completion(loaded, "The list", 16)[0]
    results, errors = [], []

    def steady() -> None:
        try:
            stream = client.completions.create(model="tiny", prompt="The list", max_tokens=16, temperature=0,
                                               stream=True)
            results.append("".join(chunk.choices[0].text for chunk in stream if chunk.choices))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    def hang_up() -> None:
        try:
            _stream_then_hang_up(server)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=hang_up) for _ in range(4)]
    threads += [threading.Thread(target=steady) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and results == [expected] * 4
    assert client.completions.create(model="tiny", prompt="The list", max_tokens=16, temperature=0).choices[0].text \
        == expected
    status, health = http("GET", server + "/health")
    assert status == 200 and health["status"] == "ok"


M = "tiny"
BAD_REQUESTS = [
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"model": M, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": M, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": M, "prompt": "x", "top_k": 0}, 400, "top_k"),
    ("/v1/completions", {"model": M, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": M, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": M, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": M, "prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ("/v1/completions", {"model": M, "prompt": "x", "top_p": float("nan")}, 400, "top_p"),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": [["a"]]}, 400, None),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content"),
    ("/v1/chat/completions", {"model": M, "messages": ["hi"]}, 400, None),
    ("/v1/completions", {"model": M}, 400, "prompt"),
    ("/v1/completions", {"model": M, "prompt": "word " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": M, "prompt": [10**6]}, 400, "prompt"),
    ("/v1/completions", {"model": M, "prompt": "word " * 20, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": M, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}, 400,
     "messages[1].role"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi " * 2000}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("/v1/classify", {"input": "hi"}, 400, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_4xx_in_the_openai_shape(server, path, body, status, param):
    code, answer = http("POST", server + path, body)
    assert code == status, answer
    error = assert_openai_error(answer)
    if param is not None:
        assert error["param"] == param, error


def test_long_prompts_name_the_context_window(server):
    code, answer = http("POST", server + "/v1/completions", {"model": M, "prompt": "word " * 2000})
    assert code == 400 and assert_openai_error(answer)["code"] == "context_length_exceeded"
    assert "128" in answer["error"]["message"]


@pytest.mark.parametrize("raw,fragment", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object")])
def test_malformed_bodies(server, raw, fragment):
    code, answer = http("POST", server + "/v1/completions", raw=raw)
    assert code == 400 and fragment in assert_openai_error(answer)["message"]
    assert answer["error"]["param"] is None  # not the character offset of the JSON error


def test_a_stream_that_ends_normally_is_not_counted_as_cancelled(server, client):
    before = http("GET", server + "/health")[1]["cancelled"]
    for _ in range(3):
        stream = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) is not None
    assert http("GET", server + "/health")[1]["cancelled"] == before


def test_a_char_level_model_chats_in_plain_text(tmp_path):
    """A char tokenizer trained on a play cannot spell ChatML's <|im_start|>: the server chats in a transcript."""
    import ownllm
    from ownllm.pretrain import pretrain
    from ownllm.serve.app import create_app

    play = tmp_path / "play.txt"
    play.write_text("USER:\nGood morrow, sir.\n\nASSISTANT:\nAnd to you, good friend.\n\n" * 30, encoding="utf-8")
    with single_thread():
        pretrain(out=tmp_path / "run", data=play, preset="tiny", tokenizer="char", show_progress=False, max_steps=1,
                 batch_size=2, eval_interval=0, precision="fp32", model_overrides=dict(block_size=64))
    with serve_in_thread(create_app(ownllm.load(tmp_path / "run"), model_name="play")) as url:
        chat = {"model": "play", "messages": [{"role": "user", "content": "Good morrow"}], "max_tokens": 8}
        code, answer = http("POST", url + "/v1/chat/completions", chat, key=None)
        assert code == 200, answer
        assert answer["usage"]["prompt_tokens"] == len("USER:\nGood morrow\n\nASSISTANT:\n")
        unseen = {"model": "play", "messages": [{"role": "user", "content": "zzz"}]}
        code, answer = http("POST", url + "/v1/chat/completions", unseen, key=None)  # a character never seen
        assert code == 400 and "'z'" in assert_openai_error(answer)["message"]


def test_unknown_paths_methods_and_oversized_bodies(server):
    code, answer = http("GET", server + "/v1/nothing")
    assert code == 404 and assert_openai_error(answer)
    code, answer = http("GET", server + "/v1/chat/completions")
    assert code == 405 and assert_openai_error(answer)
    code, answer = http("POST", server + "/v1/completions", {"model": M, "prompt": "x" * (5 << 20)})
    assert code == 413 and assert_openai_error(answer)["code"] == "request_too_large"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_enforced(server, key):
    for method, path, body in [("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"model": M, "prompt": "x"}),
                               ("POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user",
                                                                                            "content": "x"}]})]:
        code, answer = http(method, server + path, body, key=key)
        assert code == 401 and assert_openai_error(answer)["code"] == "invalid_api_key"
    assert http("GET", server + "/health", key=key)[0] == 200  # liveness stays open


@pytest.fixture(scope="module")
def classifier(base, tmp_path_factory):
    from ownllm.finetune.classify import finetune_classify

    root = tmp_path_factory.mktemp("classifier")
    data = root / "train.tsv"
    data.write_text("\n".join(sentiment_lines(240)) + "\n")
    with single_thread():
        finetune_classify(model=base, data=data, out=root / "run", train_layers="all", show_progress=False,
                          max_steps=120, batch_size=16, lr=3e-3, eval_interval=0, precision="fp32")
    return root / "run"


def test_classify_endpoint(classifier):
    import ownllm
    from ownllm.classification import classify_texts
    from ownllm.serve.app import create_app

    run = ownllm.load(classifier)
    texts = ["the phone was great", "the screen is awful and broken", "really lovely battery"]
    expected = classify_texts(run, texts)
    with serve_in_thread(create_app(run, model_name="sentiment")) as url:
        code, answer = http("POST", url + "/v1/classify", {"input": texts}, key=None)
        assert code == 200, answer
        assert [row["index"] for row in answer["data"]] == [0, 1, 2]
        assert [(row["label"], row["probabilities"]) for row in answer["data"]] == \
            [(row["label"], row["probabilities"]) for row in expected]
        assert [row["label"] for row in answer["data"]] == ["1", "0", "1"]
        code, single = http("POST", url + "/v1/classify", {"input": texts[1], "model": "sentiment"}, key=None)
        assert code == 200 and single["data"][0]["label"] == "0"
        code, answer = http("POST", url + "/v1/classify", {"input": []}, key=None)
        assert code == 400 and assert_openai_error(answer)["param"] == "input"
        code, answer = http("POST", url + "/v1/classify", {"input": ["fine", " "]}, key=None)  # no label for ""
        assert code == 400 and "input 1 is empty" in assert_openai_error(answer)["message"]
        code, answer = http("POST", url + "/v1/chat/completions",
                            {"model": "sentiment", "messages": [{"role": "user", "content": "hi"}]}, key=None)
        assert code == 400 and "classify" in assert_openai_error(answer)["message"]


def test_serve_refuses_bad_input_in_one_line(base, tmp_path):
    from finetune_helpers import assert_user_error, run_cli

    assert_user_error(run_cli("serve", tmp_path / "nothing"), "nothing")
    assert_user_error(run_cli("serve", base, "--api-key-file", tmp_path / "missing.txt"), "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    assert_user_error(run_cli("serve", base, "--api-key-file", tmp_path / "empty.txt"), "empty")
    assert_user_error(run_cli("serve", base, "--port", "70000"), "70000")


def test_a_full_server_answers_503_with_retry_after(loaded):
    """One slot and no queue: while a request runs, the next one is refused at once, not queued without bound."""
    import urllib.error
    import urllib.request

    from ownllm.serve.app import create_app

    with serve_in_thread(create_app(loaded, model_name="tiny", max_batch=1, max_queue=0)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert greedy_completion(loaded, "The list", 100)[1] == 100  # greedy runs the whole budget, no early end
        stream = client.completions.create(model="tiny", prompt="The list", max_tokens=100, temperature=0,
                                           stream=True)
        next(iter(stream))  # the first request now holds the only slot
        request = urllib.request.Request(url + "/v1/completions", method="POST",
                                         data=json.dumps({"model": "tiny", "prompt": "x"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert assert_openai_error(json.loads(refused.value.read()))["code"] == "server_busy"
        assert "".join(chunk.choices[0].text for chunk in stream)  # the running request is unharmed
        assert http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2},
                    key=None)[0] == 200  # and the slot is free again
