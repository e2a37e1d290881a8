"""The compiled decode step (ownllm.compiled_step): the eager step's logits over a prefill and 20 decode steps,
compiled (about 20 s on a cold inductor cache on 2 cores) or not, with one graph for every cache length; Gemma-like
local layers keep their window; the server's engine decodes ragged requests through it as each would decode alone;
and a failed compilation falls back to decoding eagerly with one warning."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import randomize
from parity import assert_parity
from test_serve_engine import Collector, alone

from ownllm.compiled_step import CompiledStep, use_compiled_step
from ownllm.config import model_config_from_preset
from ownllm.decoding import SamplingOptions, generate_ids, prefill, step
from ownllm.kvcache import SlotPool
from ownllm.model import GPT
from ownllm.serve.engine import Engine

PROMPTS = [[5, 9, 2, 7, 11, 3], [8, 1, 4]]  # ragged: the shorter row decodes at its own positions
GEMMA_LIKE = dict(mlp="geglu", qk_norm=True, qk_norm_gain=True, norm_offset=1.0, sandwich_norm=True,
                  scale_embeddings=True, sliding_window=5, local_layers=(0,), local_rope_theta=100.0)


def tiny_llama(**options) -> GPT:
    config = model_config_from_preset("tiny-llama", vocab_size=336, tie_embeddings=True, **options)
    return randomize(GPT(config), seed=1, std=0.1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def base_run(base):
    import ownllm

    return ownllm.load(base)


def logits_over_steps(model, stepper, prompts=PROMPTS, steps: int = 20) -> torch.Tensor:
    """Logits of the prefill and of `steps` greedy decode steps, the pool's cache sized as `generate` sizes it."""
    pool = SlotPool(model.config, len(prompts), max(map(len, prompts)) + steps, "cpu", torch.float32)
    with torch.inference_mode():
        logits = [prefill(model, pool, 0, prompts)]
        for _ in range(steps):
            logits.append(stepper(pool, logits[-1].argmax(-1)))
    return torch.stack(logits)


def eager(model):
    return lambda pool, tokens: step(model, pool, tokens)


@pytest.mark.parametrize("options", [{}, GEMMA_LIKE], ids=["llama", "gemma-like-window-5"])
def test_read_only_step_equals_the_eager_step(options, one_thread):
    model = tiny_llama(**options)  # the window of 5 is shorter than the 26 positions decoded
    expected = logits_over_steps(model, eager(model))
    actual = logits_over_steps(model, CompiledStep(model, compile=False))
    assert_parity(actual, expected, layers=model.config.n_layer, what="read-only step vs eager step")


def test_compiled_step_equals_the_eager_step_with_one_graph_for_all_lengths(model, one_thread):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for prompts in (PROMPTS, PROMPTS[:1]):  # a batch of rows, then batch 1 (a graph of its own)
        expected = logits_over_steps(model, eager(model), prompts)
        compiled = CompiledStep(model)
        actual = logits_over_steps(model, compiled, prompts)
        assert compiled.compiled and compiled.compile_seconds > 0  # it compiled, and said how long that took
        assert_parity(actual, expected, layers=model.config.n_layer, what="compiled step vs eager step")
    assert 1 <= counters["stats"]["unique_graphs"] - graphs <= 2  # 20 cache lengths, not a graph per length


def test_the_engine_decodes_ragged_requests_through_the_compiled_step_as_each_alone(base_run, one_thread):
    from torch._dynamo.utils import counters

    prompts, budgets = ["The list", "def f(x):\n    return", "In"], [14, 6, 10]
    expected = [alone(base_run, prompt, budget) for prompt, budget in zip(prompts, budgets)]
    stepper = use_compiled_step(base_run.model)
    assert stepper.warm_up() > 0  # what `serve --compile` does before it listens
    graphs = counters["stats"]["unique_graphs"]
    engine = Engine(base_run.model, base_run.tokenizer, max_batch=3, max_queue=3).start()
    try:
        collector = Collector()
        requests = [engine.submit(base_run.tokenizer.encode(p), SamplingOptions(max_new_tokens=b, temperature=0),
                                  collector.receiver(i)) for i, (p, b) in enumerate(zip(prompts, budgets))]
        collector.wait(len(prompts))
    finally:
        engine.close()
        del base_run.model.decode_step
    assert stepper.compiled and stepper.compile_seconds > 0
    assert [r.output for r in requests] == expected
    # 3, 2 and 1 rows in a pool that grows: the warmed-up graphs serve them all, no request waits for a compilation
    assert counters["stats"]["unique_graphs"] == graphs


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
