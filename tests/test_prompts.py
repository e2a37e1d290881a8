"""One begin-of-sequence rule: the server's chat prompt, `ownllm chat` and `generate --instruction` feed the model
the same token ids for the same conversation and template, and training encodes the same prompt."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from ownllm import cli, decoding
from ownllm.cli import use
from ownllm.config import model_config_from_preset
from ownllm.data.instructions import Message, encode_conversation, get_template
from ownllm.model import GPT
from ownllm.serve.prompts import chat_format_for, encode_completion_prompt, parse_messages
from ownllm.tokenizer import char_tokenizer_from_text

INSTRUCTION = "Name a colour."
CHARS = ("<|im_start|>system user assistant<|im_end|>\n### Instruction: Response: Below is an instruction that "
         "describes a task. Write a response that appropriately completes the request. Name a colour. Red§")


def tokenizer(add_bos: bool):
    tok = char_tokenizer_from_text(CHARS)
    if add_bos:
        tok.bos_id, tok.add_bos = tok.encode("§")[0], True
    return tok


def prompts_fed_to_the_model(monkeypatch, tok, template_name: str) -> dict[str, list[int]]:
    """The prompt ids each front end hands to the decoder (which answers at once with nothing)."""
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=512))
    run = SimpleNamespace(model=model, tokenizer=tok, run_config={"template": template_name}, config=model.config)
    fed = []

    def spy_decode(model, continuations, eot_id=None, on_text=None):
        fed.append(list(continuations[0].prompt))
        continuations[0].accept(eot_id, eot_id)

    monkeypatch.setattr(decoding, "decode", spy_decode)
    monkeypatch.setattr(use, "_instruct_run", lambda path, device, *advice: (run, get_template(template_name)))
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
