"""`ownllm serve`: load a run, optionally quantize it, and serve it with uvicorn on localhost.

    from ownllm.serve.server import serve
    serve("runs/assistant", port=8000, quantize="int8", api_key_file="key.txt")
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ownllm.errors import OwnLLMError

if TYPE_CHECKING:
    from ownllm.retrieval import Index
    from ownllm.runs import LoadedRun
    from ownllm.serve.documents import Documents


def read_api_key(path: str | Path) -> str:
    """The API key in a file (its first line); a missing or empty file is an error."""
    from ownllm.tokenizer import read_text_file

    key = read_text_file(path).strip().splitlines()  # a missing, binary or non-UTF-8 file: one clear error
    if not key or not key[0].strip():
        raise OwnLLMError(f"{path}: the API key file is empty")
    return key[0].strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_documents_index(path: str | Path) -> "Index":
    from ownllm.retrieval import open_index

    return open_index(path)


def documents_for(index: "Index", run: "LoadedRun", embed_model: str | Path | None, device: str) -> "Documents":
    """The index and its embedder (`embed_model`, else the served run), checked against each other now."""
    from ownllm.retrieval import index_calibration, query_vector
    from ownllm.runs import load_run
    from ownllm.serve.documents import Documents

    embedder = load_run(embed_model, device=device) if embed_model is not None else run
    query_vector(index, embedder)  # an index embedded by another model is refused at start, not per request
    index_calibration(index, embedder)
    return Documents(index, embedder)


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key_file: str | Path | None = None, quantize: str = "auto", max_batch: int = 16, max_queue: int = 64,
          context: int | None = None, device: str = "auto", log_level: str = "info",
          index: str | Path | None = None, embed_model: str | Path | None = None, compile: bool = False) -> None:
    """Serve `model` (a run or Hugging Face directory) until Ctrl-C; with `index`, chat requests may answer from
    those documents (their queries embedded by `embed_model`, default the served model); with `compile`, the
    engine decodes with the compiled step (ownllm.compiled_step), compiled before the server listens."""
    import uvicorn

    from ownllm.runs import load_run
    from ownllm.serve.app import create_app

    api_key = read_api_key(api_key_file) if api_key_file else None
    # The engine thread runs the model while the event loop thread serves the clients; both need the GIL between
    # torch ops. Python's default 5 ms switch interval would let a busy event loop hold the engine up that long at
    # each of a decoding step's ~300 op boundaries.
    sys.setswitchinterval(float(os.environ.get("OWNLLM_SWITCH_INTERVAL", "0.0005")))
    if not 0 < port < 65536:
        raise OwnLLMError(f"--port {port} is not a TCP port (1-65535)")
    if embed_model is not None and index is None:
        raise OwnLLMError("--embed-model embeds the questions of an index: give --index FILE too")
    opened = open_documents_index(index) if index is not None else None  # a bad index fails before the model loads
    run = load_run(model, device=device, quantize=quantize)
    documents = documents_for(opened, run, embed_model, device) if opened is not None else None
    if compile and run.run_config.get("task") != "classify":
        from ownllm.compiled_step import use_compiled_step

        print("compiling the decode step (a minute the first time; later starts reuse inductor's cache)...",
              file=sys.stderr, flush=True)
        stepper = use_compiled_step(run.model)
        seconds = stepper.warm_up()
        if stepper.compiled:
            print(f"compiled the decode step in {seconds:.1f} s", file=sys.stderr, flush=True)
    name = model_name or Path(model).resolve().name
    app = create_app(run, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     context=context, start_engine=False, documents=documents)
    if not is_loopback(host) and api_key is None:
        print(f"warning: serving on {host} without --api-key-file: anyone who can reach this port can use it",
              file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    engine = app.state.engine
    pool = f", KV cache grows with use up to {engine.pool_limit_bytes() / 2**20:,.0f} MiB for " \
           f"{engine.max_batch}x{engine.context} tokens" \
        if engine is not None else ""
    docs = f", answering from {len(documents.index.chunks)} chunks of {index}" if documents is not None else ""
    print(f"serving {name} ({run.config.n_layer} layers, context {run.config.block_size}, quantize {quantize}{pool}"
          f"{docs}) at http://{shown}:{port}/  (OpenAI API at http://{shown}:{port}/v1)", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    http_thread = threading.Thread(target=server.run, name="ownllm-http", daemon=True)
    http_thread.start()
    try:
        if engine is not None:
            engine.run(keep_going=http_thread.is_alive)  # the model on the main thread, HTTP beside it
        else:
            while http_thread.is_alive():
                http_thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:  # Ctrl-C: every request still running is answered 503 at once, then the server stops
        app.state.server.stopping.set()
        server.should_exit = True
        http_thread.join(timeout=30)
        if engine is not None:
            engine.close()
    if not server.started:
        raise OwnLLMError(f"could not listen on {host}:{port} (is another server using the port?)")
