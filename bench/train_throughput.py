"""Training throughput and MFU of ownllm's GPT against a plain textbook GPT-2, fp32 and bf16, on this machine.

What it measures, all in one process:
  1. the matmul peak: torch.matmul of two 2048x2048 matrices, fp32 and bf16 (best and median of a few);
  2. for each preset (default `mini` and `gpt2`) and each precision (fp32, bf16 autocast), the time of one full
     training step (forward, loss, backward, grad clip 1.0, AdamW step, zero_grad) of
       - ownllm: `ownllm.model.GPT` with `ownllm.training.make_optimizer` / `lm_loss` / `device.autocast`, and
       - ref:    a minimal GPT-2 written below (nn.Linear / nn.LayerNorm / SDPA, torch.autocast bf16,
                 torch.optim.AdamW with its defaults), same shapes, same batch;
     the two are timed alternately (a few steps of one, then of the other, for several rounds) so that the
     machine's noise hits both alike. Reported: median step time, tokens/s, MFU against the measured matmul
     peak of the same precision, and the ownllm/ref speed ratio.

  3. with --compile, a third arm: the ownllm step with the model under torch.compile (compile time excluded);
     with --optimizer muon, the ownllm arms step Muon + AdamW (ownllm.optim) instead of AdamW;
  4. with --memory, for each preset and precision, the peak resident memory of N ownllm training steps in a fresh
     process, against weights + gradients + AdamW state (16 bytes per parameter) and against the process's memory
     before the model was built (torch itself).

Run (from the repository root; a gpt2 step takes seconds on a laptop CPU, so keep --steps/--rounds small):
    .venv/bin/python bench/train_throughput.py                       # mini and gpt2, fp32 and bf16
    .venv/bin/python bench/train_throughput.py --presets gpt2 --precisions bf16 --batch 4 --rounds 3
    .venv/bin/python bench/train_throughput.py --presets gpt2 --precisions bf16 --compile --memory
    .venv/bin/python bench/train_throughput.py --json results.json   # also write the figures as JSON

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig, model_config_from_preset, train_config_for
from ownllm.device import autocast
from ownllm.model import GPT, flops_per_token
from ownllm.training import lm_loss, make_optimizer, peak_memory_mb

DEFAULT_BATCH = {"mini": 16, "gpt2": 4}  # gpt2: the reference shape, 4 x 256


# ---------------------------------------------------------------------------------------------------------
# Matmul peak


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 7) -> tuple[float, float]:
    """(best, median) FLOP/s of a size x size matmul."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    flops = 2 * size**3
    return flops / min(times), flops / statistics.median(times)


# ---------------------------------------------------------------------------------------------------------
# The reference: a textbook GPT-2 (written for this benchmark)


class RefAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = RefAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(RefBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------------------------------------------------
# One training step of each


def ownllm_step(cfg: ModelConfig, preset: str, precision: str, x: torch.Tensor, y: torch.Tensor,
                compiled: bool = False, optimizer_name: str = "adamw") -> Callable[[], float]:
    model = GPT(cfg).train()
    optimizer = make_optimizer(model, train_config_for(preset, optimizer=optimizer_name), torch.device("cpu"))
    device = torch.device("cpu")
    forward = torch.compile(model) if compiled else model

    def step() -> float:
        with autocast(device, precision):
            loss = lm_loss(forward, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def ref_step(cfg: ModelConfig, precision: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    model = RefGPT(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_alternately(steps: dict[str, Callable[[], float]], rounds: int, per_round: int) -> dict[str, list[float]]:
    for step in steps.values():  # warm-up: first-call allocations, optimizer state
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                loss = step()
                times[name].append(time.perf_counter() - start)
                if not math.isfinite(loss):
                    raise RuntimeError(f"{name}: loss is {loss}")
    return times


def memory_child(preset: str, precision: str, batch: int, seq: int, steps: int, optimizer_name: str) -> None:
    """In a fresh process: peak RSS of `steps` ownllm training steps, printed as one JSON line."""
    before = peak_memory_mb(torch.device("cpu"))
    cfg = model_config_from_preset(preset, block_size=seq)
    with torch.device("meta"):  # counted without allocating
        params = sum(p.numel() for p in GPT(cfg).parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    step = ownllm_step(cfg, preset, precision, x, y, optimizer_name=optimizer_name)
    for _ in range(steps):
        step()
    peak = peak_memory_mb(torch.device("cpu"))
    state_mb = 16 * params / 2**20  # fp32 weights + grads + two AdamW moments
    print(json.dumps({"preset": preset, "precision": precision, "batch": batch, "seq": seq, "params": params,
                      "peak_rss_mb": round(peak), "before_model_mb": round(before), "state_mb": round(state_mb),
                      "peak_over_state": round(peak / state_mb, 2),
                      "training_over_state": round((peak - before) / state_mb, 2)}))


def measure_memory(preset: str, precision: str, batch: int, seq: int, steps: int, optimizer_name: str) -> dict:
    child = subprocess.run([sys.executable, __file__, "--memory-child", preset, precision, str(batch), str(seq),
                            str(steps), optimizer_name], capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["mini", "gpt2"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: mini 16, gpt2 4)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of ownllm and ref")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: 2 for gpt2, else 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--compile", action="store_true", help="also time the ownllm step under torch.compile")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="the ownllm arms' optimizer")
    parser.add_argument("--memory", action="store_true", help="peak memory of training, in a fresh process each")
    parser.add_argument("--memory-child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        preset, precision, batch, seq, steps, optimizer_name = args.memory_child
        memory_child(preset, precision, int(batch), int(seq), int(steps), optimizer_name)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")

    peaks = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best, median = matmul_rate(dtype)
        peaks[precision] = best
        print(f"matmul 2048^2 {precision}: best {best / 1e9:.0f} GFLOP/s, median {median / 1e9:.0f} GFLOP/s")

    results = {"peaks_flops": peaks, "threads": torch.get_num_threads(), "runs": []}
    for preset in args.presets:
        cfg = model_config_from_preset(preset, block_size=max(args.seq, 1))
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        per_round = args.steps or (2 if cfg.n_embd >= 768 else 5)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, args.seq), generator=gen)
        y = torch.randint(0, cfg.vocab_size, (batch, args.seq), generator=gen)
        fpt = flops_per_token(GPT(cfg), seq_len=args.seq)
        for precision in args.precisions:
            torch.manual_seed(0)
            steps = {"ownllm": ownllm_step(cfg, preset, precision, x, y, optimizer_name=args.optimizer),
                     "ref": ref_step(cfg, precision, x, y)}
            if args.compile:
                steps["ownllm+compile"] = ownllm_step(cfg, preset, precision, x, y, compiled=True,
                                                      optimizer_name=args.optimizer)
            times = time_alternately(steps, args.rounds, per_round)
            row = {"preset": preset, "precision": precision, "batch": batch, "seq": args.seq}
            for name, ts in times.items():
                median = statistics.median(ts)
                tok_s = batch * args.seq / median
                row[name] = {"median_s": median, "min_s": min(ts), "tokens_per_sec": tok_s,
                             "mfu": tok_s * fpt / peaks[precision], "steps": len(ts)}
            row["ratio"] = row["ref"]["median_s"] / row["ownllm"]["median_s"]
            results["runs"].append(row)
            print(f"{preset:5s} {precision} {batch}x{args.seq}: " + "  ".join(
                f"{name} {row[name]['median_s'] * 1e3:8.1f} ms/step {row[name]['tokens_per_sec']:8.0f} tok/s "
                f"MFU {100 * row[name]['mfu']:4.1f}%" for name in times) + f"  ownllm/ref {row['ratio']:.2f}x",
                flush=True)
            if args.compile:
                row["compile_ratio"] = row["ref"]["median_s"] / row["ownllm+compile"]["median_s"]
                print(f"      ownllm+compile/ref {row['compile_ratio']:.2f}x", flush=True)
            if args.memory:
                row["memory"] = measure_memory(preset, precision, batch, args.seq, 3, args.optimizer)
                m = row["memory"]
                print(f"      peak memory {m['peak_rss_mb']:,} MiB = {m['peak_over_state']}x weights+grads+AdamW "
                      f"({m['state_mb']:,} MiB); {m['training_over_state']}x without the {m['before_model_mb']:,} "
                      f"MiB the process held before the model", flush=True)
            del steps
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
