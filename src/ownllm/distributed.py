"""Training on several processes, GPUs and machines with PyTorch's own engine: torchrun, DDP and FSDP2.

    torchrun --standalone --nproc-per-node 4 -m ownllm pretrain --data data/ --out runs/big --model gpt2
    torchrun --nnodes 2 --node-rank 0 --master-addr host0 --nproc-per-node 8 -m ownllm pretrain ... --strategy fsdp
    ownllm pretrain ... --nproc 2          # ownllm starts torchrun itself on this machine

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init` starts the process group from them (NCCL on CUDA, gloo on the
CPU) with a timeout (OWNLLM_DIST_TIMEOUT seconds, default 600) so that a stuck peer ends the job instead of hanging
it. Without torchrun, or with one process, nothing here does anything and no process group exists.

`--batch-size` stays the global batch: every process builds the same global micro-batch (a pure function of the
step) and takes its own rows of it (`shard`), so the data order does not depend on the number of processes and a
run resumes exactly on another number of them. The loss of each slice is scaled by its share of the batch's weight
(rows, or real target tokens) so that the averaged gradient is the gradient of the full batch's mean loss.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ownllm.errors import OwnLLMError

STRATEGIES = ("auto", "ddp", "fsdp")
TIMEOUT_ENV = "OWNLLM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def world_size() -> int:
    """Processes in this job (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that logs, shows progress and writes files (rank 0)."""
    return rank() == 0


def resolve_strategy(strategy: str) -> str:
    """`ddp` or `fsdp` for a multi-process job (`auto` = ddp); `none` for a single process."""
    if strategy not in STRATEGIES:
        raise OwnLLMError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if world_size() == 1:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise OwnLLMError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds") from None
    if seconds <= 0:
        raise OwnLLMError(f"{TIMEOUT_ENV} must be positive")
    return datetime.timedelta(seconds=seconds)


def init(device: torch.device) -> torch.device:
    """Join the torchrun job (once per process) and return this process's device: `cuda:LOCAL_RANK` on CUDA.

    A single process returns `device` unchanged and starts no process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise OwnLLMError(f"--device {device}: several processes train on CUDA (NCCL) or the CPU (gloo) only")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_timeout())
    return device


def shutdown() -> None:
    """Leave the process group (the CLI calls this when a command ends)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def lost_peers_as_error() -> Iterator[None]:
    """Turn a collective that timed out or lost its peer into one OwnLLMError line instead of a gloo/NCCL trace."""
    try:
        yield
    except RuntimeError as error:
        text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        lost = isinstance(error, dist.DistError) or any(
            sign in str(error).lower() for sign in ("timed out", "timeout", "connection closed", "connection reset"))
        if not (dist.is_initialized() and lost):
            raise
        raise OwnLLMError(f"lost the other processes ({text[:200]}): one of them failed or hung; a collective waits "
                          f"{_timeout().total_seconds():g} s ({TIMEOUT_ENV})") from None


def check_batch_size(batch_size: int) -> None:
    """The global batch must split evenly over the processes."""
    world = world_size()
    if batch_size % world:
        raise OwnLLMError(f"--batch-size {batch_size} is the global batch and must be divisible by the number of "
                          f"processes ({world}); each process takes batch-size / {world} rows")


def weight_by_rows(batch: Sequence[Tensor]) -> float:
    """The default loss weight of a batch: its rows (for losses that average over rows)."""
    return float(batch[0].shape[0])


def shard(batch: Sequence[Tensor], weight: Callable[[Sequence[Tensor]], float] = weight_by_rows
          ) -> tuple[list[Tensor], float]:
    """This process's rows of a global batch, and the factor its mean loss is scaled by so that the average over
    processes equals the full batch's mean: world * weight(slice) / weight(batch).

    A process whose slice is empty or weighs nothing (the short last batch of an epoch) runs the whole batch with
    factor 0, so that every process still enters the same collectives.
    """
    world, me = world_size(), rank()
    if world == 1:
        return list(batch), 1.0
    n = batch[0].shape[0]
    lo, hi = n * me // world, n * (me + 1) // world
    total = float(weight(batch))
    if hi > lo:
        part = [t[lo:hi] for t in batch]
        mine = float(weight(part))
        if total <= 0:
            return part, 1.0  # a batch without targets: as a single process would, let the loss say so
        if mine > 0:
            return part, world * mine / total
    return list(batch), 0.0


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over the processes (the values themselves without a process group)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def seed_for_rank(seed: int, step: int) -> None:
    """Give each process its own random stream (dropout masks) after a shared seed or a restored RNG state."""
    if world_size() > 1:
        torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank())


# ---- wrapping the model -------------------------------------------------------------------------------------------

def wrap(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module the loop trains: `model` itself (one process), DDP around it, or an FSDP2-sharded copy of it.

    DDP shares `model`'s parameters. FSDP shards a copy on `device` and leaves `model` (on its own device) as the
    full copy that checkpoints are written from (see `gather_full_model`).
    """
    if strategy == "none":
        return model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # no buffer changes in training (no batch norm): skip the per-forward broadcast
        return DistributedDataParallel(model.to(device), device_ids=ids, forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model).to(device)
    for block in getattr(sharded, "blocks", []):
        fully_shard(block)
    fully_shard(sharded)
    return sharded


@contextlib.contextmanager
def gradient_sync(net: nn.Module, strategy: str, sync: bool) -> Iterator[None]:
    """Forward and backward of a micro-step; gradients are reduced across processes only when `sync` (the last
    micro-step of an optimizer step), not on every micro-step of gradient accumulation."""
    if strategy == "ddp" and not sync:
        with net.no_sync():  # type: ignore[operator]
            yield
        return
    if strategy == "fsdp":
        net.set_requires_gradient_sync(sync)  # type: ignore[operator]
    yield


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_model(net: nn.Module, model: nn.Module, strategy: str) -> None:
    """Under FSDP, copy the full weights of the sharded `net` into `model` on rank 0 (every process must call this).
    Under DDP or alone, `model` already holds them."""
    if strategy != "fsdp":
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(net, options=_full_options())
    if is_main():
        with torch.no_grad():
            model.load_state_dict(full)


def _names_in_order(optimizer: torch.optim.Optimizer, net: nn.Module) -> list[str]:
    names = {id(p): n.replace("module.", "", 1) if isinstance(net, nn.parallel.DistributedDataParallel) else n
             for n, p in net.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, net: nn.Module, strategy: str) -> dict[str, Any]:
    """The optimizer state in torch's usual layout (indices in parameter order), whole and unsharded, on rank 0:
    the same bytes whatever the number of processes, so a run resumes on any number of them."""
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(net, optimizer, options=_full_options())
    if not is_main():
        return {}
    index = {name: i for i, name in enumerate(_names_in_order(optimizer, net))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in named["param_groups"]]
    return {"state": {index[name]: s for name, s in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, net: nn.Module, strategy: str,
                         state: dict[str, Any]) -> None:
    """Load a full optimizer state (as `full_optimizer_state` writes it) on every process; FSDP keeps its shard."""
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names_in_order(optimizer, net)
    if len(state["param_groups"]) != len(optimizer.param_groups) or sum(
            len(g["params"]) for g in state["param_groups"]) != len(names):
        raise OwnLLMError("the checkpoint's optimizer state does not match the parameters that train")
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, optim_state_dict=named, options=StateDictOptions(full_state_dict=True))


# ---- launching ----------------------------------------------------------------------------------------------------

def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m ownllm ARGS` with `--nproc` taken out."""
    rest, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and "--nproc".startswith(name):  # --nproc N, --nproc=N (or a prefix argparse took)
            skip = "=" not in arg
        else:
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "ownllm", *rest]


def launch(nproc: int, argv: Sequence[str]) -> int | None:
    """`--nproc N`: run this command under torchrun on N local processes and return its exit code; None for
    `--nproc 1` (the caller runs the command itself, in this process)."""
    if nproc < 1:
        raise OwnLLMError("--nproc must be at least 1")
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OwnLLMError("--nproc starts torchrun itself; under torchrun leave it out (use --nproc-per-node)")
    if nproc == 1:
        return None
    process = subprocess.Popen(torchrun_command(nproc, argv))
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # torchrun and its processes got the Ctrl-C too: wait for them to stop
            continue
