"""`--precision auto` and `--compile auto`, decided by measuring training steps on the machine in front of us.

    choice = decide_speed(model_config, train_config, device)   # every stage, once per run (ownllm.training)
    choice.precision, choice.compile, choice.reason      # "bf16", False, "precision bf16 (auto: ...)"

`decide_speed` is the one decision for every stage: a resumed run keeps the choice it recorded (when asked the same);
under torchrun every process must agree, so none measures alone: the rule of `ownllm.device.pick_precision` (bf16
where the hardware is known to gain), compiled only when asked; else `choose_speed` measures.

The probe builds a throw-away model of the run's shape, times a few full training steps (forward, loss, backward,
optimizer step) on random tokens in fp32 and, where the hardware has native bf16, in bf16 autocast, and keeps the
faster (bf16 only when at least `BF16_MARGIN` faster: a tie goes to fp32, which is exact). Compilation is probed
only when the run's planned eager time is longer than `COMPILE_MIN_RUN_S`: `torch.compile` costs 10-40 s on a CPU
before the first step (docs/benchmarks.md), which a shorter run cannot win back. It is then timed, compile time
included, and kept when the whole run gets shorter.

Decisions are cached per machine (CPU model, thread count, torch version) and shape (model config, batch, optimizer)
in `$OWNLLM_CACHE_DIR/speed_probe.json` (default `~/.cache/ownllm/`), so the same command makes the same choice and
pays for the probe once (a later, longer run adds the compiled measurement); delete the file to measure again. Nothing here touches the global RNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ownllm import distributed
from ownllm.config import ModelConfig, SpeedChoice, TrainConfig
from ownllm.device import autocast, cpu_has_amx_bf16, cpu_has_native_bf16, pick_precision

BF16_MARGIN = 0.10  # bf16 must be this much faster than fp32 to be chosen
COMPILE_MIN_RUN_S = 120.0  # below this planned eager training time, compilation is not even probed
STEP_BUDGET_S = 0.6  # time per probed arm, after warm-up (at least MIN_STEPS steps)
MIN_STEPS, MAX_STEPS = 2, 15
CACHE_FILE = "speed_probe.json"


def cache_path() -> Path:
    root = os.environ.get("OWNLLM_CACHE_DIR") or Path.home() / ".cache" / "ownllm"
    return Path(root) / CACHE_FILE


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "amx": cpu_has_amx_bf16(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def _key(model_config: ModelConfig, train_config: TrainConfig, device: torch.device, arms: list[str],
         seq_len: int | None = None) -> str:
    what = {"machine": _machine(), "device": str(device), "model": model_config.to_dict(), "arms": arms,
            "batch": train_config.batch_size, "optimizer": train_config.optimizer}
    if seq_len is not None and seq_len < model_config.block_size:
        what["seq_len"] = seq_len
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, step_ms: dict[str, float]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = step_ms
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the probe runs again next time


def _timed_shape(model_config: ModelConfig, train_config: TrainConfig, seq_len: int | None) -> tuple[int, int]:
    """The batch the probe times: the run's batch size x `seq_len` tokens (default and at most the context)."""
    return train_config.batch_size, min(seq_len or model_config.block_size, model_config.block_size)


def _time_steps(model_config: ModelConfig, train_config: TrainConfig, device: torch.device, precision: str,
                compiled: bool, seq_len: int | None = None) -> tuple[float, float]:
    """(median step seconds, seconds spent before the timed steps: build, warm-up and compilation) of batches of
    `seq_len` tokens (default: the context window)."""
    from ownllm.model import GPT
    from ownllm.optim import make_optimizer

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(model_config).to(device).train()
        optimizer = make_optimizer(model, train_config, device)
        forward = torch.compile(model) if compiled else model
        shape = _timed_shape(model_config, train_config, seq_len)
        x = torch.randint(0, model_config.vocab_size, shape, device=device)
        y = torch.randint(0, model_config.vocab_size, shape, device=device)

        def step() -> None:
            with autocast(device, precision):
                logits = forward(x)
            F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(2 if compiled else 1):
            step()
        setup = time.perf_counter() - start
        times: list[float] = []
        while len(times) < MIN_STEPS or (sum(times) < STEP_BUDGET_S and len(times) < MAX_STEPS):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), setup


def _precision_arms(requested: str, device: torch.device) -> list[str]:
    if requested != "auto":
        return [requested]
    if device.type == "cuda":
        return ["bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    return ["fp32", "bf16"] if device.type == "cpu" and cpu_has_native_bf16() else ["fp32"]


def _measure(model_config: ModelConfig, train_config: TrainConfig, device: torch.device, arms: list[str],
             step_ms: dict[str, float], steps: int, seq_len: int | None = None) -> dict[str, float]:
    """Step times (ms) of each precision arm not in `step_ms` yet; with compile "auto" and a run long enough, of
    the better precision compiled (plus the setup time before its first timed step, "compile_setup")."""
    step_ms = dict(step_ms)
    for precision in arms:
        if precision not in step_ms:
            step_ms[precision] = 1000 * _time_steps(model_config, train_config, device, precision, False, seq_len)[0]
    best = _pick_precision(step_ms)
    planned = _run_steps(steps, step_ms[best], train_config.max_minutes)
    long_enough = planned * step_ms[best] / 1000 > COMPILE_MIN_RUN_S
    if train_config.compile == "auto" and long_enough and f"{best}+compile" not in step_ms:
        compiled_s, setup_s = _time_steps(model_config, train_config, device, best, True, seq_len)
        step_ms[f"{best}+compile"] = 1000 * compiled_s
        step_ms["compile_setup"] = 1000 * setup_s
    return step_ms


def _run_steps(steps: int, step_ms: float, max_minutes: float | None) -> int:
    """Steps the run will make: its planned steps, or fewer when --max-minutes ends it first."""
    if max_minutes:
        return max(1, min(steps, int(60_000 * max_minutes / step_ms)))
    return steps


def _pick_precision(step_ms: dict[str, float]) -> str:
    if "bf16" in step_ms and ("fp32" not in step_ms or step_ms["bf16"] < (1 - BF16_MARGIN) * step_ms["fp32"]):
        return "bf16"
    return "fp32"


def _compile_pays(step_ms: dict[str, float], precision: str, planned_steps: int) -> bool:
    compiled = step_ms.get(f"{precision}+compile")
    if compiled is None:
        return False
    return step_ms["compile_setup"] / 1000 + planned_steps * compiled / 1000 < planned_steps * step_ms[precision] / 1000


def _reason(step_ms: dict[str, float], precision: str, compiled: bool, requested: tuple[str, bool | str],
            cached: bool, planned_steps: int, shape: tuple[int, int]) -> str:
    shown = ", ".join(f"{k} {v:.0f}" if k == "compile_setup" else f"{k} {v:.1f}" for k, v in step_ms.items())
    amx = "AMX" if cpu_has_amx_bf16() else ("bf16 without AMX" if cpu_has_native_bf16() else "no native bf16")
    precision_why = "auto" if requested[0] == "auto" else "asked for"
    if requested[1] == "auto":
        if compiled:
            compile_why = "auto: pays back its setup time over the run"
        elif "compile_setup" in step_ms:
            compile_why = "auto: does not pay back its setup time over the run"
        else:
            compile_why = f"auto: planned run under {COMPILE_MIN_RUN_S:.0f} s eager, too short to win back compilation"
    else:
        compile_why = "asked for"
    source = "cached measurement" if cached else "measured now"
    return (f"precision {precision} ({precision_why}), compile {'on' if compiled else 'off'} ({compile_why}); "
            f"ms/step: {shown} ({source}, {amx}, {torch.get_num_threads()} threads, {planned_steps} planned steps, "
            f"batches of {shape[0]} x {shape[1]} tokens)")


def choose_speed(model_config: ModelConfig, train_config: TrainConfig, device: torch.device,
                 planned_steps: int, seq_len: int | None = None) -> SpeedChoice:
    """Resolve `train_config.precision` and `.compile` ("auto" or fixed) for a run of `planned_steps` steps whose
    batches hold sequences of up to `seq_len` tokens (default: the context window; a fine-tuning's longest record:
    timing SmolLM2's 8,192-token window at batch 8 would need ~13 GB of logits alone)."""
    requested = (train_config.precision, train_config.compile)
    arms = _precision_arms(train_config.precision, device)
    if len(arms) == 1 and train_config.compile != "auto":
        compiled = train_config.compile is True
        why = "auto: the only one this device has" if train_config.precision == "auto" else "asked for"
        return SpeedChoice(arms[0], compiled, f"precision {arms[0]} ({why}), compile {'on' if compiled else 'off'}")
    key = _key(model_config, train_config, device, arms, seq_len)
    cached = _read_cache().get(key)
    cached = cached if isinstance(cached, dict) else {}
    step_ms = _measure(model_config, train_config, device, arms, cached, planned_steps, seq_len)
    if step_ms != cached:
        _write_cache(key, step_ms)
    precision = _pick_precision(step_ms)
    steps = _run_steps(planned_steps, step_ms[precision], train_config.max_minutes)
    compiled = _compile_pays(step_ms, precision, steps) if train_config.compile == "auto" else (
        train_config.compile is True)
    shape = _timed_shape(model_config, train_config, seq_len)
    reason = _reason(step_ms, precision, compiled, requested, step_ms == cached, steps, shape)
    return SpeedChoice(precision, compiled, reason, {k: round(v, 2) for k, v in step_ms.items()})


def decide_speed(model_config: ModelConfig, train_config: TrainConfig, device: torch.device, start_step: int = 0,
                 recorded: SpeedChoice | None = None, seq_len: int | None = None) -> SpeedChoice:
    """Precision and compilation for a run of any stage, from step `start_step`: `recorded` (the run's own choice)
    when asked the same, so a resumed run stays bit-exact; under torchrun the rule of `pick_precision`, compiled
    only when asked; else measured (`choose_speed`). The choice records what was asked."""
    asked = {"precision": train_config.precision, "compile": train_config.compile}
    if recorded is not None and recorded.asked == asked:
        return recorded
    if distributed.world_size() > 1:
        precision = pick_precision(train_config.precision, device, n_embd=model_config.n_embd)
        compiled = train_config.compile is True
        choice = SpeedChoice(precision, compiled, f"precision {precision} (rule of ownllm.device.pick_precision "
                             f"under torchrun), compile {'on' if compiled else 'off'}")
    else:
        choice = choose_speed(model_config, train_config, device, planned_steps(train_config, start_step), seq_len)
    choice.asked = asked
    return choice


def planned_steps(train_config: TrainConfig, start_step: int = 0) -> int:
    """Steps this invocation will run at most (the schedule's end, or --stop-at)."""
    last = min(train_config.max_steps, train_config.stop_at) if train_config.stop_at else train_config.max_steps
    return max(1, last - start_step)
