"""One begin-of-sequence rule: the server's chat prompt, `ownllm chat` and `generate --instruction` feed the model
the same token ids for the same conversation and template, and training encodes the same prompt."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import pytest
import torch

from ownllm import cli, decoding
from ownllm.chat import chat_format_for, chat_settings, render_jinja
from ownllm.cli.common import sampling_options
from ownllm.chat_templates import Message, encode_prompt, get_template
from ownllm.config import model_config_from_preset
from ownllm.data.instructions import encode_conversation
from ownllm.model import GPT
from ownllm.serve.app import with_chat_defaults
from ownllm.serve.prompts import encode_completion_prompt, parse_messages
from ownllm.serve.schemas import ChatRequest
from ownllm.tokenizer import char_tokenizer_from_text, load_tokenizer

INSTRUCTION = "Name a colour."
CHARS = ("<|im_start|>system user assistant<|im_end|>\n### Instruction: Response: Below is an instruction that "
         "describes a task. Write a response that appropriately completes the request. Name a colour. Red§")


def tok_of(run):
    return load_tokenizer(run / "tokenizer")


def tokenizer(add_bos: bool):
    tok = char_tokenizer_from_text(CHARS)
    if add_bos:
        tok.bos_id, tok.add_bos = tok.encode("§")[0], True
    return tok


def prompts_fed_to_the_model(monkeypatch, tok, template_name: str | None,
                             run_config: dict | None = None) -> dict[str, list[int]]:
    """The prompt ids each front end hands to the decoder (which answers at once with nothing)."""
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=512))
    run_config = {**({"template": template_name} if template_name else {}), **(run_config or {})}
    run = SimpleNamespace(model=model, tokenizer=tok, run_config=run_config, config=model.config)
    fed = []

    def spy_decode(model, continuations, eot_id=None, on_text=None):
        fed.append(list(continuations[0].prompt))
        continuations[0].accept(eot_id, eot_id)

    monkeypatch.setattr(decoding, "decode", spy_decode)
    monkeypatch.setattr("ownllm.runs.load_run", lambda path, device, quantize="auto": run)
    monkeypatch.setattr("sys.stdin", io.StringIO(INSTRUCTION + "\n"))
    assert cli.main(["chat", "RUN"]) == 0
    assert cli.main(["generate", "RUN", "--instruction", INSTRUCTION]) == 0
    server = chat_format_for(run.run_config, tok).encode(parse_messages([{"role": "user", "content": INSTRUCTION}]))
    return {"chat": fed[0], "generate --instruction": fed[1], "server": server}


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("template_name", ["alpaca", "chatml"])
def test_chat_generate_instruction_and_server_feed_the_same_prompt(monkeypatch, capsys, add_bos, template_name):
    tok = tokenizer(add_bos)
    template = get_template(template_name)
    fed = prompts_fed_to_the_model(monkeypatch, tok, template_name)
    conversation = [Message("user", INSTRUCTION)]
    text_ids = [i for piece in template.prompt_pieces(conversation) for i in tok.encode(piece)]
    expected = [tok.bos_id, *text_ids] if add_bos else text_ids
    assert fed == {"chat": expected, "generate --instruction": expected, "server": expected}
    # training encodes the same prompt in front of the answer
    trained, _ = encode_conversation([*conversation, Message("assistant", "Red")], template, tok)
    assert trained[: len(expected)] == expected and trained.count(tok.bos_id) == (1 if add_bos else 0)


@pytest.mark.parametrize("add_bos", [False, True])
def test_completion_prompts_and_generate_follow_the_same_rule(add_bos):
    tok = tokenizer(add_bos)
    ids = tok.encode("Red")
    expected = [tok.bos_id, *ids] if add_bos else ids
    assert decoding.prompt_ids(tok, "Red") == encode_completion_prompt(tok, "Red") == expected
    assert tok.starting_sequence(expected) == expected  # never twice
    assert encode_completion_prompt(tok, ids) == ids  # token ids are the client's own: taken as they are


SYSTEM = "You are a helpful bot."
# a ChatML chat template that adds a system prompt by default, as SmolLM2's and Qwen2's do
CHATML_JINJA = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("imported", [True, False], ids=["template-section", "jinja-only"])
def test_chat_and_serve_feed_the_prompt_of_the_models_own_template_with_its_default_system(monkeypatch, imported):
    tok = char_tokenizer_from_text(CHARS + SYSTEM)
    tok.chat_template = CHATML_JINJA
    fed = prompts_fed_to_the_model(monkeypatch, tok, "chatml" if imported else None)
    rendered = render_jinja(CHATML_JINJA, tok, [{"role": "user", "content": INSTRUCTION}], add_generation_prompt=True)
    assert rendered.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    expected = tok.encode(rendered)
    assert fed == {"chat": expected, "generate --instruction": expected, "server": expected}


def test_a_runs_own_chat_defaults_reach_chat_and_serve(monkeypatch, tmp_path):
    tok = char_tokenizer_from_text(CHARS + SYSTEM + "Be.")
    tok.chat_template = CHATML_JINJA
    chat = {"system": "Be red.", "temperature": 0.0, "max_tokens": 7}
    fed = prompts_fed_to_the_model(monkeypatch, tok, "chatml", {"chat": chat})
    expected = encode_prompt([Message("system", "Be red."), Message("user", INSTRUCTION)], get_template("chatml"), tok)
    assert fed == {"chat": expected, "generate --instruction": expected, "server": expected}
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    filled = with_chat_defaults(request, {"chat": chat})
    assert (filled.temperature, filled.max_tokens, filled.top_p) == (0.0, 7, 0.5)  # what the request sets stays
    assert with_chat_defaults(ChatRequest(model="m", messages=request.messages, max_completion_tokens=3),
                              {"chat": chat}).max_tokens is None
    flags = argparse.Namespace(max_new_tokens=None, temperature=None, top_k=None, top_p=0.9, seed=None, stop=[])
    options = sampling_options(flags, chat_settings({"chat": chat}))  # what chat, generate --instruction, ask take
    assert (options.max_new_tokens, options.temperature, options.top_p) == (7, 0.0, 0.9)
    assert sampling_options(flags).max_new_tokens == 200 and sampling_options(flags).temperature == 0.8


def test_chat_defaults_are_set_on_a_run_and_their_ranges_checked(base, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base, run)
    assert cli.main(["chat-defaults", str(run), "--system", "Be brief.", "--temperature", "0.3"]) == 0
    assert capsys.readouterr().out == f"{run}: chat defaults: system 'Be brief.', temperature 0.3\n"
    assert cli.main(["chat-defaults", str(run), "--unset", "temperature", "--top-k", "5"]) == 0
    assert json.loads((run / "config.json").read_text())["chat"] == {"system": "Be brief.", "top_k": 5}
    assert chat_format_for(json.loads((run / "config.json").read_text()), tok_of(run)).system == "Be brief."
    assert cli.main(["chat-defaults", str(run), "--temperature", "3"]) == 2
    assert capsys.readouterr().err.strip() == "ownllm: error: --temperature 3.0: must be in [0, 2]"
