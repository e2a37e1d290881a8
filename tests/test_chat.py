"""Chat (ownllm.chat): which format a model chats in, the model's own Jinja template, and prompts that fit the
context (the oldest exchanges dropped, the system message kept)."""

from __future__ import annotations

import pytest
import torch

from ownllm.chat import ChatFormat, ChatTemplateError, chat_format_for, chat_prompt, prompt_room
from ownllm.chat_templates import Message, get_template
from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import char_tokenizer_from_text

CHATML_CHARS = "<|im_start|>system user assistant<|im_end|>\nabcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ:"
JINJA = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
         "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def test_the_format_is_the_runs_template_else_its_jinja_else_chatml_else_a_transcript():
    tok = char_tokenizer_from_text(CHATML_CHARS + "[]")
    assert chat_format_for({"template": "alpaca"}, tok).name == "alpaca"
    assert chat_format_for({}, tok).name == "chatml"
    assert chat_format_for({}, char_tokenizer_from_text("abc .\n")).name == "transcript"  # cannot spell <|im_end|>
    tok.chat_template = JINJA
    assert chat_format_for({"template": "chatml"}, tok).name == "chatml"
    jinja = chat_format_for({}, tok)
    assert jinja.name == "jinja" and jinja.stop == []
    assert tok.decode(jinja.encode([Message("user", "Hi", "there")])) == "[user] Hi\n\nthere\n[assistant] "


def test_a_jinja_template_that_refuses_the_messages_is_a_user_error():
    tok = char_tokenizer_from_text(CHATML_CHARS + "[]")
    with pytest.raises(ChatTemplateError, match="refused the messages: no system role") as refused:
        ChatFormat(tok, jinja=JINJA).encode([Message("system", "Be brief."), Message("user", "Hi")])
    assert isinstance(refused.value, OwnLLMError)  # one line and exit code 2 in the CLI, a 400 in the server
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        ChatFormat(tok, jinja="{% for %}").encode([Message("user", "Hi")])


def test_the_prompt_drops_the_oldest_exchanges_to_leave_room_for_the_answer():
    tok = char_tokenizer_from_text(CHATML_CHARS)
    chat_format = ChatFormat(tok, get_template("chatml"))
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=256))
    assert prompt_room(256, 40) == 216 and prompt_room(256, 500) == 128  # the answer takes at most half the context
    conversation = [Message("system", "Be brief."), Message("user", "first question"), Message("assistant", "first"),
                    Message("user", "second question"), Message("assistant", "second"), Message("user", "third")]
    whole = chat_format.encode(conversation)
    assert len(whole) == 256 and chat_prompt(model, chat_format, conversation, 0) == whole  # it fits: nothing dropped
    without_first = chat_format.encode([conversation[0], *conversation[3:]])  # 176 tokens: fits beside 40
    assert chat_prompt(model, chat_format, conversation, 40) == without_first  # the system message stays
    assert chat_prompt(model, chat_format, conversation, 100) == chat_format.encode([conversation[0], conversation[5]])
    alone = [Message("user", "x" * 300)]
    assert chat_prompt(model, chat_format, alone, 40) == chat_format.encode(alone)[-216:]  # too long alone: its end
