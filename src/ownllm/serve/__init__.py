"""Serving a model on localhost: an OpenAI-compatible HTTP API, a browser chat page and /v1/classify.

    ownllm serve runs/assistant --port 8000 [--api-key-file key.txt] [--quantize int8]

`slots` holds the KV cache pool, `engine` the scheduler that decodes concurrent requests together, `prompts`
turns API requests into token ids, `app` is the FastAPI application, `static/` the chat page.
"""
