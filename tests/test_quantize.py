"""int8 and bf16 inference: the same model within a small perplexity cost, from Python and the CLI."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from torch import nn

from finetune_helpers import python_docs, run_cli, single_thread
from ownllm.errors import OwnLLMError
from ownllm.quantize import quantize_model


@pytest.fixture(scope="module")
def run(base):
    import ownllm

    return ownllm.load(base)


def test_int8_replaces_every_linear_layer_and_stays_close(run):
    ids = torch.tensor([run.tokenizer.encode(python_docs(2000))[:100]])
    with torch.no_grad(), single_thread():
        reference = run.model(ids)
        quantized = quantize_model(copy.deepcopy(run.model), "int8")
        logits = quantized(ids)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    linears = sum(type(m) is nn.Linear for m in run.model.modules())
    assert sum(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in quantized.modules()) == linears
    error = (logits - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error  # changed, but little
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_bf16_casts_weights(run):
    model = quantize_model(copy.deepcopy(run.model), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(OwnLLMError, match="unknown --quantize"):
        quantize_model(run.model, "int4")


def test_quantized_perplexity_from_the_cli(base, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(python_docs(160_000)[150_000:], encoding="utf-8")  # after what the base model trained on
    perplexity = {}
    for mode in ("none", "int8", "bf16"):
        result = run_cli("evaluate", base, "--text", text, "--json", "--quantize", mode)
        assert result.returncode == 0, result.stderr
        perplexity[mode] = json.loads(result.stdout)["perplexity"]
    assert perplexity["none"] < 100  # the base model learned something, so the comparison means something
    assert perplexity["int8"] == pytest.approx(perplexity["none"], rel=0.03)
    assert perplexity["bf16"] == pytest.approx(perplexity["none"], rel=0.03)


def test_served_int8_model_decodes_like_the_int8_model_alone(run):
    from ownllm.decoding import SamplingOptions, generate_ids
    from ownllm.serve.engine import Engine

    model = quantize_model(copy.deepcopy(run.model), "int8")
    prompt = run.tokenizer.encode("The list")
    options = SamplingOptions(max_new_tokens=12, temperature=0)
    expected = generate_ids(model, [prompt], options, eot_id=run.tokenizer.eot_id)[0]
    engine = Engine(model, run.tokenizer, max_batch=2).start()
    try:
        request = engine.submit(prompt, options, lambda event: None)
        deadline = time.monotonic() + 60
        while not request.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request.finished and request.output == expected
    finally:
        engine.close()
