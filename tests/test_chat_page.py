"""The chat page in a real browser: Debian's headless Chromium, driven by Playwright, against a live server."""

from __future__ import annotations

import shutil

import pytest

import ownllm

from finetune_helpers import instruction_records, single_thread, write_json
from serve_helpers import API_KEY, greedy_chat, serve_process

FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "grape", "peach"]  # finetune_helpers.instruction_records
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def assistant(base, tmp_path_factory):
    """The tiny base model fine-tuned on short instructions ("Say plum." -> "plum") in the Alpaca template."""
    from ownllm.finetune.instruct import finetune_instruct

    root = tmp_path_factory.mktemp("assistant")
    data = write_json(root / "instructions.json", instruction_records(96))
    with single_thread():
        finetune_instruct(model=base, data=data, out=root / "run", template="alpaca", show_progress=False,
                          max_steps=80, batch_size=8, lr=3e-3, eval_interval=0, precision="fp32")
    return root / "run"


@pytest.fixture(scope="module")
def page_server(assistant, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("page-key") / "key.txt"
    key_file.write_text(API_KEY)
    with serve_process(assistant, "--model-name", "tiny", key_file=key_file) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "the browser test needs Debian's chromium: `make test` installs it (apt)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_chat_page_streams_answers_and_keeps_the_conversation(page_server, browser, assistant, tmp_path):
    page = browser.new_page()
    page.goto(page_server + "/")
    # The server wants a key: the page says so, then works once it is given.
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.inner_text("#error")
    page.click("#settings summary")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    assert page.is_hidden("#error")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")

    page.fill("#input", "Say plum.")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)
    first = page.text_content(".message.assistant")
    assert page.inner_text(".message.user") == "Say plum."
    assert first == greedy_chat(ownllm.load(assistant), ["Say plum."], 24)
    assert any(word in first for word in FRUITS)  # a real answer of the kind it was taught, not noise

    page.fill("#input", "Say fig.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.message.assistant:not(.streaming)').length === 2",
                           timeout=60_000)
    assert page.locator(".message.user").all_inner_texts() == ["Say plum.", "Say fig."]
    second = page.locator(".message.assistant").nth(1).text_content()
    # the whole conversation went to the server (trimmed to fit its context, as the page does)
    assert second == greedy_chat(ownllm.load(assistant), ["Say plum.", first, "Say fig."], 24)
    page.screenshot(path=str(tmp_path / "chat.png"))

    # An error from the server shows on the page and the question goes back out of the conversation.
    page.fill("#max-tokens", "100000")
    page.fill("#input", "Too long an answer")
    page.press("#input", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_tokens" in page.inner_text("#error")
    assert page.locator(".message.assistant").count() == 2

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.close()


@pytest.fixture(scope="module")
def small_context_server(assistant):
    """The assistant (a 128-token context: an Alpaca prompt takes most of it) served without an API key."""
    with serve_process(assistant, "--model-name", "tiny") as url:
        yield url


def test_the_page_takes_its_limits_from_the_model_and_a_first_message_never_fails_on_them(small_context_server,
                                                                                           browser):
    page = browser.new_page()
    page.goto(small_context_server + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    page.wait_for_function("document.getElementById('max-tokens').max === '128'")  # the context /health reports
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#input", "Say plum.")  # the default settings: the answer may take the rest of the context
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant:not(.streaming), #error:not([hidden])", timeout=60_000)
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.text_content(".message.assistant").strip() not in ("", "(no answer)")
    page.close()
