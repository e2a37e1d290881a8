"""The memory the open models' real shapes need in ownllm, and decode speed of randomly initialised ones.

    PYTHONPATH=src .venv/bin/python bench/open_model_shapes.py                      # the memory table (no weights)
    PYTHONPATH=src .venv/bin/python bench/open_model_shapes.py --decode gemma3-270m qwen3-0.6b --tokens 32
    PYTHONPATH=src .venv/bin/python bench/open_model_shapes.py --gguf smollm2-360m /tmp/smol360.gguf \
        --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf       # then bench/decode_speed.py --model /tmp/smol360.gguf

The shapes are the published config.json values of each model (hidden size, layers, heads, vocabulary, ...),
mapped by ownllm's own Hugging Face reader; parameters are counted on the meta device (tied embeddings once).
Memory of the weights as ownllm holds them: fp32 (the default; a GGUF of any quantization is dequantized to this),
bf16 (`--quantize bf16`), int8 (`--quantize int8`: linear layers int8 with one fp32 scale per row, the embedding
table stays fp32, so a tied LM head costs an int8 copy besides it) and int4 (a GGUF Q4_0 file's size, 4.5 bits a
weight, what llama.cpp holds; ownllm itself does not compute in 4 bits). The KV cache per 4,096 tokens of context
is added separately. `--decode` builds random fp32 and bf16 models of the named shapes, prefills 16 tokens and
times `--tokens` greedy steps with a KV cache, and reads the process's peak resident memory. `--gguf SHAPE OUT`
writes a random model of a shape as a Q4_0 GGUF file (`ownllm export --quant q4_0`), with the tokenizer of
`--tokenizer-from` (a run or GGUF file of the same vocabulary), for bench/decode_speed.py's speed and memory rows
of models larger than one can download here (its answers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from ownllm.interop.readers.hf_config import model_config_from_hf
from ownllm.model import GPT

SHAPES = {  # the published config.json values that set the shape
    "smollm2-360m": dict(model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    "smollm2-1.7b": dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=130000.0),
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256),
    "gemma3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                      max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1000000),
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1000000),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                        max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm3-3b": dict(model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=65536, tie_word_embeddings=True, rope_theta=5000000.0),
}
GB = 1e9


def memory_row(name: str, context: int = 4096) -> dict:
    config = model_config_from_hf(SHAPES[name], name)
    with torch.device("meta"):
        model = GPT(config)
    params = model.num_params()
    embedding = model.tok_emb.weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rest = params - embedding - (linear - (embedding if config.tie_embeddings else 0))
    int8 = 4 * embedding + linear + 4 * sum(m.weight.shape[0] for m in model.modules()
                                            if isinstance(m, torch.nn.Linear)) + 4 * rest
    kv = 2 * config.n_layer * config.kv_heads * config.head_size * context
    return {"model": name, "params_B": round(params / 1e9, 3), "fp32_GB": round(4 * params / GB, 2),
            "bf16_GB": round(2 * params / GB, 2), "int8_GB": round(int8 / GB, 2),
            "int4_gguf_GB": round(params * 4.5 / 8 / GB, 2), "kv_fp32_GB_per_4k": round(4 * kv / GB, 2),
            "kv_bf16_GB_per_4k": round(2 * kv / GB, 2)}


def decode_speed(name: str, dtype: torch.dtype, tokens: int) -> dict:
    config = model_config_from_hf(SHAPES[name], name)
    torch.manual_seed(0)
    model = GPT(config).to(dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 16))
    with torch.inference_mode():
        cache = model.new_cache(1, 16 + tokens)
        logits = model(prompt, cache=cache, last_only=True)
        start = time.perf_counter()
        for _ in range(tokens):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, last_only=True)
        seconds = time.perf_counter() - start
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "tokens_per_s": round(tokens / seconds, 2),
            "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def write_random_gguf(name: str, out: str, tokenizer_from: str, quant: str = "q4_0") -> None:
    """A random model of shape `name` with `tokenizer_from`'s tokenizer, written as a GGUF file of `quant`."""
    from pathlib import Path

    from ownllm.interop.writers.gguf import export_gguf
    from ownllm.runs import LoadedRun, load_run

    config = model_config_from_hf(SHAPES[name], name)
    tokenizer = load_run(tokenizer_from).tokenizer
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"{tokenizer_from}'s vocabulary ({tokenizer.vocab_size}) is larger than {name}'s")
    torch.manual_seed(0)
    model = GPT(config).eval()
    run = LoadedRun(path=Path(out), model=model, tokenizer=tokenizer, config=config, run_config={})
    export_gguf(run, out, quant, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", nargs="*", default=[], choices=list(SHAPES))
    parser.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", nargs=2, metavar=("SHAPE", "OUT"), help="write a random model of SHAPE to OUT")
    parser.add_argument("--tokenizer-from", help="with --gguf: a run or GGUF file whose tokenizer to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gguf:
        if args.gguf[0] not in SHAPES or not args.tokenizer_from:
            parser.error(f"--gguf takes one of {', '.join(SHAPES)} and needs --tokenizer-from")
        return write_random_gguf(args.gguf[0], args.gguf[1], args.tokenizer_from)
    if not args.decode:
        for name in SHAPES:
            print(json.dumps(memory_row(name)))
    for name in args.decode:  # one model per process keeps the peak memory its own: run one name at a time
        for dtype in args.dtype:
            print(json.dumps(decode_speed(name, getattr(torch, dtype), args.tokens)), flush=True)


if __name__ == "__main__":
    main()
