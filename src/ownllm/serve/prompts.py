"""From API requests to token ids: completion prompts (text or token ids), and OpenAI chat messages as Messages,
which the run's chat format (ownllm.chat, the same as `ownllm chat`'s) turns into prompt ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from ownllm.chat_templates import ROLES, Message
from ownllm.decoding import prompt_ids
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import Tokenizer


class BadRequest(OwnLLMError):
    """A request the client must change: answered with HTTP 400 and the OpenAI error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def encode_completion_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a completion prompt (text, or token ids as the OpenAI API also accepts)."""
    if isinstance(prompt, str):
        ids = prompt_ids(tokenizer, prompt)
    else:
        ids = list(prompt)
        bad = next((i for i in ids if not 0 <= i < tokenizer.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", "prompt")
        if not ids and tokenizer.eot_id is not None:
            ids = [tokenizer.eot_id]  # an empty prompt starts a fresh document, as in training
    if not ids:
        raise BadRequest("the prompt is empty", "prompt")
    return ids


def parse_messages(messages: Sequence[dict]) -> list[Message]:
    """OpenAI chat messages -> Messages; `developer` counts as `system`, text content parts are joined."""
    if not messages:
        raise BadRequest("messages must hold at least one message", "messages")
    parsed = []
    for index, message in enumerate(messages):
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise BadRequest(f"messages[{index}].role {message.get('role')!r} is not one of system, user, assistant",
                             f"messages[{index}].role")
        parsed.append(Message(role, _content_text(message.get("content"), index)))
    if parsed[-1].role != "user":
        raise BadRequest("the last message must be from the user", f"messages[{len(parsed) - 1}].role")
    return parsed


def _content_text(content: object, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("only text content parts are supported", f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest("content must be a string or a list of text parts", f"messages[{index}].content")
