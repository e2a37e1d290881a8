"""Fixtures shared by the fine-tuning tests (classification, instruction, LoRA), and the parity margins `-v` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

import parity
from finetune_helpers import single_thread, tiny_base


@pytest.fixture(autouse=True)
def _parity_margins(request):
    """Lets tests/parity.py record each comparison's largest difference on the running test's report."""
    parity.current_tests.append(request.node)
    yield
    parity.current_tests.pop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With -v: every parity comparison's largest difference against its tolerance, closest to its limit first."""
    if config.option.verbose <= 0:
        return
    reports = [r for status in ("passed", "failed") for r in terminalreporter.stats.get(status, []) if r.when == "call"]
    rows = [(r.nodeid, *value) for r in reports for key, value in r.user_properties if key == "parity"]
    if not rows:
        return
    terminalreporter.section("parity margins (largest difference / tolerance, closest first)")
    for nodeid, what, difference, atol in sorted(rows, key=lambda r: -r[2] / r[3] if r[3] else 0)[:40]:
        ratio = difference / atol if atol else 0.0
        terminalreporter.write_line(f"{ratio:7.3f}  {difference:.2e} / {atol:.2e}  {nodeid} {what}")
    closest = max(r[2] / r[3] for r in rows if r[3])
    terminalreporter.write_line(f"{len(rows)} comparisons; the closest uses {closest:.1%} of its tolerance")


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (tiny models are faster so, and steadier on a busy machine)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny GPT pretrained once per session on Python's docs, the base model of the fine-tuning tests."""
    return tiny_base(tmp_path_factory)
