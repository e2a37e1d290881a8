"""Fixtures shared by the fine-tuning tests (classification, instruction, LoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_helpers import single_thread, tiny_base


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (tiny models are faster so, and steadier on a busy machine)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny GPT pretrained once per session on Python's docs, the base model of the fine-tuning tests."""
    return tiny_base(tmp_path_factory)
