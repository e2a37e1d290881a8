"""Shared by the embedding and retrieval tests: a tiny run with random weights, made in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from interop_helpers import randomize, small_bpe


def tiny_run(folder: Path, block_size: int = 512, seed: int = 0) -> Path:
    """A 2-layer Llama-flavoured run (RoPE, RMSNorm) with random weights and a 320-token BPE, saved as a run."""
    from ownllm.checkpoint import save_weights, write_run_config
    from ownllm.config import ModelConfig
    from ownllm.model import GPT

    tokenizer = small_bpe(folder)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                         position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True)
    run = folder / "run"
    run.mkdir()
    save_weights(randomize(GPT(config), seed=seed, std=0.1), run / "model.safetensors")
    write_run_config(run, config)
    tokenizer.save(run / "tokenizer")
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("tiny"))


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ownllm: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
