"""The static-shape decode step (ownllm.compiled_step): the eager step's logits over a prefill and 20 decode steps,
compiled (slow: inductor compiles C++, about a minute on a cold cache on 2 cores) or not; generate's tokens; and a
failed compilation falls back to decoding eagerly with one warning."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import randomize
from parity import assert_parity

from ownllm.compiled_step import CompiledStep, use_compiled_step
from ownllm.config import model_config_from_preset
from ownllm.decoding import SamplingOptions, generate_ids, prefill, step
from ownllm.kvcache import SlotPool
from ownllm.model import GPT

PROMPTS = [[5, 9, 2, 7, 11, 3], [8, 1, 4]]  # ragged: the shorter row decodes at its own positions


@pytest.fixture(scope="module")
def model():
    config = model_config_from_preset("tiny-llama", vocab_size=336, tie_embeddings=True)
    return randomize(GPT(config), seed=1, std=0.1)


def logits_over_steps(model, stepper, steps: int = 20) -> torch.Tensor:
    """Logits of the prefill and of `steps` greedy decode steps, the pool's cache sized as `generate` sizes it."""
    pool = SlotPool(model.config, len(PROMPTS), max(map(len, PROMPTS)) + steps, "cpu", torch.float32)
    with torch.inference_mode():
        logits = [prefill(model, pool, 0, PROMPTS)]
        for _ in range(steps):
            logits.append(stepper(pool, logits[-1].argmax(-1)))
    return torch.stack(logits)


def eager(model):
    return lambda pool, tokens: step(model, pool, tokens)


def test_static_step_equals_the_eager_step(model, one_thread):
    expected = logits_over_steps(model, eager(model))
    actual = logits_over_steps(model, CompiledStep(model, compile=False))
    assert_parity(actual, expected, layers=model.config.n_layer, what="static-shape step vs eager step")


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step(model, one_thread):
    expected = logits_over_steps(model, eager(model))
    compiled = CompiledStep(model)
    actual = logits_over_steps(model, compiled)
    assert compiled.compiled and compiled.compile_seconds > 0  # it compiled, and said how long that took
    assert_parity(actual, expected, layers=model.config.n_layer, what="compiled step vs eager step")


def test_generate_takes_the_step_and_a_failed_compilation_decodes_eagerly(model, one_thread, capsys):
    options = SamplingOptions(max_new_tokens=12, temperature=0)
    expected = generate_ids(model, PROMPTS, options)
    stepper = use_compiled_step(model)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no C++ compiler here")

    stepper.function = broken  # what torch.compile raises where inductor cannot build
    try:
        assert generate_ids(model, PROMPTS, options) == expected
    finally:
        del model.decode_step
    assert len(calls) == 1 and not stepper.compiled  # tried once, then the same step eagerly
    assert capsys.readouterr().err.count("torch.compile failed (no C++ compiler here); decoding eagerly") == 1
