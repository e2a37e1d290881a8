"""Weight-only int8 / int4 and bf16 inference: layers that compute their dequantized weights, a tiny model whose
greedy answer int8 does not change, perplexity close to fp32 from the CLI, and the server decoding an int4 model
as it decodes alone."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from torch import nn

from finetune_helpers import python_docs, run_cli, single_thread
from parity import assert_parity
from ownllm.errors import OwnLLMError
from ownllm.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_linear,
    refined_head,
)

PROMPT = "The list"


@pytest.fixture(scope="module")
def run(base):
    import ownllm

    return ownllm.load(base)


@pytest.mark.parametrize("mode,kind", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_linear_equals_dequantize_then_matmul(mode, kind):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    layer = quantized_linear(weight, bias, mode)
    assert type(layer) is kind
    stored = quantize_int8(weight) if mode == "int8" else quantize_int4(weight)
    assert stored.values.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    # The kernels take bfloat16 inputs and give bfloat16 outputs: the reference rounds the input the same way.
    reference = x.bfloat16().float() @ stored.dequantize().t() + bias
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    assert_parity(out, reference, layers=0, dtype=torch.bfloat16, what=f"{mode} layer vs dequantized matmul")
    # Closer to its own dequantized weights than the float weights are: it multiplies by those.
    error_to_reference = (out - reference).abs().max()
    assert error_to_reference < (x @ weight.t() + bias - reference).abs().max()
    assert layer.weight.numel() * layer.weight.element_size() <= weight.numel() // (1 if mode == "int8" else 2)


def test_int4_takes_its_groups_and_falls_back_to_int8_where_the_kernel_cannot():
    weight = torch.randn(40, 64)  # 40 outputs: not a multiple of 16, which PyTorch's int4 kernel needs
    assert type(quantized_linear(weight, None, "int4")) is Int8Linear
    stored = quantize_int4(torch.randn(32, 64))
    assert stored.group == 32 and stored.scales.shape == (32, 2) and int(stored.values.max()) <= 15


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_head_recomputes_its_best_logits_in_float32(mode):
    torch.manual_seed(1)
    weight, x = torch.randn(400, 64), torch.randn(2, 3, 64)
    head = refined_head(weight, None, mode)
    with torch.no_grad():
        logits, fast = head(x), head.fast(x)
    exact = x @ quantize_int8(weight).dequantize().t()  # float32 products with the int8 rows
    top = fast.topk(head.k, dim=-1).indices
    assert_parity(logits.gather(-1, top), exact.gather(-1, top), layers=0, what=f"{mode} head's best logits")
    rest = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(logits[rest], fast[rest])  # the others are the kernel's
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


def test_quantized_embedding_reads_its_rows():
    table = torch.randn(50, 64)
    embedding = QuantizedEmbedding(quantize_int8(table))
    ids = torch.tensor([[3, 7, 49], [0, 0, 1]])
    assert_parity(embedding(ids), quantize_int8(table).dequantize()[ids], layers=0, what="embedding rows")


def test_int8_model_answers_like_fp32_and_int4_stays_close(run):
    from ownllm.decoding import SamplingOptions, generate_ids

    prompt = run.tokenizer.encode(PROMPT)
    options = SamplingOptions(max_new_tokens=20, temperature=0)
    ids = torch.tensor([run.tokenizer.encode(python_docs(2000))[:100]])
    with torch.no_grad(), single_thread():
        expected = generate_ids(run.model, [prompt], options, eot_id=run.tokenizer.eot_id)[0]
        reference = run.model(ids)
        for mode in ("int8", "int4"):
            model = quantize_model(copy.deepcopy(run.model), mode)
            assert not any(type(m) is nn.Linear for m in model.modules()) and type(model.tok_emb) is QuantizedEmbedding
            assert all(b.dtype in (torch.int8, torch.uint8) for n, b in model.named_buffers() if n.endswith("weight"))
            agreement = (model(ids).argmax(-1) == reference.argmax(-1)).float().mean()
            assert agreement > (0.97 if mode == "int8" else 0.9), (mode, agreement)
            if mode == "int8":
                assert generate_ids(model, [prompt], options, eot_id=run.tokenizer.eot_id)[0] == expected


def test_bf16_casts_weights_and_unknown_modes_are_refused(run):
    model = quantize_model(copy.deepcopy(run.model), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(OwnLLMError, match="unknown --quantize"):
        quantize_model(run.model, "int3")


def test_quantized_perplexity_from_the_cli(base, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(python_docs(160_000)[150_000:], encoding="utf-8")  # after what the base model trained on
    perplexity = {}
    for mode in ("none", "int8", "int4", "bf16"):
        result = run_cli("evaluate", base, "--text", text, "--json", "--quantize", mode)
        assert result.returncode == 0, result.stderr
        perplexity[mode] = json.loads(result.stdout)["perplexity"]
    assert perplexity["none"] < 100  # the base model learned something, so the comparison means something
    assert perplexity["int8"] == pytest.approx(perplexity["none"], rel=0.01)
    assert perplexity["int4"] == pytest.approx(perplexity["none"], rel=0.05)
    assert perplexity["bf16"] == pytest.approx(perplexity["none"], rel=0.03)


def test_served_int4_model_decodes_like_the_int4_model_alone(run):
    from ownllm.decoding import SamplingOptions, generate_ids
    from ownllm.serve.engine import Engine

    model = quantize_model(copy.deepcopy(run.model), "int4")
    prompt = run.tokenizer.encode(PROMPT)
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
