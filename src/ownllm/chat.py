"""Chat: the format a model chats in, the prompt of a conversation that fits the context, and the assistant's
answers. `ownllm chat`, `generate --instruction`, `ownllm ask` (ownllm.retrieval), the held-out answers of
`finetune instruct` and the server (ownllm.serve) all go through here, so they feed a model the same prompt ids.

    chat_format = chat_format_for(run.run_config, run.tokenizer)
    answer = chat_reply(run.model, chat_format, [Message("user", "Hi")], SamplingOptions(max_new_tokens=50))

Which format a model chats in, in order (one rule for every front end, and for the fine-tuning stages, which train
in the model's own template, `own_template`): the prompt template it was fine-tuned with (`alpaca` or `chatml`,
from `ownllm finetune instruct`), else ChatML when the model's own Jinja chat template writes ChatML (an imported
SmolLM2 or Qwen2), else that Jinja template itself (an imported model of another format), else the project's
default: ChatML (what llama.cpp's server falls back to as well), or, where the tokenizer cannot spell ChatML's
markers (a char tokenizer trained on a play), the plain-text `transcript` template. Our templates
(ownllm.chat_templates) are encoded piece by piece exactly as in fine-tuning, so the model sees the token boundaries
it learned.

The default system prompt (`default_system`): a conversation without a system message gets the run's own (config.json
"chat": {"system": ...}, set by `finetune instruct --system` or `ownllm chat-defaults`), else, in ChatML, the one the
model's Jinja chat template adds by default (SmolLM2's "You are a helpful AI assistant named SmolLM, ..."), so a
model is prompted as its own template prompts it, in every front end and in fine-tuning. The run's other chat
defaults (temperature, top_p, top_k, max_tokens) are `chat_settings`.

The context-room rule (`prompt_room`): a prompt may take the context window less the tokens asked for, and the
answer never takes more than half the window. `chat_prompt` drops the oldest exchanges until the prompt fits;
`ownllm ask` refuses a question whose sources do not fit. Decoding itself (tokens -> text) is ownllm.decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ownllm.chat_templates import Message, Template, encode_prompt, get_template, speaks_chatml, with_system
from ownllm.decoding import SamplingOptions, decode_texts
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer


class ChatTemplateError(OwnLLMError):
    """The model's own (Jinja) chat template refused the messages or failed on them."""


CHAT_SETTINGS = ("system", "temperature", "top_p", "top_k", "max_tokens")  # a run's chat defaults (config.json "chat")
PROJECT_DEFAULT = "the project's default: the model has no chat template of its own"


# ---- chat formats -------------------------------------------------------------------------------------------------

@dataclass
class ChatFormat:
    """Renders a conversation into the prompt ids the model answers, and says where its answer ends."""

    tokenizer: Tokenizer
    template: Template | None = None  # ours (alpaca, chatml, transcript); None: the tokenizer's Jinja template
    jinja: str | None = None
    system: str | None = None  # the system message a conversation without one gets (`default_system`)
    origin: str = "the model's own"  # or PROJECT_DEFAULT

    @property
    def name(self) -> str:
        return self.template.name if self.template is not None else "jinja"

    @property
    def stop(self) -> list[str]:
        return self.template.stop if self.template is not None else []

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Prompt ids; begin-of-sequence by `Tokenizer.starting_sequence`, as in training and `generate`."""
        conversation = with_system(conversation, self.system)
        if self.template is not None:
            return encode_prompt(conversation, self.template, self.tokenizer)
        return self.tokenizer.starting_sequence(self.tokenizer.encode(self._render_jinja(conversation)))

    def _render_jinja(self, conversation: Sequence[Message]) -> str:
        messages = [{"role": m.role, "content": m.content + (f"\n\n{m.input}" if m.input else "")}
                    for m in conversation]
        return render_jinja(self.jinja or "", self.tokenizer, messages, add_generation_prompt=True)


def render_jinja(jinja: str, tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A model's Jinja chat template rendered over `messages`, sandboxed, as transformers renders it."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the model's chat template refused the messages: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    special = {"bos_token": tokenizer.token(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
               "eos_token": tokenizer.token(tokenizer.eot_id) if tokenizer.eot_id is not None else ""}
    try:
        return environment.from_string(jinja).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     **special)
    except TemplateError as error:
        raise ChatTemplateError(f"the model's chat template failed: {error}") from error


def own_template(run_config: dict, tokenizer: Tokenizer) -> str | None:
    """The name of our template that is the model's own: the one it was fine-tuned with, else `chatml` when its
    Jinja chat template writes ChatML; None when it has none of ours."""
    if run_config.get("template"):
        return run_config["template"]
    return "chatml" if speaks_chatml(getattr(tokenizer, "chat_template", None)) else None


def chat_settings(run_config: dict) -> dict:
    """The run's own chat defaults (config.json "chat": system, temperature, top_p, top_k, max_tokens), those set."""
    return {k: v for k, v in (run_config.get("chat") or {}).items() if k in CHAT_SETTINGS and v is not None}


def set_chat_defaults(run_dir: str | Path, settings: dict, unset: Sequence[str] = ()) -> dict:
    """Set (and `unset`) chat defaults of the ownllm run in `run_dir`, in its config.json; the run's chat defaults
    after the change. Ranges as in the OpenAI API: temperature 0..2, top_p in (0, 1], top_k and max_tokens >= 1."""
    from ownllm.checkpoint import CONFIG_FILE, read_run_config, write_json_atomic

    ranges = {"temperature": (lambda v: 0 <= v <= 2, "in [0, 2]"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
              "top_k": (lambda v: v >= 1, "at least 1"), "max_tokens": (lambda v: v >= 1, "at least 1")}
    for name, value in settings.items():
        if name not in CHAT_SETTINGS:
            raise OwnLLMError(f"{name}: not a chat default (choose from {', '.join(CHAT_SETTINGS)})")
        if name in ranges and not ranges[name][0](value):
            raise OwnLLMError(f"--{name.replace('_', '-')} {value}: must be {ranges[name][1]}")
    config = read_run_config(Path(run_dir))
    chat = {k: v for k, v in {**chat_settings(config), **settings}.items() if k not in unset}
    config["chat"] = chat or None
    write_json_atomic(Path(run_dir) / CONFIG_FILE, config)
    return chat


def default_system(run_config: dict, tokenizer: Tokenizer, template_name: str | None) -> str | None:
    """The system message a conversation without one gets: the run's own, else, in ChatML, the one the model's Jinja
    chat template adds when a conversation has none."""
    own = chat_settings(run_config).get("system")
    if own is not None:
        return own
    jinja = getattr(tokenizer, "chat_template", None)
    if template_name != "chatml" or not speaks_chatml(jinja):
        return None
    marker = "\x00user\x00"
    try:
        text = render_jinja(jinja, tokenizer, [{"role": "user", "content": marker}], add_generation_prompt=False)
    except ChatTemplateError:
        return None  # a template that needs more than one user message has no default to read
    before = text.split(marker)[0]
    start = before.find("<|im_start|>system\n")
    if start < 0:
        return None
    return before[start + len("<|im_start|>system\n"):].split("<|im_end|>")[0]


def chat_format_for(run_config: dict, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format of a language model (see the module docstring for the order)."""
    own = own_template(run_config, tokenizer)
    system = default_system(run_config, tokenizer, own)
    if own:
        return ChatFormat(tokenizer, template=get_template(own), system=system)
    if getattr(tokenizer, "chat_template", None):
        return ChatFormat(tokenizer, jinja=tokenizer.chat_template, system=system)
    chatml = get_template("chatml")
    if tokenizer.encode_known(chatml.render([Message("user", ""), Message("assistant", "")]))[1]:
        # a char tokenizer cannot spell <|im_end|>
        return ChatFormat(tokenizer, template=get_template("transcript"), system=system, origin=PROJECT_DEFAULT)
    return ChatFormat(tokenizer, template=chatml, system=system, origin=PROJECT_DEFAULT)


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
