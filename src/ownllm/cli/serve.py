"""`ownllm serve`: the OpenAI-compatible server and chat page (see ownllm.serve)."""

from __future__ import annotations

import argparse

from ownllm.cli.common import add_loading_flags


def add_parsers(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve a model: OpenAI-compatible API, chat page at /, /v1/classify",
                         description="Serve a model on localhost. Any OpenAI client works with "
                                     "base_url=http://HOST:PORT/v1; the chat page is at http://HOST:PORT/.")
    srv.add_argument("model", help="run directory or Hugging Face model directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model-name", help="the model id clients use (default: the directory's name)")
    srv.add_argument("--api-key-file", help="require 'Authorization: Bearer <key>' with the key in this file")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache slots)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503")
    srv.add_argument("--context", type=int, default=None,
                     help="tokens per request kept in the KV cache (default: the model's context window, at most "
                          "4096). The cache grows with the requests running, up to --max-batch x --context "
                          "positions, and is given back when idle")
    srv.add_argument("--index", help="answer from these documents when a chat request asks (the chat page's "
                                     "\"search my documents\", or a `retrieval` field): an index made by "
                                     "`ownllm index`")
    srv.add_argument("--embed-model", help="the model that embedded the index (default: the served model)")
    add_loading_flags(srv)
    srv.add_argument("--compile", action="store_true",
                     help="decode with a torch.compile'd step (ownllm.compiled_step), compiled before the server "
                          "listens: a minute the first time, seconds later (inductor's cache)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> None:
    from ownllm.serve.server import serve

    serve(args.model, host=args.host, port=args.port, model_name=args.model_name, api_key_file=args.api_key_file,
          quantize=args.quantize, max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
          device=args.device, log_level=args.log_level, index=args.index, embed_model=args.embed_model,
          compile=args.compile)


COMMANDS = {"serve": cmd_serve}
