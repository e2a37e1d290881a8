"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/v1/classify, /health, and the chat page at /.

    app = create_app(ownllm.load("runs/assistant"), model_name="assistant", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `ownllm serve` does

Responses and stream chunks have the shapes of the OpenAI API (and llama.cpp's server), so `openai` clients work
unchanged. Every user mistake is a 4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`:
400 for bad parameters, 401 for a missing or wrong API key, 404 for an unknown path or model, 413 for a body over
the limit, 503 when too many requests are running and queued.

The routes are plain functions over the app's `ServerState` (`request.app.state.server`); the request bodies and
their checks are in `ownllm.serve.schemas`, prompts in `ownllm.serve.prompts` and `ownllm.chat`, the scheduler in
`ownllm.serve.engine`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ownllm.chat import ChatFormat, ChatTemplateError, chat_format_for, chat_settings
from ownllm.classification import classify_texts
from ownllm.decoding import SamplingOptions
from ownllm.embeddings import default_pooling, embed_token_rows
from ownllm.runs import LoadedRun
from ownllm.errors import OwnLLMError
from ownllm.serve.documents import (CannedCall, Documents, check_retrieval, find_sources, prompt_with_sources,
                                    question_of, source_records)
from ownllm.serve.engine import Engine, EngineBusy
from ownllm.serve.prompts import BadRequest, encode_completion_prompt, parse_messages
from ownllm.serve.schemas import (ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest,
                                  check_chat_request, check_fits, classify_texts_of, completion_prompts,
                                  embedding_options, embedding_rows, sampling_options)

STATIC = Path(__file__).parent / "static"


# ---- errors --------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, declared or streamed."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyLimit._TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyLimit._TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        # Read (and drop) what the client is still sending, up to a bound, so that it gets to read our answer
        # instead of a reset connection.
        drained = 0
        while drained < 16 * self.max_bytes:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        response = _error_response(413, f"the request body is larger than {self.max_bytes} bytes",
                                   code="request_too_large")
        await response(scope, receive, send)


# ---- error handlers: every error in the OpenAI shape ----------------------------------------------------------------

async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return _error_response(error.status, error.message, error.type, error.param, error.code)


async def _bad_request(_: Request, error: BadRequest) -> JSONResponse:
    return _error_response(400, str(error), param=error.param, code=error.code)


async def _busy(_: Request, error: EngineBusy) -> JSONResponse:
    return _error_response(503, str(error), "server_error", code="server_busy", headers={"Retry-After": "1"})


async def _own_error(_: Request, error: OwnLLMError) -> JSONResponse:
    return _error_response(400, str(error))


async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":  # its location is a character offset, not a parameter
        message, param = "the request body is not valid JSON", None
    elif not location and first.get("type") == "model_attributes_type":
        message = "the request body must be a JSON object (send it with Content-Type: application/json)"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return _error_response(400, message, param=param)


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return _error_response(error.status_code, str(error.detail), code=code)


async def _bug(_: Request, error: Exception) -> JSONResponse:
    return _error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")


ERROR_HANDLERS = {ApiError: _api_error, BadRequest: _bad_request, EngineBusy: _busy, OwnLLMError: _own_error,
                  RequestValidationError: _invalid, StarletteHTTPException: _http_error, Exception: _bug}


# ---- the server's state: one loaded model ---------------------------------------------------------------------------

@dataclass
class ServerState:
    """What the routes work with: the run, its name, the engine (None for a classifier) and the chat format."""

    run: LoadedRun
    model_name: str
    api_key: str | None
    engine: Engine | None
    chat_format: ChatFormat | None
    created: int = field(default_factory=lambda: int(time.time()))
    classify_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one classification/embedding batch at a time
    stopping: threading.Event = field(default_factory=threading.Event)  # set on Ctrl-C: unfinished batches get 503
    documents: Documents | None = None  # the index chat requests with a `retrieval` field answer from

    @property
    def is_classifier(self) -> bool:
        return self.engine is None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def language_model(self) -> tuple[Engine, ChatFormat]:
        """The engine and chat format, or a 400 for a classifier run."""
        if self.engine is None or self.chat_format is None:
            raise ApiError(400, f"{self.model_name!r} is a classifier: use POST /v1/classify", code="wrong_endpoint")
        return self.engine, self.chat_format

    def model_card(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ownllm",
                "task": "classify" if self.is_classifier else "lm", "context_window": self.run.config.block_size}
        return {**card, "documents": self.documents.describe()} if self.documents is not None else card


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def require_key(request: Request) -> None:
    api_key = _state(request).api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


# ---- one HTTP call's requests, as events on the event loop --------------------------------------------------------

class ApiCall:
    """One HTTP call's engine requests (one `engine.Request` per prompt), their events delivered to this event
    loop."""

    def __init__(self, engine: Engine, prompts: Sequence[list[int]], options: SamplingOptions) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        try:
            for index, prompt in enumerate(prompts):
                self.requests.append(engine.submit(prompt, options, self._receiver(index)))
        except BaseException:
            self.cancel()
            raise
        self.prompt_tokens = sum(len(p) for p in prompts)

    def _receiver(self, index: int):
        def receive(event: tuple) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return receive

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, tuple]]:
        """(index, event) until every request is done; checks for a vanished client when `request` is given."""
        open_requests = len(self.requests)
        while open_requests:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if event[0] in ("done", "error"):
                open_requests -= 1
            yield index, event

    def cancel(self) -> None:
        for engine_request in self.requests:
            self.engine.cancel(engine_request)


def engine_error(event: tuple) -> ApiError:
    """The HTTP error of an engine's ("error", message, status) event: 503 when the server is shutting down."""
    return ApiError(event[2], event[1], "server_error", code="server_shutting_down" if event[2] == 503 else None)


async def model_call(state: ServerState, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` (a classification or embedding batch) on a worker thread, the event loop serving
    on; when the server stops first (Ctrl-C), a 503 at once: the thread is left to end on its own."""
    work = asyncio.ensure_future(anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs),
                                                          abandon_on_cancel=True))
    while not work.done():
        if state.stopping.is_set():
            work.cancel()
            raise engine_error(("error", "the server is shutting down", 503))
        await asyncio.wait({work}, timeout=0.25)
    return work.result()


# ---- routes ----------------------------------------------------------------------------------------------------

async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def health(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"status": "ok", "model": state.model_name, **(state.engine.stats() if state.engine else {})}


async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_state(request).model_card()]}


async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(model_id)
    return state.model_card()


async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    state = _state(request)
    state.check_model(body.model)
    engine, _ = state.language_model()
    ids = [encode_completion_prompt(state.run.tokenizer, p) for p in completion_prompts(body)]
    options = sampling_options(body, engine.context, default_max_tokens=16)
    check_fits(ids, options.max_new_tokens, engine.context, "prompt")
    call = ApiCall(engine, ids, options)
    base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": None}
    if body.stream:
        return _stream(_completion_chunks(call, base, body.include_usage))
    texts, reasons, completion_tokens = [""] * len(ids), [None] * len(ids), 0
    async for index, event in call.events(request):
        if event[0] == "text":
            texts[index] += event[1]
        elif event[0] == "done":
            reasons[index], completion_tokens = event[1], completion_tokens + event[2].completion_tokens
        else:
            raise engine_error(event)
    choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse({**base, "choices": choices, "usage": _usage(call.prompt_tokens, completion_tokens)})


def with_chat_defaults(body: ChatRequest, run_config: dict[str, Any]) -> ChatRequest:
    """The request with the sampling fields it leaves unset taken from the run's chat defaults (config.json "chat",
    ownllm.chat.chat_settings), as `ownllm chat` takes them."""
    defaults = chat_settings(run_config)
    update = {name: defaults[name] for name in ("temperature", "top_p", "top_k", "max_tokens")
              if name in defaults and getattr(body, name) is None}
    if body.max_completion_tokens is not None:
        update.pop("max_tokens", None)
    return body.model_copy(update=update) if update else body


async def chat_prompt_ids(state: ServerState, body: ChatRequest, chat_format: ChatFormat,
                          context: int) -> tuple[list[int], list | None]:
    """The request's prompt ids, and its sources when it asks to retrieve (None when it does not; [] when no
    chunk is relevant: then the prompt is not needed)."""
    try:
        conversation = parse_messages(body.messages)
        if body.retrieval is None:
            return chat_format.encode(conversation), None
        check_retrieval(body.retrieval, state.documents)
        async with state.classify_lock:  # the embedder may be the served model: one batch at a time beside decoding
            hits = await model_call(state, find_sources, state.documents, question_of(conversation), body.retrieval)
        if not hits:
            return [], []
        answer_room = body.max_completion_tokens or body.max_tokens or min(256, context // 2)
        return prompt_with_sources(chat_format, conversation, hits, context, answer_room)
    except ChatTemplateError as error:
        raise BadRequest(str(error), "messages") from error


async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
    state = _state(request)
    state.check_model(body.model)
    engine, chat_format = state.language_model()
    check_chat_request(body)
    body = with_chat_defaults(body, state.run.run_config)
    prompt, hits = await chat_prompt_ids(state, body, chat_format, engine.context)
    extra = {"sources": source_records(hits)} if hits is not None else {}
    if hits == []:
        call = CannedCall()
    else:
        options = sampling_options(body, engine.context, default_max_tokens=max(1, engine.context - len(prompt)),
                                   stop=chat_format.stop, max_tokens=body.max_completion_tokens or body.max_tokens)
        check_fits([prompt], options.max_new_tokens, engine.context, "messages")
        call = ApiCall(engine, [prompt], options)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": state.model_name,
            "system_fingerprint": None}
    if body.stream:
        return _stream(_chat_chunks(call, base, body.include_usage, extra))
    text, reason, completion_tokens = "", None, 0
    async for _, event in call.events(request):
        if event[0] == "text":
            text += event[1]
        elif event[0] == "done":
            reason, completion_tokens = event[1], event[2].completion_tokens
        else:
            raise engine_error(event)
    choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
              "logprobs": None, "finish_reason": reason}
    return JSONResponse({**base, "object": "chat.completion", "choices": [choice],
                         "usage": _usage(call.prompt_tokens, completion_tokens), **extra})


async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(body.model)
    if not state.is_classifier:
        raise ApiError(400, f"{state.model_name!r} is not a classifier run (fine-tune one with `ownllm finetune "
                            "classify`)", code="wrong_endpoint")
    texts = classify_texts_of(body)
    async with state.classify_lock:  # one batch at a time on the model
        results = await model_call(state, classify_texts, state.run, texts)
    tokens = sum(len(state.run.tokenizer.encode(t)) for t in texts)
    return {"object": "list", "model": state.model_name,
            "data": [{"index": i, "object": "classification", **r} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """Vectors as `ownllm embed` writes them (ownllm.embeddings), for any run: a language model or a classifier."""
    state = _state(request)
    state.check_model(body.model)
    run = state.run
    pooling, encoding = embedding_options(body, default_pooling(run), run.config.n_embd)
    rows = embedding_rows(body, run.tokenizer, run.config.block_size, run.run_config)

    async with state.classify_lock:  # one batch at a time on the model (beside the engine's decoding)
        result = await model_call(state, embed_token_rows, run.model, rows, pooling=pooling, warn=False)
    data = [{"object": "embedding", "index": index, "embedding": _encode_vector(vector, encoding)}
            for index, vector in enumerate(result.vectors.numpy())]
    tokens = sum(len(row) for row in rows)
    return {"object": "list", "data": data, "model": state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode_vector(vector: Any, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI's API sends it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _add_routes(app: FastAPI) -> None:
    keyed = {"dependencies": [Depends(require_key)]}
    app.get("/", include_in_schema=False)(chat_page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.get("/health")(health)
    app.get("/v1/models", **keyed)(list_models)
    app.get("/v1/models/{model_id}", **keyed)(get_model)
    app.post("/v1/completions", response_model=None, **keyed)(completions)
    app.post("/v1/chat/completions", response_model=None, **keyed)(chat_completions)
    app.post("/v1/embeddings", **keyed)(embeddings)
    app.post("/v1/classify", **keyed)(classify)


# ---- the application ----------------------------------------------------------------------------------------------

def create_app(run: LoadedRun, *, model_name: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, context: int | None = None, max_body_bytes: int = 4 << 20,
               start_engine: bool = True, documents: Documents | None = None) -> FastAPI:
    """The server for one loaded model. A classifier run answers /v1/classify; a language model the rest.

    The engine (`app.state.engine`) runs on a thread of its own while the app is up; with `start_engine=False`
    the caller runs it (`engine.run()`, what `ownllm serve` does on the main thread). With `documents` (an index
    and its embedder), chat requests with a `retrieval` field answer from it (ownllm.serve.documents)."""
    is_classifier = run.run_config.get("task") == "classify"
    engine = None if is_classifier else Engine(run.model, run.tokenizer, max_batch, max_queue, context)
    chat_format = None if is_classifier else chat_format_for(run.run_config, run.tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None and start_engine:
            engine.start()
        yield
        if engine is not None:
            engine.close()

    app = FastAPI(title="ownllm", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = ServerState(run, model_name, api_key, engine, chat_format, documents=documents)
    app.state.engine, app.state.run, app.state.model_name = engine, run, model_name
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    for error_class, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error_class, handler)
    _add_routes(app)
    return app


# ---- responses ------------------------------------------------------------------------------------------------------

def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _completion_chunks(call: ApiCall, base: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    completion_tokens = 0
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, event in call.events():
            if event[0] == "error":
                yield _sse(error_body(event[1], "server_error"))
                break
            text, reason = (event[1], None) if event[0] == "text" else ("", event[1])
            if event[0] == "done":
                completion_tokens += event[2].completion_tokens
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
            yield _sse({**base, "choices": [choice], **extra})
        else:
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(call.prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:
        call.cancel()  # the client went away (or we are done): free the slots


async def _chat_chunks(call: ApiCall | CannedCall, base: dict[str, Any], include_usage: bool,
                       last: dict[str, Any]) -> AsyncIterator[str]:
    """The stream of a chat answer; `last` (the sources) goes into the chunk that ends it."""
    chunk = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def choice(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                **extra}

    try:
        yield _sse(choice({"role": "assistant", "content": ""}))
        completion_tokens = 0
        async for _, event in call.events():
            if event[0] == "text":
                yield _sse(choice({"content": event[1]}))
            elif event[0] == "done":
                completion_tokens = event[2].completion_tokens
                yield _sse({**choice({}, event[1]), **last})
            else:
                yield _sse(error_body(event[1], "server_error"))
                break
        else:
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(call.prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:
        call.cancel()
