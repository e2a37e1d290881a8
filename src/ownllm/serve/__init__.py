"""Serving a model on localhost: an OpenAI-compatible HTTP API, a browser chat page and /v1/classify.

    ownllm serve runs/assistant --port 8000 [--api-key-file key.txt] [--quantize int8]

`engine` is the scheduler that decodes concurrent requests together (over `ownllm.kvcache.SlotPool` and the
end rules of `ownllm.decoding`), `prompts` turns API requests into token ids, `schemas` holds the request bodies and
their checks, `app` the FastAPI routes, `static/` the chat page.
"""
