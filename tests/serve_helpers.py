"""Shared by the server tests: free ports, a real `ownllm serve` process, an in-process server, raw HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from finetune_helpers import single_thread

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, process: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read() if process.stderr else ''}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no answer from {base_url}/health in {timeout} s")


@contextmanager
def serve_process(model: Path, *args: str, key_file: Path | None = None) -> Iterator[str]:
    """`python -m ownllm serve MODEL` on a free port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "ownllm", "serve", str(model), "--port", str(port), "--log-level", "warning",
               *args]
    if key_file is not None:
        command += ["--api-key-file", str(key_file)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """An app served by uvicorn on a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def http(method: str, url: str, body: Any = None, key: str | None = API_KEY, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    """(status, parsed JSON body) of a request; JSON bodies are sent with the JSON content type."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def greedy_chat(run: Any, conversation: list[str], max_tokens: int) -> str:
    """The greedy answer to alternating user/assistant messages, decoded alone in this process in the run's chat
    format (ownllm.chat: the server's rule, ChatML for a base model)."""
    from ownllm.chat import chat_format_for, chat_reply
    from ownllm.chat_templates import Message
    from ownllm.decoding import SamplingOptions

    messages = [Message("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(conversation)]
    with single_thread():
        return chat_reply(run.model, chat_format_for(run.run_config, run.tokenizer), messages,
                          SamplingOptions(max_new_tokens=max_tokens, temperature=0))


def assert_openai_error(body: Any) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}} with a message."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error
