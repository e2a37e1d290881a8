"""A GGUF file's quantized blocks stay quantized for inference: Q8_0 / Q4_0 / Q4_1 / Q4_K blocks read as integers
exactly, a tiny q8_0 or q4_0 file loads with no float32 matrix, and its logits are those of its float32 reading
within the rounding of the kernels' bfloat16 inputs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from interop_helpers import PROMPTS, randomize, small_bpe
from parity import assert_parity

import ownllm
from ownllm.config import model_config_from_preset
from ownllm.interop.readers.gguf_blocks import group_quantized
from ownllm.interop.writers.gguf import export_gguf
from ownllm.model import GPT
from ownllm.quantize import Int4Linear, Int8Linear, QuantizedEmbedding
from ownllm.runs import LoadedRun

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_bpe(tmp_path_factory.mktemp("tok"))


def export(tokenizer, path, quant: str, **overrides):
    # 64 columns and 16k rows throughout, so every matrix is a q4_0 matrix the int4 kernel takes (the head too).
    config = model_config_from_preset("tiny-llama", vocab_size=336, n_embd=64, mlp_hidden=128, **overrides)
    source = LoadedRun(path=".", model=randomize(GPT(config), seed=3, std=0.1), tokenizer=tokenizer, config=config,
                       run_config={})
    return export_gguf(source, path, quant=quant)


class _Tensor:
    """What `group_quantized` reads of a gguf ReaderTensor."""

    def __init__(self, kind: Q, data: np.ndarray, cols: int) -> None:
        self.tensor_type, self.data, self.shape = kind, data, [cols, data.shape[0]]


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_blocks_read_as_integers_dequantize_exactly(kind):
    rng = np.random.default_rng(0)
    if kind == Q.Q4_K:  # gguf cannot write Q4_K: random super-blocks with finite fp16 d and dmin
        blocks = rng.integers(0, 256, size=(16, 2, 144), dtype=np.uint8)
        blocks[..., 0:4] = rng.uniform(0.01, 0.1, size=(16, 2, 2)).astype(np.float16).view(np.uint8)
        data = blocks.reshape(16, -1)
    else:
        data = gguf.quants.quantize(rng.normal(size=(16, 512)).astype(np.float32), kind)
    blocks = group_quantized(_Tensor(kind, data, 512))
    expected = gguf.quants.dequantize(data, kind).reshape(16, 512)
    assert blocks.values.dtype == (torch.int8 if kind == Q.Q8_0 else torch.uint8) and blocks.group == 32
    torch.testing.assert_close(blocks.dequantize(), torch.from_numpy(expected), atol=0, rtol=0)


def float_matrices(model: torch.nn.Module) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    weights = [(n, t) for n, t in tensors if not n.startswith("rope_") and not n.endswith(("scales", "offsets"))]
    return [name for name, t in weights if t.is_floating_point() and t.dim() == 2]


@pytest.mark.parametrize("quant,layer", [("q8_0", Int8Linear), ("q4_0", Int4Linear)])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_gguf_loads_without_float32_matrices(quant, layer, tied, tokenizer, tmp_path):
    path = export(tokenizer, tmp_path / "m.gguf", quant, tie_embeddings=tied)
    run, reference = ownllm.load(str(path)), ownllm.load(str(path), quantize="none")
    assert float_matrices(run.model) == [] and isinstance(run.model.tok_emb, QuantizedEmbedding)
    linears = [m for m in run.model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(linears) == 4 * run.config.n_layer + 1 and all(type(m) is layer for m in linears)
    stored = sum(t.numel() * t.element_size() for t in [*run.model.parameters(), *run.model.buffers()])
    full = sum(t.numel() * t.element_size() for t in reference.model.state_dict().values())
    assert stored < full * (0.35 if quant == "q8_0" else 0.3), (stored, full)
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])])
    with torch.no_grad():
        ours, theirs = run.model(ids)[0], reference.model(ids)[0]
    # The kernels round their inputs to bfloat16 (and Q8_0's block scales become one scale per row).
    assert_parity(ours, theirs, layers=run.config.n_layer, dtype=torch.bfloat16, what=f"{quant} kept vs read as fp32")
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_int4_quantizes_a_float_ggufs_matrices_and_none_keeps_float32(tokenizer, tmp_path):
    path = export(tokenizer, tmp_path / "f32.gguf", "f32")
    assert float_matrices(ownllm.load(str(path)).model) != []  # auto: a float file stays float
    assert {type(m) for m in ownllm.load(str(path), quantize="int4").model.modules()} >= {Int4Linear}
    assert float_matrices(ownllm.load(str(export(tokenizer, tmp_path / "q.gguf", "q4_0")), quantize="none").model)
