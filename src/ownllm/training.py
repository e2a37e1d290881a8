"""The one training loop, shared by pretraining and both fine-tunings.

A stage hands `train()` a `TrainJob`: a model, a `TrainConfig`, a function that gives the micro-batch for a global
micro-step, a loss function and (optionally) evaluation batches; the loop brings the rest: AdamW without weight decay on
norms/biases/embeddings, linear warmup then cosine decay, gradient accumulation and clipping, bf16 autocast,
optional torch.compile, periodic evaluation, a progress bar with loss, tokens/s, MFU and ETA, `metrics.jsonl`,
`loss.png`, atomic checkpoints and an exact resume (batches are a pure function of the step, and the optimizer,
RNG and step are restored from the checkpoint).

Ctrl-C once: the current step finishes, a checkpoint is written and the run stops; resume with `--resume`.

Launched by torchrun, the same loop trains on several processes (ownllm.distributed, docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ownllm import checkpoint, distributed
from ownllm.checkpoint import RunConfig
from ownllm.config import SpeedChoice, TrainConfig
from ownllm.device import autocast, matmul_peak_flops
from ownllm.errors import OwnLLMError
from ownllm.optim import make_optimizer
from ownllm.probe import decide_speed

Batch = Sequence[Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Next-token cross-entropy of a (inputs, targets) batch; targets equal to -100 are ignored."""
    inputs, targets = batch[0], batch[1]
    logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to `final_lr`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return config.final_lr
    span = max(1, config.max_steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / span
    return config.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.final_lr)


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    train_loss: float | None
    val_loss: float | None
    stopped_early: bool  # by --stop-at, --max-minutes or Ctrl-C, before max_steps
    tokens_per_sec: float
    peak_memory_mb: float = 0.0  # the process's peak resident memory (CPU) or peak allocated memory (CUDA)
    interrupted: bool = False  # stopped by Ctrl-C


class _GracefulStop:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_GracefulStop":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainJob:
    """The settings of one training job: everything a stage hands to `train` (the loop itself is `train`).
    `micro_batch(i)` must be a pure function of the micro-step index `i`."""

    model: nn.Module
    config: TrainConfig
    run_dir: Path
    micro_batch: Callable[[int], Batch]
    loss_fn: LossFn = lm_loss
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    flops_per_token: float = 0.0
    run_info: dict[str, Any] | None = None  # extra fields stored in each checkpoint's state.json
    on_checkpoint: Callable[[Path], None] | None = None
    tokens_in: Callable[[Batch], int] | None = None  # real tokens of a batch (default: every position of batch[0])
    save_trainable_only: bool = False  # checkpoint only parameters that train (LoRA adapters, a head)
    # what the loss of a batch averages over (default: rows; lm_loss with -100 targets: the counted targets), so that
    # a batch split over processes gives exactly the full batch's mean (see ownllm.distributed.shard)
    loss_weight: Callable[[Batch], float] = distributed.weight_by_rows
    compile_model: bool | None = None  # the resolved --compile (None: config.compile is True)
    # scores benchmarks with the (unwrapped) model at each evaluation, on rank 0: {task: {"acc": .., ...}}
    benchmarks: Callable[[nn.Module], dict[str, Any]] | None = None
    # metrics measured at each evaluation besides (or instead of) the val loss of eval_batches, e.g. a preference
    # accuracy; every process calls it, rank 0 adds the returned fields to the metrics row ("val_loss" counts as one)
    eval_metrics: Callable[[nn.Module], dict[str, float]] | None = None
    # time.monotonic() by which training stops (a stage's whole command under --max-minutes); None: max_minutes
    # from the start of `train`
    deadline: float | None = None


def deadline_of(max_minutes: float | None) -> float | None:
    """The time.monotonic() by which a command given --max-minutes must end (None without it)."""
    return time.monotonic() + 60 * max_minutes if max_minutes else None


def counted_targets(batch: Batch) -> float:
    """The weight of an lm_loss batch: targets that are not -100."""
    return float((batch[1] != -100).sum())


def evaluate_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn, device: torch.device,
                  precision: str, split_by: Callable[[Batch], float] | None = None) -> float:
    """Mean loss over `batches` with the model in eval mode and no gradients, in this process alone; or, given
    `split_by` (a `TrainJob.loss_weight`), together: every process evaluates its rows of each batch."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, precision):
        for batch in batches:
            part, scale = distributed.shard(batch, split_by) if split_by else (batch, 1.0)
            loss = loss_fn(model, [t.to(device) for t in part])  # every process runs a pass (FSDP needs them all)
            total += scale * loss.item() if scale else 0.0
            count += 1
    model.train(was_training)
    if split_by:
        total = distributed.all_reduce_sum([total], device)[0] / distributed.world_size()
    return total / max(count, 1)


def _tokens_in(batch: Batch) -> int:
    return batch[0].numel()


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row.get("step", 0) <= up_to_step]


def _rewrite_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def _plot_benchmarks(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Benchmark accuracy (acc_norm where the task has it) against step, on a second y axis."""
    tasks = sorted({task for r in rows for task in r.get("benchmarks", {})})
    if not tasks:
        return
    right = ax.twinx()
    for task in tasks:
        points = [(r["step"], r["benchmarks"][task]) for r in rows if task in r.get("benchmarks", {})]
        values = [(step, m["acc_norm"] if m.get("acc_norm") is not None else m["acc"]) for step, m in points]
        right.plot(*zip(*values), linestyle="--", marker="s", label=task)
    right.set_ylabel("benchmark accuracy")
    right.legend(loc="upper right")


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """Train and val loss against step, as a PNG; other val_* metrics (e.g. accuracy) in a panel beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = sorted({k for r in rows for k, v in r.items() if k.startswith("val_") and k != "val_loss"
                    and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(12 if extra else 7, 4), squeeze=False)
    ax = axes[0][0]
    if extra:
        for name in extra:
            axes[0][1].plot(*zip(*[(r["step"], r[name]) for r in rows if name in r]), marker="o", label=name[4:])
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("validation")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend()
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    _plot_benchmarks(ax, rows)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ---- the loop -----------------------------------------------------------------------------------------------------

@dataclass
class _Progress:
    """What changes while a job trains, kept together: the wrapped model, its optimizer, the step, the losses and
    the metric rows logged so far. Built by `_start`, advanced by `train`, written by `_save`."""

    net: nn.Module  # the model as it trains (wrapped for DDP/FSDP)
    optimizer: torch.optim.Optimizer
    strategy: str
    device: torch.device
    main: bool
    step: int
    rows: list[dict[str, Any]]
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_sec: float = 0.0
    window_tokens: int = 0
    window_start: float = 0.0


def train(job: TrainJob, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Run (or resume) the job until max_steps, --stop-at, --max-minutes or Ctrl-C; checkpoint at the end.

    Under torchrun every process calls this with the same job: each trains on its rows of every global batch
    (DDP or FSDP, `cfg.strategy`); rank 0 alone shows progress, logs and writes the checkpoints. After it returns,
    `job.model` holds the final weights on rank 0 (and, under DDP, on every process).
    """
    cfg = job.config
    run = _start(job, resume)
    use_compile = job.compile_model if job.compile_model is not None else cfg.compile is True
    forward_model = torch.compile(run.net) if use_compile else run.net
    last_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    deadline = job.deadline if job.deadline is not None else deadline_of(cfg.max_minutes)
    stopped_early = False
    bar = tqdm(total=last_step, initial=run.step, disable=not (show_progress and run.main), unit="step",
               dynamic_ncols=True, desc=Path(job.run_dir).name)
    metrics_file = open(Path(job.run_dir) / METRICS_FILE, "a", encoding="utf-8") if run.main \
        else contextlib.nullcontext()
    run.window_start = time.perf_counter()
    with distributed.lost_peers_as_error(), _GracefulStop() as stop, metrics_file as metrics:
        while run.step < last_step:
            lr = lr_at(run.step, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups keep their own peak lr
            step_loss = _accumulate_gradients(job, run, forward_model)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.net.parameters(), cfg.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            out_of_time = deadline is not None and time.monotonic() > deadline
            # one collective per step: the loss of the whole batch, and a stop that every process agrees on
            loss_sum, stops = distributed.all_reduce_sum([step_loss, float(stop.requested or out_of_time)],
                                                         run.device)
            run.train_loss = loss_sum / distributed.world_size()
            bar.update(1)
            evaluates = job.eval_batches is not None or job.eval_metrics is not None or job.benchmarks is not None
            evaluate_now = evaluates and cfg.eval_interval and (
                run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps or out_of_time)  # timed runs end evaluated
            if run.step % cfg.log_interval == 0 or evaluate_now or run.step == last_step:
                _log_step(job, run, forward_model, lr, evaluate_now, metrics, bar)
            if stops > 0:
                stopped_early = run.step < cfg.max_steps
                break
            if run.step < last_step and (evaluate_now or (cfg.checkpoint_interval
                                                          and run.step % cfg.checkpoint_interval == 0)):
                _save(job, run)
        bar.close()
        _save(job, run)
    if run.strategy == "fsdp" and run.main:
        job.model.to(run.device)  # the full copy, for what the stage does after training (on rank 0)
    distributed.barrier()  # the checkpoint is on disk before any process moves on
    return TrainResult(step=run.step, train_loss=run.train_loss, val_loss=run.val_loss,
                       stopped_early=stopped_early or run.step < cfg.max_steps, tokens_per_sec=run.tokens_per_sec,
                       peak_memory_mb=peak_memory_mb(run.device), interrupted=stop.requested)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: resident set size on a CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM starts afresh at exec; ru_maxrss keeps the peak of the process that forked this one
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _start(job: TrainJob, resume: bool) -> _Progress:
    """Join the processes, restore the last checkpoint (resume), wrap the model, build the optimizer, and trim
    metrics.jsonl to the step we start from."""
    cfg, model = job.config, job.model
    strategy = distributed.resolve_strategy(cfg.strategy)
    device = distributed.init(job.device)
    main = distributed.is_main()
    if strategy != "none":
        distributed.check_batch_size(cfg.batch_size)
    run_dir = Path(job.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    start_step, state = 0, None
    if resume:  # into the plain model, before wrapping: every process reads the same full checkpoint
        state, info = checkpoint.load_checkpoint(run_dir, model, strict=not job.save_trainable_only)
        start_step = int(info["step"])
    if cfg.optimizer == "muon" and strategy == "fsdp":
        raise OwnLLMError("--optimizer muon needs whole weight matrices: use --strategy ddp, not fsdp")
    net = distributed.wrap(model, strategy, device)
    net.train()
    optimizer = make_optimizer(net, cfg, device)
    if state is not None:
        distributed.load_optimizer_state(optimizer, net, strategy, state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
    distributed.seed_for_rank(cfg.seed, start_step)
    metrics_path = run_dir / METRICS_FILE
    rows = _read_metrics(metrics_path, start_step) if resume and main else []
    if main:
        _rewrite_metrics(metrics_path, rows)  # drop rows logged after the checkpoint we resume from
    return _Progress(net=net, optimizer=optimizer, strategy=strategy, device=device, main=main, step=start_step,
                     rows=rows)


def _accumulate_gradients(job: TrainJob, run: _Progress, forward_model: nn.Module) -> float:
    """Forward and backward over the micro-batches of one optimizer step; this process's share of its loss."""
    cfg, step_loss = job.config, 0.0
    for micro in range(cfg.grad_accum):
        full = job.micro_batch(run.step * cfg.grad_accum + micro)
        part, scale = distributed.shard(full, job.loss_weight)
        batch = [t.to(run.device, non_blocking=True) for t in part]
        with distributed.gradient_sync(run.net, run.strategy, sync=micro == cfg.grad_accum - 1):
            with autocast(run.device, job.precision):
                loss = job.loss_fn(forward_model, batch) * scale / cfg.grad_accum
            loss.backward()
        step_loss += loss.item()
        run.window_tokens += (job.tokens_in or _tokens_in)(full)
    return step_loss


def _log_step(job: TrainJob, run: _Progress, forward_model: nn.Module, lr: float, evaluate_now: bool,
              metrics: Any, bar: tqdm) -> None:
    """Throughput since the last row, a validation loss when due, a metrics.jsonl row and the progress bar."""
    elapsed = time.perf_counter() - run.window_start
    run.tokens_per_sec = run.window_tokens / elapsed if elapsed > 0 else 0.0
    run.window_tokens, run.window_start = 0, time.perf_counter()
    row: dict[str, Any] = {"step": run.step, "train_loss": run.train_loss, "lr": lr,
                           "tokens_per_sec": round(run.tokens_per_sec, 1)}
    if evaluate_now:
        if job.eval_batches is not None:
            row["val_loss"] = evaluate_loss(forward_model, job.eval_batches(), job.loss_fn, run.device, job.precision,
                                            split_by=job.loss_weight)
        if job.eval_metrics is not None:
            row.update(job.eval_metrics(forward_model))
        run.val_loss = row.get("val_loss", run.val_loss)
        row["time"] = round(time.time(), 2)  # wall clock of the evaluation (time-to-loss benchmarks)
        if job.benchmarks is not None and run.main and run.strategy != "fsdp":
            row["benchmarks"] = job.benchmarks(job.model)  # FSDP shards the weights: not scored there
        run.window_start = time.perf_counter()  # evaluation time is not training throughput
    if run.main:
        run.rows.append(row)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    peak = distributed.world_size() * matmul_peak_flops(run.device.type, job.precision) \
        if job.flops_per_token and run.main else 0.0
    postfix = {"loss": f"{run.train_loss:.3f}", "tok/s": f"{run.tokens_per_sec:,.0f}"}
    mfu = run.tokens_per_sec * job.flops_per_token / peak if peak else 0.0
    if 0 < mfu <= 1:  # above 1 the peak was measured on a busy machine: no figure rather than a wrong one
        postfix["mfu"] = f"{100 * mfu:.0f}%"
    if run.val_loss is not None:
        postfix["val"] = f"{run.val_loss:.3f}"
    bar.set_postfix(postfix, refresh=False)


def _save(job: TrainJob, run: _Progress) -> None:
    """Checkpoint the job. Every process calls it (FSDP gathers the full state); rank 0 writes."""
    model = job.model
    distributed.gather_full_model(run.net, model, run.strategy)
    optimizer_state = distributed.full_optimizer_state(run.optimizer, run.net, run.strategy)
    if not run.main:
        return
    trainer_state = {"optimizer": optimizer_state, "rng_cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
    info = {"step": run.step, "max_steps": job.config.max_steps, "train_loss": run.train_loss,
            "val_loss": run.val_loss, "world_size": distributed.world_size(), "strategy": run.strategy,
            **(job.run_info or {})}
    weights = None
    if job.save_trainable_only:
        weights = {name.replace(checkpoint.COMPILED_PREFIX, ""): p.detach().contiguous()
                   for name, p in model.named_parameters() if p.requires_grad}
    run_dir = Path(job.run_dir)
    checkpoint.save_checkpoint(run_dir, model, trainer_state, info, weights=weights)
    plot_losses(run.rows, run_dir / PLOT_FILE)
    if job.on_checkpoint:
        job.on_checkpoint(run_dir)


# ---- a training run's directory and config (shared by pretraining and every fine-tuning stage) ---------------------

PER_INVOCATION = ("stop_at", "max_minutes")  # limits of one invocation, not of the run: not kept on resume


def resumed_train_config(stored: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The stored train settings of a run to resume, with the ones given now (not None) replacing them."""
    values = {k: v for k, v in stored.to_dict().items() if k not in PER_INVOCATION}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def record_run(run_dir: Path, config: RunConfig, stored: RunConfig | None, device: torch.device,
               seq_len: int | None = None) -> SpeedChoice:
    """Decide the run's precision and compilation (`ownllm.probe.decide_speed`, the one decision of every stage: on a
    resume the recorded one when asked the same) and write RUN/config.json once, on rank 0, for a new run or one
    whose settings changed; say what was decided."""
    start = 0
    state = checkpoint.checkpoint_dir(run_dir) if stored is not None else None
    if state is not None:
        start = int(checkpoint.read_json(state / checkpoint.STATE_FILE).get("step", 0))
    config.speed = decide_speed(config.model, config.train, device, start, stored.speed if stored else None, seq_len)
    if distributed.is_main() and (stored is None or config.to_dict() != stored.to_dict()):
        config.write(run_dir)
    if config.options.show_progress and distributed.is_main():
        kept = stored is not None and config.speed == stored.speed
        print(f"speed: {config.speed.reason}{' (as recorded in the run)' if kept else ''}", flush=True)
    return config.speed


def start_run_dir(out: str | Path, force: bool = False, inputs: Any = ()) -> tuple[Path, bool]:
    """The new run's directory and whether it was created here (`ownllm.outputs.start_run_dir`: a run with a
    checkpoint is kept unless `force`, one without is started over). Under torchrun, rank 0 alone does this."""
    from ownllm.outputs import start_run_dir as prepare_run_dir

    run_dir = Path(out)
    if not distributed.is_main():
        return run_dir, False
    return run_dir, prepare_run_dir(run_dir, force=force, inputs=inputs)


def discard_run_dir(run_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
