"""A new user's first commands: what `ownllm demo` tells them to type next works, as printed, in a new shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def fresh_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` in a login-less bash with a bare environment: no activated venv, only the system's PATH."""
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-c", command], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_the_command_the_demo_prints_runs_as_printed_in_a_new_shell(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "ownllm", "demo", "--out", "runs/demo", "--max-steps", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    hint = demo.stdout.strip().splitlines()[-1]
    assert "; try: " in hint, hint
    command = hint.split("; try: ", 1)[1]
    assert command.split()[1:3] == ["generate", "runs/demo"]
    done = fresh_shell(command + " --max-new-tokens 3 --seed 1", tmp_path)
    assert done.returncode == 0, (command, done.stderr)
    assert done.stdout.startswith("The for statement")


def test_the_command_is_plain_ownllm_where_the_shell_finds_this_installation(tmp_path):
    here = Path(sys.executable).parent
    script = "from ownllm.demo import ownllm_command; print(ownllm_command())"
    for path, expected in ((f"{here}:/usr/bin:/bin", "ownllm"), ("/usr/bin:/bin", str(here / "ownllm"))):
        printed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PATH": path},
                                 capture_output=True, text=True, cwd=tmp_path)
        assert printed.stdout.strip() == expected, printed.stderr
