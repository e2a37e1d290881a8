"""torchrun target of tests/test_distributed.py: `ownllm ARGS` with two test-only additions.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_launch.py pretrain --out RUN ...

- On every rank but 0, an audit hook fails the job as soon as the process creates, writes, renames or deletes
  anything under --out (only rank 0 may write files).
- OWNLLM_TEST_FAIL=RANK:MICROSTEP:raise|hang makes that rank raise an OwnLLMError (or sleep for a minute) when the
  training loop asks for that micro-step's batch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

WRITE_EVENTS = {"os.rename", "os.link", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                "os.symlink", "shutil.copyfile", "shutil.move"}


def guard_writes(root: Path) -> None:
    def under_root(path: object) -> bool:
        if isinstance(path, bytes):
            path = path.decode()
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args:
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
            if writes and under_root(args[0]):
                raise RuntimeError(f"rank {os.environ['RANK']} opened {args[0]} for writing")
        elif event in WRITE_EVENTS and args and any(under_root(a) for a in args[:2]):
            raise RuntimeError(f"rank {os.environ['RANK']} changed {args[0]} ({event})")

    sys.addaudithook(hook)


def inject_failure(spec: str) -> None:
    import ownllm.training as training
    from ownllm.errors import OwnLLMError

    rank, micro_step, kind = spec.split(":")
    if os.environ["RANK"] != rank:
        return
    real_train = training.train

    def train(loop, *args, **kwargs):
        real_batch = loop.micro_batch

        def micro_batch(i: int):
            if i == int(micro_step):
                if kind == "hang":
                    time.sleep(60)
                raise OwnLLMError(f"injected failure at micro-step {i}")
            return real_batch(i)

        loop.micro_batch = micro_batch
        return real_train(loop, *args, **kwargs)

    for module in ("ownllm.pretrain", "ownllm.finetune.common"):  # the modules that call `train`
        __import__(module)
        setattr(sys.modules[module], "train", train)


def main() -> int:
    argv = sys.argv[1:]
    if os.environ.get("RANK", "0") != "0":
        guard_writes(Path(argv[argv.index("--out") + 1]).resolve())
    if os.environ.get("OWNLLM_TEST_FAIL"):
        inject_failure(os.environ["OWNLLM_TEST_FAIL"])
    from ownllm.cli import main as ownllm_main

    return ownllm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
