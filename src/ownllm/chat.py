"""Chat: the format a model chats in, the prompt of a conversation that fits the context, and the assistant's
answers. `ownllm chat`, `generate --instruction`, `ownllm ask` (ownllm.retrieval), the held-out answers of
`finetune instruct` and the server (ownllm.serve) all go through here, so they feed a model the same prompt ids.

    chat_format = chat_format_for(run.run_config, run.tokenizer)
    answer = chat_reply(run.model, chat_format, [Message("user", "Hi")], SamplingOptions(max_new_tokens=50))

Which format a model chats in, in order (one rule for every front end): the prompt template it was fine-tuned
with (`alpaca` or `chatml`, from `ownllm finetune instruct`; an imported model whose own template is ChatML gets
`chatml` too), else the Jinja chat template that came with an imported Hugging Face model, else ChatML (what
llama.cpp's server falls back to as well), or, where the tokenizer cannot spell ChatML's markers (a char tokenizer
trained on a play), the plain-text `transcript` template. Our templates (ownllm.chat_templates) are encoded piece
by piece exactly as in fine-tuning, so the model sees the token boundaries it learned.

The context-room rule (`prompt_room`): a prompt may take the context window less the tokens asked for, and the
answer never takes more than half the window. `chat_prompt` drops the oldest exchanges until the prompt fits;
`ownllm ask` refuses a question whose sources do not fit. Decoding itself (tokens -> text) is ownllm.decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ownllm.chat_templates import Message, Template, encode_prompt, get_template
from ownllm.decoding import SamplingOptions, decode_texts
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer


class ChatTemplateError(OwnLLMError):
    """The model's own (Jinja) chat template refused the messages or failed on them."""


# ---- chat formats -------------------------------------------------------------------------------------------------

@dataclass
class ChatFormat:
    """Renders a conversation into the prompt ids the model answers, and says where its answer ends."""

    tokenizer: Tokenizer
    template: Template | None = None  # ours (alpaca, chatml, transcript); None: the tokenizer's Jinja template
    jinja: str | None = None

    @property
    def name(self) -> str:
        return self.template.name if self.template is not None else "jinja"

    @property
    def stop(self) -> list[str]:
        return self.template.stop if self.template is not None else []

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Prompt ids; begin-of-sequence by `Tokenizer.starting_sequence`, as in training and `generate`."""
        if self.template is not None:
            return encode_prompt(conversation, self.template, self.tokenizer)
        return self.tokenizer.starting_sequence(self.tokenizer.encode(self._render_jinja(conversation)))

    def _render_jinja(self, conversation: Sequence[Message]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"the model's chat template refused the messages: {message}")

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        tok = self.tokenizer
        special = {"bos_token": tok.token(tok.bos_id) if tok.bos_id is not None else "",
                   "eos_token": tok.token(tok.eot_id) if tok.eot_id is not None else ""}
        messages = [{"role": m.role, "content": m.content + (f"\n\n{m.input}" if m.input else "")}
                    for m in conversation]
        try:
            return environment.from_string(self.jinja or "").render(messages=messages, add_generation_prompt=True,
                                                                    **special)
        except TemplateError as error:
            raise ChatTemplateError(f"the model's chat template failed: {error}") from error


def chat_format_for(run_config: dict, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format of a language model (see the module docstring for the order)."""
    if run_config.get("template"):
        return ChatFormat(tokenizer, template=get_template(run_config["template"]))
    if getattr(tokenizer, "chat_template", None):
        return ChatFormat(tokenizer, jinja=tokenizer.chat_template)
    chatml = get_template("chatml")
    if tokenizer.encode_known(chatml.render([Message("user", ""), Message("assistant", "")]))[1]:
        return ChatFormat(tokenizer, template=get_template("transcript"))  # a char tokenizer cannot spell <|im_end|>
    return ChatFormat(tokenizer, template=chatml)


# ---- prompts that fit the context ---------------------------------------------------------------------------------

def prompt_room(block_size: int, max_new_tokens: int) -> int:
    """How many prompt tokens fit the context window beside the answer (which takes at most half of it)."""
    return block_size - min(max_new_tokens, block_size // 2)


def chat_prompt(model: GPT, chat_format: ChatFormat, conversation: Sequence[Message], max_new_tokens: int) -> list[int]:
    """Prompt ids answering the last user message. The oldest exchanges are dropped while the prompt does not fit
    (`prompt_room`); a message too long by itself keeps its end."""
    conversation = list(conversation)
    prompt = chat_format.encode(conversation)
    room = prompt_room(model.config.block_size, max_new_tokens)
    while len(prompt) > room:
        first = next((i for i, m in enumerate(conversation) if m.role != "system"), len(conversation))
        later_user = next((i for i in range(first + 1, len(conversation)) if conversation[i].role == "user"), None)
        if later_user is None:
            return prompt[-room:]
        del conversation[first:later_user]
        prompt = chat_format.encode(conversation)
    return prompt


# ---- answers ------------------------------------------------------------------------------------------------------

def _with_format_stops(options: SamplingOptions | None, chat_format: ChatFormat) -> SamplingOptions:
    options = options or SamplingOptions()
    return dataclasses.replace(options, stop=[*options.stop, *chat_format.stop])


def reply_to_prompt(model: GPT, chat_format: ChatFormat, prompt: list[int], options: SamplingOptions | None = None,
                    on_text: Callable[[str], None] | None = None) -> str:
    """The answer to encoded prompt ids, stopping at the format's end marker (streamed through `on_text`)."""
    options = _with_format_stops(options, chat_format)
    stream = None if on_text is None else (lambda _, piece: on_text(piece))
    return decode_texts(model, chat_format.tokenizer, [prompt], options, stream)[0]


def chat_reply(model: GPT, chat_format: ChatFormat, conversation: Sequence[Message],
               options: SamplingOptions | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's answer to the last user message of `conversation` (streamed through `on_text`)."""
    options = options or SamplingOptions()
    prompt = chat_prompt(model, chat_format, conversation, options.max_new_tokens)
    return reply_to_prompt(model, chat_format, prompt, options, on_text)


def answer_all(model: GPT, chat_format: ChatFormat, conversations: Sequence[Sequence[Message]],
               options: SamplingOptions, batch_size: int = 16) -> list[str]:
    """Answers to many conversations (each ending with a user message), decoded in batches, whitespace stripped."""
    options = _with_format_stops(options, chat_format)
    answers: list[str] = []
    for first in range(0, len(conversations), batch_size):
        prompts = [chat_prompt(model, chat_format, c, options.max_new_tokens)
                   for c in conversations[first:first + batch_size]]
        answers += [text.strip() for text in decode_texts(model, chat_format.tokenizer, prompts, options, None)]
    return answers


def chat_loop(model: GPT, chat_format: ChatFormat, options: SamplingOptions, read_line: Callable[[], str | None],
              write: Callable[[str], None], system: str | None = None, prompt_marker: str = "") -> list[Message]:
    """Multi-turn chat: each line from `read_line` (None ends) is a user message; answers stream to `write`.
    `/reset` forgets the conversation, `/exit` ends it. Returns the conversation."""
    start = [Message("system", system)] if system else []
    conversation = list(start)
    while True:
        write(prompt_marker)
        line = read_line()
        if line is None or line.strip() in ("/exit", "/quit"):
            return conversation
        if line.strip() == "/reset":
            conversation = list(start)
            write("(conversation reset: the model no longer sees the earlier messages)\n\n")
            continue
        if not line.strip():
            continue
        conversation.append(Message("user", line.rstrip("\n")))
        answer = chat_reply(model, chat_format, conversation, options, on_text=write)
        write("\n\n")  # a blank line ends each answer
        conversation.append(Message("assistant", answer))
