"""The request bodies of the HTTP API and their checks: known fields typed, anything else an OpenAI client sends is
accepted and ignored; values outside OpenAI's ranges are a BadRequest naming the field (HTTP 400).

    options = sampling_options(body, context=4096, default_max_tokens=16)   # a SamplingOptions for the engine
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from ownllm.decoding import SamplingOptions
from ownllm.serve.prompts import BadRequest

MAX_STOP_STRINGS = 4
MAX_CLASSIFY_INPUTS = 256
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per request


class SamplingFields(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extra field (llama.cpp's server takes it too)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None


class RetrievalOptions(BaseModel):
    """The `retrieval` field of a chat request: answer from the server's document index (ownllm.serve.documents)."""

    model_config = ConfigDict(extra="forbid")

    k: int = 4
    mode: str = "hybrid"
    min_relevance: float | None = None  # None: the index's calibrated threshold


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]]
    retrieval: RetrievalOptions | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str]
    model: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    pooling: str | None = None  # an extra field: mean, last, weighted-mean (ownllm.embeddings)
    input_type: str = "document"  # an extra field: "query" or "document", the run's prefix for it


def sampling_options(body: SamplingFields, context: int, default_max_tokens: int, stop: Sequence[str] = (),
                     max_tokens: int | None = None) -> SamplingOptions:
    """Validated SamplingOptions for a request (OpenAI's ranges), or BadRequest naming the field."""
    if body.n not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported (leave it out or set it to 0)", name)
    max_tokens = body.max_tokens if max_tokens is None else max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not 1 <= max_tokens <= context:
        raise BadRequest(f"max_tokens must be between 1 and the context window ({context}); got {max_tokens}",
                         "max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest(f"temperature must be between 0 and 2; got {temperature}", "temperature")
    top_p = body.top_p
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise BadRequest(f"top_p must be between 0 and 1; got {top_p}", "top_p")
    if top_p == 0.0:
        temperature, top_p = 0.0, None  # nothing but the most likely token
    if body.top_k is not None and body.top_k < 1:
        raise BadRequest(f"top_k must be at least 1; got {body.top_k}", "top_k")
    if body.seed is not None and not -(2**63) <= body.seed < 2**63:
        raise BadRequest(f"seed must be a 64-bit integer; got {body.seed}", "seed")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise BadRequest(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    return SamplingOptions(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=top_p,
                           seed=body.seed, stop=[*stops, *stop])


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions request: a string, strings, token ids, or lists of token ids."""
    if body.echo or body.logprobs or body.best_of not in (None, 1):
        raise BadRequest("echo, logprobs and best_of are not supported", "echo")
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt must not be an empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def check_chat_request(body: ChatRequest) -> None:
    """The chat fields this server does not support, refused by name."""
    if body.logprobs:
        raise BadRequest("logprobs are not supported", "logprobs")
    if body.tools:
        raise BadRequest("tools are not supported", "tools")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise BadRequest("only response_format type 'text' is supported", "response_format")


def check_fits(prompts: Sequence[list[int]], max_tokens: int, context: int, param: str) -> None:
    """As the OpenAI API: each prompt, and the prompt with the tokens asked for, must fit the context window."""
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise BadRequest(f"this model's context window is {context} tokens, but the {param} "
                         f"{'take' if param.endswith('s') else 'takes'} {longest} tokens "
                         "(leave room for at least one new token)", param, code="context_length_exceeded")
    if longest + max_tokens > context:
        raise BadRequest(f"this model's context window is {context} tokens, but {longest + max_tokens} were asked "
                         f"for ({longest} in the prompt, {max_tokens} to generate): ask for fewer tokens or send a "
                         "shorter prompt", "max_tokens", code="context_length_exceeded")


def classify_texts_of(body: ClassifyRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not 1 <= len(texts) <= MAX_CLASSIFY_INPUTS:
        raise BadRequest(f"input takes 1 to {MAX_CLASSIFY_INPUTS} texts; got {len(texts)}", "input")
    empty = [index for index, text in enumerate(texts) if not text.strip()]
    if empty:
        raise BadRequest(f"input {empty[0]} is empty: an empty text has no label", "input")
    return texts


def embedding_rows(body: EmbeddingRequest, tokenizer: Any, context: int, run_config: dict) -> list[list[int]]:
    """Token ids of each input (strings encoded as `ownllm embed` does, after the run's prefix for the request's
    `input_type`), checked: BadRequest naming the input. An input longer than the context window is refused
    (`context_length_exceeded`), as OpenAI's API does."""
    from ownllm.embeddings import ROLES, embedding_prefix, encode_for_embedding

    if body.input_type not in ROLES:
        raise BadRequest(f"input_type must be one of {', '.join(ROLES)}, not {body.input_type!r}", "input_type")
    prefix = embedding_prefix(run_config, body.input_type)

    single = isinstance(body.input, str) or bool(body.input) and all(isinstance(i, int) for i in body.input)
    inputs: list[Any] = [body.input] if single else list(body.input)
    if not 1 <= len(inputs) <= MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"input takes 1 to {MAX_EMBEDDING_INPUTS} items; got {len(inputs)}", "input")
    rows = []
    for index, item in enumerate(inputs):
        param = "input" if single else f"input[{index}]"
        if isinstance(item, str):
            if not item:
                raise BadRequest(f"{param} is an empty string", param)
            row = encode_for_embedding(tokenizer, [prefix + item])[0]
        else:
            row = list(item)
            if not row:
                raise BadRequest(f"{param} is an empty list of token ids", param)
            bad = next((i for i in row if not 0 <= i < tokenizer.vocab_size), None)
            if bad is not None:
                raise BadRequest(f"{param}: token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                                 param)
        if len(row) > context:
            raise BadRequest(f"{param} takes {len(row)} tokens; this model's context window is {context} tokens",
                             param, code="context_length_exceeded")
        rows.append(row)
    return rows


def embedding_options(body: EmbeddingRequest, default_pooling: str, dim: int) -> tuple[str, str]:
    """(pooling, encoding format) of an embeddings request, or BadRequest naming the field."""
    from ownllm.model import POOLINGS

    encoding = body.encoding_format or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64', not {encoding!r}", "encoding_format")
    if body.dimensions is not None and body.dimensions != dim:
        raise BadRequest(f"this model's embeddings have {dim} dimensions; other sizes are not supported "
                         f"(leave dimensions out)", "dimensions")
    pooling = body.pooling or default_pooling
    if pooling not in POOLINGS:
        raise BadRequest(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}", "pooling")
    return pooling, encoding
