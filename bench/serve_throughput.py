"""Server throughput: generated tokens per second, in total, with 1, 4 and 16 concurrent clients.

    .venv/bin/python bench/serve_throughput.py                          # gpt2 shape (124M), fp32
    .venv/bin/python bench/serve_throughput.py --quantize int8 --clients 1,16
    .venv/bin/python bench/serve_throughput.py --model SmolLM2-135M-Instruct.Q4_1.gguf --quantize int4 --compile
    .venv/bin/python bench/serve_throughput.py --preset mini --tokens 64 --requests-per-client 2 --json
    .venv/bin/python bench/serve_throughput.py --step-cost --clients 1,16   # and the model's step cost by rows

Starts `ownllm serve` as a user would (its own process, on 127.0.0.1) on a run of the preset's shape with random
weights and GPT-2's tokenizer (read from `--tokenizer`, default ../shared/data/rasbt). For each concurrency C, C
client threads each stream `--requests-per-client` completions (greedy, `--tokens` new tokens, a 16-token prompt)
one after another over plain HTTP (a light load generator: the `openai` client parsing every chunk would take CPU
the server needs on a 2-core machine; the tests use the real client); the figure is all completion tokens (as the
server's `usage` counts them) divided by the wall time. C = 1 is the sequential baseline; the speedup at C is its
ratio to C = 1, measured in the same run against the same server. A decoding step reads every weight once whatever
the batch, which is why batching pays (`--step-cost` shows what 16 rows cost here): the target is >= 8x at 16
clients. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_TOKENIZER = HERE.parent.parent / "shared" / "data" / "rasbt"


def write_run(preset: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A run directory with the preset's shape, random weights and the given tokenizer."""
    from ownllm.checkpoint import TOKENIZER_DIR, WEIGHTS_FILE, save_weights, write_run_config
    from ownllm.config import ModelConfig, model_config_from_preset
    from ownllm.model import GPT
    from ownllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = model_config_from_preset(preset)
    config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    run = folder / preset
    run.mkdir(parents=True)
    save_weights(GPT(config), run / WEIGHTS_FILE)
    tokenizer.save(run / TOKENIZER_DIR)
    write_run_config(run, config, task="lm", preset=preset)
    return run


def start_server(run: Path, port: int, quantize: str, max_batch: int, threads: int,
                 compile: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "ownllm", "serve", str(run), "--port", str(port), "--model-name", "bench",
               "--quantize", quantize, "--max-batch", str(max_batch), "--log-level", "warning"]
    command += ["--compile"] if compile else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start in 5 minutes")


def stream_completion(port: int, prompt: list[int], tokens: int) -> int:
    """One streamed completion over plain HTTP (a light client, so that the load generator takes little of the
    CPU the server needs); returns the completion tokens the server's usage chunk reports."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    usage = None
    for line in response:
        if line.startswith(b'data: {"id"') and b'"usage": {' in line:
            usage = json.loads(line[6:])["usage"]
    connection.close()
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return usage["completion_tokens"]


def measure(port: int, clients: int, requests_per_client: int, tokens: int, prompt: list[int]) -> dict:
    counts: list[int] = []
    errors: list[str] = []

    def client_thread() -> None:
        for _ in range(requests_per_client):
            try:
                counts.append(stream_completion(port, prompt, tokens))
            except Exception as error:  # noqa: BLE001 - reported in the results
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"clients": clients, "requests": len(counts), "errors": len(errors), "completion_tokens": sum(counts),
            "seconds": round(seconds, 2), "tokens_per_sec": round(sum(counts) / seconds, 1),
            "first_error": errors[0] if errors else None}


def step_costs(run_dir: Path, batches: list[int], quantize: str, steps: int = 10) -> dict[int, float]:
    """Milliseconds per decoding step of the engine's model call with `b` rows, in this process (no HTTP)."""
    import ownllm
    from ownllm.quantize import model_dtype, quantize_model
    from ownllm.kvcache import SlotPool

    run = ownllm.load(run_dir)
    model = quantize_model(run.model, quantize)
    costs = {}
    with torch.inference_mode():
        for rows in batches:
            pool = SlotPool(model.config, rows, 256, model.tok_emb.weight.device, model_dtype(model))
            model.hidden_states(torch.randint(0, 50_000, (rows, 16)), cache=pool.prefill_view(0, rows))
            pool.lengths[:rows] = [16] * rows
            ids = torch.randint(0, 50_000, (rows, 1))
            for step in range(steps + 2):
                if step == 2:
                    start = time.perf_counter()
                view = pool.decode_view(rows)
                model(ids, cache=view, positions=view.positions.view(-1, 1)).argmax(-1)
            costs[rows] = round(1000 * (time.perf_counter() - start) / steps, 1)
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--model", type=Path, default=None,
                        help="serve this run, HF directory or GGUF file instead of a random model of --preset's shape")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="GPT-2 tokenizer files (encoder.json + vocab.bpe) or any tokenizer directory")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--quantize", default="none", choices=["auto", "none", "bf16", "int8", "int4"])
    parser.add_argument("--compile", action="store_true", help="serve with the compiled decode step")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--step-cost", action="store_true",
                        help="also time one decoding step of the model with 1 row and with the largest --clients rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if args.model is not None and args.step_cost:
        parser.error("--step-cost times a random model of --preset's shape, not --model")
    # Token ids every vocabulary here has (GPT-2's 50,257; SmolLM2's 49,152).
    high = 50_000 if args.model is None else 40_000
    prompt = torch.randint(0, high, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.model or write_run(args.preset, args.tokenizer, Path(tmp))
        server = start_server(run, args.port, args.quantize, max(levels), args.threads, args.compile)
        if args.step_cost:
            costs = step_costs(run, [1, max(levels)], args.quantize)
            print(f"one decoding step: {costs[1]} ms with 1 row, {costs[max(levels)]} ms with {max(levels)} rows "
                  f"(the most the batch can gain: {max(levels) * costs[1] / costs[max(levels)]:.1f}x)")
        try:
            measure(args.port, 1, 1, 8, prompt)  # warm-up
            results = [measure(args.port, c, args.requests_per_client, args.tokens, prompt) for c in levels]
        finally:
            server.terminate()
            server.wait(timeout=60)
    baseline = results[0]["tokens_per_sec"]
    for result in results:
        result.update(preset=str(args.model or args.preset), quantize=args.quantize, compile=args.compile,
                      tokens=args.tokens,
                      speedup_vs_first=round(result["tokens_per_sec"] / baseline, 2))
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{result['clients']:>3} clients: {result['tokens_per_sec']:7.1f} tok/s in total "
                  f"({result['completion_tokens']} tokens, {result['requests']} requests, {result['seconds']} s), "
                  f"{result['speedup_vs_first']}x vs {levels[0]} client(s); errors {result['errors']}"
                  + (f" ({result['first_error']})" if result["first_error"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
