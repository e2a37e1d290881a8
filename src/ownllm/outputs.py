"""Output files and folders: checked before any work, written atomically, never over an input or unasked.

Every verb that writes something goes through these helpers, so the rules hold everywhere:

    out = check_output(out, "dir", inputs=[model_path], force=force)   # before any work
    with replaced_dir(out) as staging:        # write into `staging`; it becomes `out` at the end
        ...
    with atomic_file(path) as handle:        # a temporary name in the same folder, renamed at the end
        handle.write(...)

- An output that is one of the inputs (or a folder holding one, or a file already in an input folder) is refused,
  even with `--force`.
- An existing output file, or an existing folder that is not empty, is refused unless `--force` is given.
- A failure half-way leaves no truncated output and the earlier output (when replaced) untouched.
- A path of the wrong kind (a folder where a file goes, a file where a folder goes) is refused in one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Literal

import torch
from safetensors.torch import save_file

from ownllm.errors import OwnLLMError

FORCE_HINT = "pass --force to replace it"


def check_output(path: str | Path, kind: Literal["file", "dir"], *, inputs: Iterable[str | Path | None] = (),
                 force: bool = False, flag: str = "--out") -> Path:
    """Refuse an output `path` that is an input, has the wrong kind, or exists (unless `force`); return it."""
    path = Path(path)
    for source in inputs:
        if source is not None and str(source) != "-" and _overlaps(path, Path(source), kind):
            where = "is the input" if path.resolve() == Path(source).resolve() or kind == "dir" else "is in the input"
            raise OwnLLMError(f"{flag} {path}: {where} {source}; choose another output")
    if kind == "file":
        if path.is_dir():
            raise OwnLLMError(f"{flag} {path}: is a directory; give a file name")
        if path.exists() and not force:
            raise OwnLLMError(f"{flag} {path}: exists; {FORCE_HINT}, or choose another output")
        _check_parent(path, flag)
        return path
    if path.exists() and not path.is_dir():
        raise OwnLLMError(f"{flag} {path}: exists and is not a directory; choose another output directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OwnLLMError(f"{flag} {path}: exists and is not empty; {FORCE_HINT}, or choose another output")
    _check_parent(path, flag)
    return path


def _overlaps(out: Path, source: Path, kind: str) -> bool:
    """True when writing `out` would destroy (part of) `source`: the same file, a folder that holds it, or a file
    already in the input folder (a run's config.json)."""
    if not source.exists() or not out.exists() and kind == "file":
        return False
    out_resolved, source_resolved = out.resolve(), source.resolve()
    if out_resolved == source_resolved:
        return True
    if kind == "file":
        return source.is_dir() and out_resolved.is_relative_to(source_resolved)
    return source_resolved.is_relative_to(out_resolved)


def _check_parent(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OwnLLMError(f"{flag} {path}: {parent} is not a directory")
            if not os.access(parent, os.W_OK):
                raise OwnLLMError(f"{flag} {path}: cannot write in {parent} (permission denied)")
            return


def umask() -> int:
    """The process's umask (read from /proc where Linux shows it, so that no other thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain open() or mkdir() gives under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the file mode a plain open() gives (save_file itself makes files 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    follow_umask(path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; rename it to `path` when the block ends without error
    (an earlier `path` is replaced only then); on an error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    follow_umask(tmp)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_path(path: str | Path) -> Path:
    """A fresh name beside `path` for a writer that takes a path (rename it over `path` with os.replace when done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    follow_umask(tmp)
    return Path(tmp)


@contextlib.contextmanager
def replaced_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; at the end it replaces `path` as a whole (an earlier folder
    is removed only after the new one is complete). On an error the staging folder goes and `path` stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    follow_umask(staging, directory=True)
    try:
        yield staging
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def warn(message: str) -> None:
    """Tell the user, in one line on stderr, about something that was changed or left out on their behalf (once
    in a torchrun job: on rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"ownllm: warning: {message}", file=sys.stderr, flush=True)


def start_run_dir(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> bool:
    """Make `out` ready for a new training run; return whether it was created here.

    A run with a checkpoint is kept (pass --resume, or --force to start over); a run that never saved a
    checkpoint (killed before its first one) is started over, saying so; any other non-empty folder is refused
    unless `force`.
    """
    from ownllm.checkpoint import CONFIG_FILE, checkpoint_dir

    run_dir = Path(out)
    stale = (run_dir / CONFIG_FILE).is_file() and not force
    if stale and checkpoint_dir(run_dir) is not None:
        raise OwnLLMError(f"{run_dir} already holds a run: pass --resume to continue it, --force to start "
                          "over, or choose another --out")
    check_output(run_dir, "dir", inputs=inputs, force=force or stale)  # every refusal before any warning
    if stale:
        warn(f"{run_dir} holds a run that never saved a checkpoint: starting it over")
    if run_dir.exists() and (force or stale):
        shutil.rmtree(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return created
