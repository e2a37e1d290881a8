"""Answers from the user's documents in the server: `ownllm serve RUN --index FILE [--embed-model RUN]`.

A chat request with a `retrieval` field (`{"k": 4}`; with the `openai` client `extra_body={"retrieval": {"k": 4}}`)
retrieves the chunks of the index most relevant to the last user message (ownllm.retrieval.search: the index's
calibrated fusion and relevance threshold), puts as many as fit the context into that message as numbered sources
(ownllm.retrieval.sources_that_fit: the same budget rule as `ownllm ask`), and the response carries them as
`sources` (file, lines, score, relevance, text; in the last streamed chunk too). With no relevant chunk the answer
is "The documents do not say." and the model is not asked, as in `ownllm ask`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ownllm.chat import ChatFormat
from ownllm.chat_templates import Message
from ownllm.retrieval import MODES, NO_ANSWER, Hit, Index, fit_question, hit_record, search
from ownllm.serve.prompts import BadRequest
from ownllm.serve.schemas import RetrievalOptions

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun

MAX_K = 20


@dataclass
class Documents:
    """The index a server answers from and the run that embeds its queries."""

    index: Index
    embedder: "LoadedRun"

    def describe(self) -> dict[str, Any]:
        return {"chunks": len(self.index.chunks), "files": len({c.path for c in self.index.chunks})}


def check_retrieval(options: RetrievalOptions, documents: Documents | None) -> None:
    if documents is None:
        raise BadRequest("this server has no document index: start it with `ownllm serve RUN --index FILE`",
                         "retrieval")
    if not 1 <= options.k <= MAX_K:
        raise BadRequest(f"retrieval.k must be between 1 and {MAX_K}; got {options.k}", "retrieval.k")
    if options.mode not in MODES:
        raise BadRequest(f"retrieval.mode must be one of {', '.join(MODES)}; got {options.mode!r}", "retrieval.mode")
    if options.min_relevance is not None and not 0 <= options.min_relevance <= 1:
        raise BadRequest(f"retrieval.min_relevance must be in [0, 1]; got {options.min_relevance}",
                         "retrieval.min_relevance")


def question_of(conversation: list[Message]) -> str:
    """The last user message: what the documents are searched for."""
    for message in reversed(conversation):
        if message.role == "user" and message.content.strip():
            return message.content
    raise BadRequest("retrieval needs a user message to search the documents for", "messages")


def find_sources(documents: Documents, question: str, options: RetrievalOptions) -> list[Hit]:
    """The relevant chunks for `question` (runs the embedder: call it off the event loop)."""
    return search(documents.index, documents.embedder, question, k=options.k, mode=options.mode,
                  min_relevance=options.min_relevance)


def prompt_with_sources(chat_format: ChatFormat, conversation: list[Message], hits: list[Hit], block_size: int,
                        max_new_tokens: int) -> tuple[list[int], list[Hit]]:
    """The prompt ids with the last user message replaced by it and its numbered sources (as many as fit, and the
    worked examples before it when they fit too: `ownllm.retrieval.fit_question`, as `ask`)."""
    last = max(i for i, m in enumerate(conversation) if m.role == "user")

    def encode(asked: list[Message]) -> list[int]:
        return chat_format.encode([*conversation[:last], *asked, *conversation[last + 1:]])

    return fit_question(encode, conversation[last].content, hits, block_size, max_new_tokens)


def source_records(hits: list[Hit]) -> list[dict[str, Any]]:
    """The `sources` of a response: numbered as the answer cites them."""
    return [{"index": number, **hit_record(hit)} for number, hit in enumerate(hits, start=1)]


@dataclass
class _Usage:
    completion_tokens: int


class CannedCall:
    """A call the engine never sees: the answer when no source is relevant, with the events of a real one."""

    def __init__(self, text: str = NO_ANSWER) -> None:
        self.text, self.prompt_tokens = text, 0

    async def events(self, request: object = None) -> AsyncIterator[tuple[int, tuple]]:
        yield 0, ("text", self.text)
        yield 0, ("done", "stop", _Usage(0))

    def cancel(self) -> None:
        pass
