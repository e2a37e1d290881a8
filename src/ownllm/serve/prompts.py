"""From API requests to token ids: completion prompts, and chat messages rendered with the run's chat template.

Which chat template a served model uses, in order: the prompt template it was fine-tuned with (`alpaca` or
`chatml`, from `ownllm finetune instruct`), else the Jinja chat template that came with an imported Hugging Face
model, else ChatML (what llama.cpp's server falls back to as well), or, where the tokenizer cannot spell ChatML's
markers (a char tokenizer trained on a play), the plain-text `transcript` template. Prompts are encoded piece by
piece exactly as in fine-tuning, so the model sees the token boundaries it learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ownllm.data.instructions import ROLES, Message, Template, encode_prompt, get_template
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


@dataclass
class ChatFormat:
    """Renders a conversation into the prompt the model answers, and says where its answer ends."""

    tokenizer: Tokenizer
    template: Template | None = None  # ours (alpaca, chatml); None: the tokenizer's Jinja template
    jinja: str | None = None

    @property
    def name(self) -> str:
        return self.template.name if self.template is not None else "jinja"

    @property
    def stop(self) -> list[str]:
        return self.template.stop if self.template is not None else []

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Prompt ids; begin-of-sequence by `Tokenizer.starting_sequence`, as in training, `chat` and `generate`."""
        if self.template is not None:
            return encode_prompt(conversation, self.template, self.tokenizer)
        return self.tokenizer.starting_sequence(self.tokenizer.encode(self._render_jinja(conversation)))

    def _render_jinja(self, conversation: Sequence[Message]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise BadRequest(f"the model's chat template refused the messages: {message}", "messages")

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        tok = self.tokenizer
        special = {"bos_token": tok.token(tok.bos_id) if tok.bos_id is not None else "",
                   "eos_token": tok.token(tok.eot_id) if tok.eot_id is not None else ""}
        try:
            return environment.from_string(self.jinja or "").render(
                messages=[{"role": m.role, "content": m.content} for m in conversation],
                add_generation_prompt=True, **special)
        except TemplateError as error:
            raise BadRequest(f"the model's chat template failed: {error}", "messages") from error


def chat_format_for(run_config: dict, tokenizer: Tokenizer) -> ChatFormat:
    """The served model's chat format (see the module docstring for the order)."""
    if run_config.get("template"):
        return ChatFormat(tokenizer, template=get_template(run_config["template"]))
    if getattr(tokenizer, "chat_template", None):
        return ChatFormat(tokenizer, jinja=tokenizer.chat_template)
    chatml = get_template("chatml")
    if tokenizer.encode_known(chatml.render([Message("user", ""), Message("assistant", "")]))[1]:
        return ChatFormat(tokenizer, template=get_template("transcript"))  # a char tokenizer cannot spell <|im_end|>
    return ChatFormat(tokenizer, template=chatml)
