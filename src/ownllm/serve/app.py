"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /v1/classify,
/health, and the chat page at /.

    app = create_app(ownllm.load("runs/assistant"), model_name="assistant", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `ownllm serve` does

Responses and stream chunks have the shapes of the OpenAI API (and llama.cpp's server), so `openai` clients work
unchanged. Every user mistake is a 4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`:
400 for bad parameters, 401 for a missing or wrong API key, 404 for an unknown path or model, 413 for a body over
the limit, 503 when too many requests are running and queued.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ownllm.checkpoint import LoadedRun
from ownllm.errors import OwnLLMError
from ownllm.decoding import SamplingOptions
from ownllm.serve.engine import Engine, EngineBusy
from ownllm.serve.prompts import BadRequest, chat_format_for, encode_completion_prompt, parse_messages

STATIC = Path(__file__).parent / "static"
MAX_STOP_STRINGS = 4
MAX_CLASSIFY_INPUTS = 256


# ---- request bodies: known fields typed, anything else an OpenAI client sends is accepted and ignored -------------

class _Sampling(BaseModel):
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


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str]
    model: str | None = None


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


# ---- turning request fields into sampling options -----------------------------------------------------------------

def sampling_options(body: _Sampling, context: int, default_max_tokens: int, stop: Sequence[str] = (),
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


# ---- one HTTP call's requests, as events on the event loop --------------------------------------------------------

class Job:
    """The engine requests of one API call (one per prompt), their events delivered to this event loop."""

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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the application ----------------------------------------------------------------------------------------------

def create_app(run: LoadedRun, *, model_name: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, context: int | None = None, max_body_bytes: int = 4 << 20,
               start_engine: bool = True) -> FastAPI:
    """The server for one loaded model. A classifier run answers /v1/classify; a language model the rest.

    The engine (`app.state.engine`) runs on a thread of its own while the app is up; with `start_engine=False`
    the caller runs it (`engine.run()`, what `ownllm serve` does on the main thread)."""
    is_classifier = run.run_config.get("task") == "classify"
    engine = None if is_classifier else Engine(run.model, run.tokenizer, max_batch, max_queue, context)
    chat_format = None if is_classifier else chat_format_for(run.run_config, run.tokenizer)
    created = int(time.time())
    classify_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None and start_engine:
            engine.start()
        yield
        if engine is not None:
            engine.close()

    app = FastAPI(title="ownllm", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine, app.state.run, app.state.model_name = engine, run, model_name
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    # -- errors --
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error_response(error.status, error.message, error.type, error.param, error.code)

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, error: BadRequest) -> JSONResponse:
        return _error_response(400, str(error), param=error.param, code=error.code)

    @app.exception_handler(EngineBusy)
    async def _busy(_: Request, error: EngineBusy) -> JSONResponse:
        return _error_response(503, str(error), "server_error", code="server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(OwnLLMError)
    async def _own_error(_: Request, error: OwnLLMError) -> JSONResponse:
        return _error_response(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif not location and first.get("type") == "model_attributes_type":
            message = "the request body must be a JSON object (send it with Content-Type: application/json)"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return _error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(error.status_code, str(error.detail), code=code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    # -- auth and model name --
    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def need_engine() -> Engine:
        if engine is None:
            raise ApiError(400, f"{model_name!r} is a classifier: use POST /v1/classify", code="wrong_endpoint")
        return engine

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "ownllm",
                "task": "classify" if is_classifier else "lm", "context_window": run.config.block_size}

    # -- routes --
    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **(engine.stats() if engine else {})}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(require_key)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        engine = need_engine()
        if body.echo or body.logprobs or body.best_of not in (None, 1):
            raise BadRequest("echo, logprobs and best_of are not supported", "echo")
        prompts = _completion_prompts(body.prompt)
        ids = [encode_completion_prompt(run.tokenizer, p) for p in prompts]
        options = sampling_options(body, engine.context, default_max_tokens=16)
        _check_fits(ids, options.max_new_tokens, engine.context, "prompt")
        job = Job(engine, ids, options)
        response_id, stamp = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": response_id, "object": "text_completion", "created": stamp, "model": model_name,
                "system_fingerprint": None}
        if body.stream:
            return _stream(_completion_chunks(job, base, _include_usage(body)))
        texts = [""] * len(ids)
        reasons, completion_tokens = [None] * len(ids), 0
        async for index, event in job.events(request):
            if event[0] == "text":
                texts[index] += event[1]
            elif event[0] == "done":
                reasons[index], completion_tokens = event[1], completion_tokens + event[2].completion_tokens
            else:
                raise ApiError(500, event[1], "server_error")
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({**base, "choices": choices, "usage": _usage(job.prompt_tokens, completion_tokens)})

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)], response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        engine = need_engine()
        if body.logprobs:
            raise BadRequest("logprobs are not supported", "logprobs")
        if body.tools:
            raise BadRequest("tools are not supported", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise BadRequest("only response_format type 'text' is supported", "response_format")
        prompt = chat_format.encode(parse_messages(body.messages))
        options = sampling_options(body, engine.context, default_max_tokens=max(1, engine.context - len(prompt)),
                                   stop=chat_format.stop, max_tokens=body.max_completion_tokens or body.max_tokens)
        _check_fits([prompt], options.max_new_tokens, engine.context, "messages")
        job = Job(engine, [prompt], options)
        response_id, stamp = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": response_id, "created": stamp, "model": model_name, "system_fingerprint": None}
        if body.stream:
            return _stream(_chat_chunks(job, base, _include_usage(body)))
        text, reason, completion_tokens = "", None, 0
        async for _, event in job.events(request):
            if event[0] == "text":
                text += event[1]
            elif event[0] == "done":
                reason, completion_tokens = event[1], event[2].completion_tokens
            else:
                raise ApiError(500, event[1], "server_error")
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": reason}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice],
                             "usage": _usage(job.prompt_tokens, completion_tokens)})

    @app.post("/v1/classify", dependencies=[Depends(require_key)])
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        check_model(body.model)
        if not is_classifier:
            raise ApiError(400, f"{model_name!r} is not a classifier run (fine-tune one with `ownllm finetune "
                                "classify`)", code="wrong_endpoint")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not 1 <= len(texts) <= MAX_CLASSIFY_INPUTS:
            raise BadRequest(f"input takes 1 to {MAX_CLASSIFY_INPUTS} texts; got {len(texts)}", "input")
        from ownllm.finetune.classify import classify_texts

        async with classify_lock:  # one batch at a time on the model
            results = await run_in_threadpool(classify_texts, run, texts)
        tokens = sum(len(run.tokenizer.encode(t)) for t in texts)
        return {"object": "list", "model": model_name,
                "data": [{"index": i, "object": "classification", **r} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt must not be an empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _check_fits(prompts: Sequence[list[int]], max_tokens: int, context: int, param: str) -> None:
    """As the OpenAI API: each prompt, and the prompt with the tokens asked for, must fit the context window."""
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise BadRequest(f"this model's context window is {context} tokens, but the {param} take {longest} tokens "
                         "(leave room for at least one new token)", param, code="context_length_exceeded")
    if longest + max_tokens > context:
        raise BadRequest(f"this model's context window is {context} tokens, but {longest + max_tokens} were asked "
                         f"for ({longest} in the prompt, {max_tokens} to generate): ask for fewer tokens or send a "
                         "shorter prompt", "max_tokens", code="context_length_exceeded")


def _include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.get("include_usage"))


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _completion_chunks(job: Job, base: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    completion_tokens = 0
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, event in job.events():
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
                yield _sse({**base, "choices": [], "usage": _usage(job.prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:
        job.cancel()  # the client went away (or we are done): free the slots


async def _chat_chunks(job: Job, base: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    chunk = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def choice(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                **extra}

    try:
        yield _sse(choice({"role": "assistant", "content": ""}))
        completion_tokens = 0
        async for _, event in job.events():
            if event[0] == "text":
                yield _sse(choice({"content": event[1]}))
            elif event[0] == "done":
                completion_tokens = event[2].completion_tokens
                yield _sse(choice({}, event[1]))
            else:
                yield _sse(error_body(event[1], "server_error"))
                break
        else:
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(job.prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")
    finally:
        job.cancel()
