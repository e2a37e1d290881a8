"""Chat templates: how a conversation is written out for the model, in fine-tuning and in chat alike.

    template = get_template("alpaca")                           # or "chatml", "transcript"
    template.render(conversation)                               # the whole text, exactly as the model sees it
    template.prompt(conversation[:-1])                          # what `generate --instruction` and `chat` feed in
    prompt_ids = encode_prompt(conversation[:-1], template, tokenizer)   # the same, encoded as in training

Training data (`ownllm.data.instructions`, `ownllm.data.preferences`) and chat (`ownllm.chat`) both read the
templates from here, so a prompt is encoded the same way when the model learns it and when it answers it. This
module needs only the tokenizer.

Templates (golden strings in tests/test_instruct.py):
- `alpaca`, the Stanford Alpaca prompt. Without an input:
  "Below is an instruction that describes a task. Write a response that appropriately completes the request.
  \\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n{output}<|endoftext|>"; with an input the first sentence
  reads "..., paired with an input that provides further context." and "\\n\\n### Input:\\n{input}" follows the
  instruction. A system message replaces the preamble; later turns add "\\n\\n### Instruction:\\n...".
- `chatml`: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message; the prompt ends "<|im_start|>assistant\\n".
  The markers are encoded by the tokenizer like any text: one token each where the tokenizer has them as special
  tokens (Qwen-style tokenizers), a few ordinary tokens otherwise (no embedding resize, so LoRA needs nothing else).
- `transcript`: plain text ("USER:", "ASSISTANT:"), each turn ending in a blank line, for a tokenizer that cannot
  spell ChatML's markers.

Each template writes a conversation as (text, learned) pieces: the assistant's responses and the end marker after
each (`<|endoftext|>` for alpaca, `<|im_end|>` for chatml) are learned, so the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ownllm.errors import OwnLLMError
from ownllm.tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str
    input: str = ""  # Alpaca's optional input, on a user message


Conversation = list[Message]


# ---- templates ----------------------------------------------------------------------------------------------------

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")


class Template:
    """Renders a conversation as (text, learned) pieces; `render` joins them, `prompt` ends where the model answers."""

    name = ""
    end = EOT  # the marker the model learns to emit after each response; generation stops at it

    def pieces(self, conversation: Sequence[Message]) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def render(self, conversation: Sequence[Message]) -> str:
        return "".join(text for text, _ in self.pieces(conversation))

    def prompt_pieces(self, conversation: Sequence[Message]) -> list[str]:
        """The pieces up to where the assistant answers the last user message of `conversation`."""
        if not conversation or conversation[-1].role != "user":
            raise OwnLLMError("a prompt needs the conversation to end with a user message")
        pieces = self.pieces([*conversation, Message("assistant", "")])
        last_learned = max(i for i, (_, learned) in enumerate(pieces) if learned)
        return [text for text, _ in pieces[:last_learned]]

    def prompt(self, conversation: Sequence[Message]) -> str:
        """The text the model continues to answer the last user message (`generate --instruction`, `chat`)."""
        return "".join(self.prompt_pieces(conversation))

    @property
    def stop(self) -> list[str]:
        """Stop strings for generation (EOT stops decoding anyway)."""
        return [] if self.end == EOT else [self.end]


class AlpacaTemplate(Template):
    name = "alpaca"

    def pieces(self, conversation: Sequence[Message]) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        system = next((m.content for m in conversation if m.role == "system"), None)
        first_user = next((m for m in conversation if m.role == "user"), None)
        header = system if system is not None else (
            ALPACA_PREAMBLE_INPUT if first_user is not None and first_user.input else ALPACA_PREAMBLE)
        prompt = header
        for message in conversation:
            if message.role == "user":
                prompt += f"\n\n### Instruction:\n{message.content}"
                if message.input:
                    prompt += f"\n\n### Input:\n{message.input}"
                prompt += "\n\n### Response:\n"
            elif message.role == "assistant":
                pieces += [(prompt, False), (message.content + self.end, True)]
                prompt = ""
        if prompt:
            pieces.append((prompt, False))
        return pieces


class ChatMLTemplate(Template):
    name = "chatml"
    end = "<|im_end|>"

    def pieces(self, conversation: Sequence[Message]) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        prompt = ""
        for message in conversation:
            if message.role == "assistant":
                pieces += [(prompt + "<|im_start|>assistant\n", False), (message.content + self.end, True)]
                prompt = "\n"
            else:
                content = message.content + (f"\n\n{message.input}" if message.input else "")
                prompt += f"<|im_start|>{message.role}\n{content}{self.end}\n"
        if prompt:
            pieces.append((prompt, False))
        return pieces


class TranscriptTemplate(Template):
    """Plain text, like the dialogue of a play ("USER:", "ASSISTANT:"), each turn ending in a blank line: the chat
    format of a served base model whose tokenizer cannot spell ChatML's markers (a char tokenizer)."""

    name = "transcript"
    end = "\n\n"

    def pieces(self, conversation: Sequence[Message]) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        prompt = ""
        for message in conversation:
            if message.role == "assistant":
                pieces += [(prompt + "ASSISTANT:\n", False), (message.content + self.end, True)]
                prompt = ""
            else:
                content = message.content + (f"\n{message.input}" if message.input else "")
                prompt += f"{message.role.upper()}:\n{content}\n\n"
        if prompt:
            pieces.append((prompt, False))
        return pieces


TEMPLATES: dict[str, Template] = {"alpaca": AlpacaTemplate(), "chatml": ChatMLTemplate(),
                                  "transcript": TranscriptTemplate()}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise OwnLLMError(f"unknown template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def speaks_chatml(jinja: str | None) -> bool:
    """Whether a model's Jinja chat template writes ChatML (`<|im_start|>` ... `<|im_end|>`)."""
    return bool(jinja) and "<|im_start|>" in jinja and "<|im_end|>" in jinja


def with_system(conversation: Sequence[Message], system: str | None) -> Conversation:
    """`conversation` with `system` as its first message when it has no system message of its own (and `system` is
    not empty): how a model's default system prompt joins a conversation, in training and in chat alike."""
    if not system or any(m.role == "system" for m in conversation):
        return list(conversation)
    return [Message("system", system), *conversation]


def encode_prompt(conversation: Sequence[Message], template: Template, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the prompt, encoded piece by piece exactly as in training (begin-of-sequence included by
    `Tokenizer.starting_sequence`): what `generate --instruction`, `chat` and the server's chat feed the model."""
    return tokenizer.starting_sequence([i for text in template.prompt_pieces(conversation)
                                        for i in tokenizer.encode(text)])
