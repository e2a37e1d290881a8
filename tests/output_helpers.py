"""Shared by the output-rule tests (tests/test_outputs.py, tests/test_outputs_newer.py): paths of every kind, a
snapshot of a folder, the CLI in this process, and the one-line error."""

from __future__ import annotations

import os
from pathlib import Path

from ownllm.cli import main


def make_path(folder: Path, kind: str) -> Path:
    """A path of the given kind in `folder`: file (UTF-8 text), dir (empty, or holding one file: `fulldir`),
    missing, binary, latin1, textgguf (a text file named .gguf)."""
    path = folder / ("given.gguf" if kind == "textgguf" else f"given-{kind}")
    if kind in ("file", "textgguf"):
        path.write_text("some text\nmore text\n", encoding="utf-8")
    elif kind in ("dir", "fulldir"):
        path.mkdir()
        if kind == "fulldir":
            (path / "keep.txt").write_text("keep me\n", encoding="utf-8")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "latin1":
        path.write_bytes("caf\xe9 au lait\nna\xefve\n".encode("latin-1"))
    return path


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folders` with its size and modification time."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(root) / name
                stat = path.lstat()
                seen[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return seen


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_lines(err: str) -> list[str]:
    """The lines left on a terminal: a progress bar redrawn with carriage returns and then cleared counts as none."""
    return [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = printed_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ownllm: error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
