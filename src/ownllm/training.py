"""The one training loop, shared by pretraining and both fine-tunings.

A stage hands `train()` a model, a `TrainConfig`, a function that gives the micro-batch for a global micro-step,
a loss function and (optionally) evaluation batches; the loop brings the rest: AdamW without weight decay on
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
from ownllm.config import TrainConfig
from ownllm.device import autocast, matmul_peak_flops

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


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings); fused where torch has it."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type in ("cuda", "cpu"))


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    train_loss: float | None
    val_loss: float | None
    stopped_early: bool  # by --stop-at, --max-minutes or Ctrl-C, before max_steps
    tokens_per_sec: float


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
class TrainLoop:
    """Everything a stage hands to `train`. `micro_batch(i)` must be a pure function of the micro-step index `i`."""

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
    loss_weight: Callable[[Batch], float] = distributed.rows


def counted_targets(batch: Batch) -> float:
    """The weight of an lm_loss batch: targets that are not -100."""
    return float((batch[1] != -100).sum())


def evaluate_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn, device: torch.device,
                  precision: str, split_by: Callable[[Batch], float] | None = None) -> float:
    """Mean loss over `batches` with the model in eval mode and no gradients, in this process alone; or, given
    `split_by` (a `TrainLoop.loss_weight`), together: every process evaluates its rows of each batch."""
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


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """Train and val loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def train(loop: TrainLoop, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Run (or resume) the loop until max_steps, --stop-at, --max-minutes or Ctrl-C; checkpoint at the end.

    Under torchrun every process calls this with the same loop: each trains on its rows of every global batch
    (DDP or FSDP, `cfg.strategy`); rank 0 alone shows progress, logs and writes the checkpoints. After it returns,
    `loop.model` holds the final weights on rank 0 (and, under DDP, on every process).
    """
    cfg, model = loop.config, loop.model
    strategy = distributed.resolve_strategy(cfg.strategy)
    device = distributed.init(loop.device)
    main = distributed.is_main()
    if strategy != "none":
        distributed.check_batch_size(cfg.batch_size)
    run_dir = Path(loop.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    start_step, state = 0, None
    if resume:  # into the plain model, before wrapping: every process reads the same full checkpoint
        state, info = checkpoint.load_checkpoint(run_dir, model, strict=not loop.save_trainable_only)
        start_step = int(info["step"])
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

    forward_model = torch.compile(net) if cfg.compile else net
    world = distributed.world_size()
    peak = world * matmul_peak_flops(device.type, loop.precision) if loop.flops_per_token and main else 0.0
    last_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
    train_loss = val_loss = None
    tokens_per_sec = 0.0
    step = start_step
    stopped_early = False

    def save() -> None:  # every process calls it (FSDP gathers the full state); rank 0 writes
        distributed.gather_full_model(net, model, strategy)
        optimizer_state = distributed.full_optimizer_state(optimizer, net, strategy)
        if not main:
            return
        trainer_state = {"optimizer": optimizer_state, "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            trainer_state["rng_cuda"] = torch.cuda.get_rng_state()
        info = {"step": step, "max_steps": cfg.max_steps, "train_loss": train_loss, "val_loss": val_loss,
                "world_size": world, "strategy": strategy, **(loop.run_info or {})}
        weights = None
        if loop.save_trainable_only:
            weights = {name.replace(checkpoint.COMPILED_PREFIX, ""): p.detach().contiguous()
                       for name, p in model.named_parameters() if p.requires_grad}
        checkpoint.save_checkpoint(run_dir, model, trainer_state, info, weights=weights)
        plot_losses(rows, run_dir / PLOT_FILE)
        if loop.on_checkpoint:
            loop.on_checkpoint(run_dir)

    bar = tqdm(total=last_step, initial=start_step, disable=not (show_progress and main), unit="step",
               dynamic_ncols=True, desc=run_dir.name)
    window_tokens, window_start = 0, time.perf_counter()
    metrics_file = open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext()
    with distributed.lost_peers_as_error(), _GracefulStop() as stop, metrics_file as metrics:
        while step < last_step:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                full = loop.micro_batch(step * cfg.grad_accum + micro)
                part, scale = distributed.shard(full, loop.loss_weight)
                batch = [t.to(device, non_blocking=True) for t in part]
                with distributed.gradient_sync(net, strategy, sync=micro == cfg.grad_accum - 1):
                    with autocast(device, loop.precision):
                        loss = loop.loss_fn(forward_model, batch) * scale / cfg.grad_accum
                    loss.backward()
                step_loss += loss.item()
                window_tokens += (loop.tokens_in or _tokens_in)(full)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            out_of_time = deadline is not None and time.monotonic() > deadline
            # one collective per step: the loss of the whole batch, and a stop that every process agrees on
            loss_sum, stops = distributed.all_reduce_sum([step_loss, float(stop.requested or out_of_time)], device)
            train_loss = loss_sum / world
            bar.update(1)

            evaluate_now = loop.eval_batches is not None and cfg.eval_interval and (
                step % cfg.eval_interval == 0 or step == cfg.max_steps)
            if step % cfg.log_interval == 0 or evaluate_now or step == last_step:
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_tokens / elapsed if elapsed > 0 else 0.0
                window_tokens, window_start = 0, time.perf_counter()
                row: dict[str, Any] = {"step": step, "train_loss": train_loss, "lr": lr,
                                       "tokens_per_sec": round(tokens_per_sec, 1)}
                if evaluate_now:
                    val_loss = evaluate_loss(forward_model, loop.eval_batches(), loop.loss_fn, device, loop.precision,
                                             split_by=loop.loss_weight)
                    row["val_loss"] = val_loss
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if main:
                    rows.append(row)
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                mfu = tokens_per_sec * loop.flops_per_token / peak if peak else 0.0
                postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tokens_per_sec:,.0f}"}
                if peak:
                    postfix["mfu"] = f"{100 * mfu:.0f}%"
                if val_loss is not None:
                    postfix["val"] = f"{val_loss:.3f}"
                bar.set_postfix(postfix, refresh=False)

            if stops > 0:
                stopped_early = step < cfg.max_steps
                break
            if step < last_step and (evaluate_now or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)):
                save()
        bar.close()
        save()
    if strategy == "fsdp" and main:
        model.to(device)  # the full copy, for what the stage does after training (on rank 0)
    distributed.barrier()  # the checkpoint is on disk before any process moves on
    stopped_early = stopped_early or step < cfg.max_steps
    return TrainResult(step=step, train_loss=train_loss, val_loss=val_loss, stopped_early=stopped_early,
                       tokens_per_sec=tokens_per_sec)
