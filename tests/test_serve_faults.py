"""The server under faults: clients that hang up mid-stream, a full queue, requests larger than the context,
malformed bodies, thousands of embedding inputs. Each gets a 4xx/503 in OpenAI's error shape or is cleaned up
silently; afterwards every slot is free and the next request is answered. Ctrl-C stops `ownllm serve` within
seconds, with no traceback, answering what was still running (503, or an error event at the end of a stream)."""

from __future__ import annotations

import http.client as http_client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from embedding_helpers import tiny_run
from serve_helpers import assert_openai_error, free_port, http, serve_in_thread, wait_healthy

TOO_LONG = "word " * 400  # far more tokens than the context (128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("tiny"), block_size=128)


def stream_then_hang_up(url: str, statuses: list[int]) -> None:
    """Start a streamed chat, read its first event (when it is admitted), and close the connection."""
    connection = http_client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True,
            "max_tokens": 60, "temperature": 1.0}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    statuses.append(response.status)
    if response.status == 200:
        assert response.readline().startswith(b"data: ")
    else:
        assert_openai_error(json.loads(response.read()))
    connection.close()


BAD_REQUESTS = [  # path, body (bytes: sent as is), status, error code or param
    ("/v1/completions", {"model": "tiny", "prompt": TOO_LONG}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": TOO_LONG}]}, 400,
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/embeddings", {"input": [TOO_LONG]}, 400, "context_length_exceeded"),
    ("/v1/embeddings", {"input": ["a few words"] * 3000}, 400, "input"),  # more than OpenAI's 2048 per request
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "caf\xe9"}', 400, None),  # not UTF-8
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/embeddings", b'{"input": "' + b"x" * (5 << 20) + b'"}', 413, "request_too_large"),
]


def test_after_dropped_streams_and_bad_requests_every_slot_is_free_and_the_next_request_answered(tiny):
    import ownllm
    from ownllm.serve.app import create_app

    app = create_app(ownllm.load(tiny), model_name="tiny", max_batch=4, max_queue=4)
    with serve_in_thread(app) as url:
        statuses: list[int] = []
        clients = [threading.Thread(target=stream_then_hang_up, args=(url, statuses)) for _ in range(20)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=60)
        assert len(statuses) == 20 and set(statuses) <= {200, 503} and 200 in statuses  # 503: the queue was full
        for path, body, status, code in BAD_REQUESTS:
            raw = body if isinstance(body, bytes) else None
            answer_status, answer = http("POST", url + path, None if raw else body, key=None, raw=raw)
            error = assert_openai_error(answer)
            assert answer_status == status and code in (None, error["code"], error["param"]), (path, answer)
        deadline = time.monotonic() + 30
        while (health := http("GET", url + "/health")[1])["running"] + health["queued"] and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert (health["running"], health["queued"]) == (0, 0) and health["cancelled"] > 0  # every slot free
        status, answer = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 3,
                                                                "temperature": 0}, key=None)
        assert status == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")
        status, answer = http("POST", url + "/v1/embeddings", {"input": ["a few words"] * 2048}, key=None)
        assert status == 200 and len(answer["data"]) == 2048  # thousands of inputs, within OpenAI's limit


# `ownllm serve` whose embedding batches take a minute and whose completions never stop early.
SLOW_SERVE = """
import dataclasses, sys, time
import ownllm.embeddings, ownllm.serve.app

def slow_embedding(*args, **kwargs):
    print("embedding", flush=True)
    time.sleep(60)

real_options = ownllm.serve.app.sampling_options
ownllm.embeddings.embed_token_rows = slow_embedding
ownllm.serve.app.sampling_options = lambda *a, **k: dataclasses.replace(real_options(*a, **k), stop_at_eot=False)
from ownllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_the_server_within_seconds_answering_what_still_runs(tiny):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "serve", str(tiny), "--port", str(port),
                                "--model-name", "tiny", "--log-level", "warning"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    answers: dict[str, tuple[int, bytes]] = {}
    streaming = threading.Event()

    def call(name: str, path: str, body: dict) -> None:
        try:
            connection = http_client.HTTPConnection(f"127.0.0.1:{port}", timeout=60)
            connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            first = response.readline() if body.get("stream") else b""
            streaming.set() if first else None
            answers[name] = (response.status, first + response.read())
        except OSError as error:  # e.g. the connection closed with no answer
            answers[name] = (0, repr(error).encode())

    try:
        wait_healthy(url, process)
        completion = {"model": "tiny", "prompt": "The", "max_tokens": 120, "temperature": 1.0}
        calls = [threading.Thread(target=call, args=args) for args in [
            ("embeddings", "/v1/embeddings", {"input": ["a few words"] * 8}),
            ("completion", "/v1/completions", completion),
            ("stream", "/v1/completions", {**completion, "stream": True})]]
        for thread in calls:
            thread.start()
        assert process.stdout.readline() == "embedding\n" and streaming.wait(timeout=30)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        stopped = time.monotonic() - started
    finally:
        process.kill()
    for thread in calls:
        thread.join(timeout=30)
    assert process.returncode == 0 and stopped < 10, (process.returncode, stopped, stderr)
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr  # only the "serving ..." line
    for name in ("embeddings", "completion"):
        status, body = answers[name]
        assert status == 503 and assert_openai_error(json.loads(body))["code"] == "server_shutting_down"
    status, body = answers["stream"]
    assert status == 200 and b'"the server is shutting down"' in body and body.endswith(b"data: [DONE]\n\n")
