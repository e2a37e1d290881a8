"""GGUF export: the file reads back with gguf.GGUFReader with every key and tensor llama.cpp expects, the values
survive (the Llama q/k rows in llama.cpp's interleaved RoPE layout), and, where llama-cpp-python is installed,
llama.cpp computes the same logits and greedy tokens as ownllm."""

from __future__ import annotations

import gguf  # a test dependency (pip install -e ".[test]"): missing, the tests fail loudly
import numpy as np
import pytest
import torch
from interop_helpers import PROMPTS, randomize, small_bpe
from parity import assert_parity

from ownllm.cli import main as cli_main
from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.interop.names import interleave_rope_rows
from ownllm.interop.writers.gguf import export_gguf
from ownllm.model import GPT, apply_rope, rope_tables
from ownllm.runs import LoadedRun


EXTRA_ROWS = 3  # the model's vocabulary is padded beyond the tokenizer's, as many released models are


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_bpe(tmp_path_factory.mktemp("tok"))


def make_run(preset: str, tokenizer, folder, **overrides) -> LoadedRun:
    config = model_config_from_preset(preset, vocab_size=tokenizer.vocab_size + EXTRA_ROWS, **overrides)
    model = randomize(GPT(config), seed=7)
    return LoadedRun(path=folder, model=model, tokenizer=tokenizer, config=config, run_config={})


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(tensor) -> np.ndarray:
    """A tensor's values in PyTorch order ([rows, cols]), dequantized."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_gguf_has_every_key_and_tensor_llama_cpp_reads(preset, quant, tokenizer, tmp_path):
    run = make_run(preset, tokenizer, tmp_path)
    path = export_gguf(run, tmp_path / "model.gguf", quant=quant)
    fields, tensors = read(path)
    arch = "gpt2" if preset == "tiny" else "llama"
    config = run.config
    assert fields["general.architecture"] == arch
    expected = {f"{arch}.context_length": config.block_size, f"{arch}.embedding_length": config.n_embd,
                f"{arch}.block_count": config.n_layer, f"{arch}.feed_forward_length": config.mlp_size,
                f"{arch}.attention.head_count": config.n_head, f"{arch}.attention.head_count_kv": config.kv_heads,
                f"{arch}.vocab_size": config.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.eos_token_id": tokenizer.eot_id, "tokenizer.ggml.bos_token_id": tokenizer.eot_id,
                "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[quant]}
    if arch == "llama":
        expected.update({"llama.rope.dimension_count": config.head_size, "llama.rope.freq_base": config.rope_theta,
                         "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.norm_eps)})
    else:
        expected["gpt2.attention.layer_norm_epsilon"] = pytest.approx(config.norm_eps)
    assert {key: fields.get(key) for key in expected} == expected

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config.vocab_size
    assert tokens[: tokenizer.vocab_size] == [tokenizer.token(i) for i in range(tokenizer.vocab_size)]
    assert types[tokenizer.eot_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == tokenizer.vocab_size - 257 and all(len(m.split(" ")) == 2 for m in merges)

    per_layer = (["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"] if arch == "gpt2" else
                 ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down"])
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    if arch == "gpt2":
        names |= {"position_embd.weight", "output_norm.bias"}
        names |= {f"blk.{i}.{n}.bias" for i in range(2) for n in per_layer}
    else:
        names |= {"output.weight"}  # tiny-llama's head is untied
    assert set(tensors) == names
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quant]
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == matrix_type
    assert tensors["output_norm.weight"].tensor_type.name == "F32"

    state = {name: t.detach().numpy() for name, t in run.model.state_dict().items()}
    tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 0.02, "q4_0": 0.2}[quant]
    np.testing.assert_allclose(values(tensors["token_embd.weight"]), state["tok_emb.weight"], atol=tolerance, rtol=0)
    if arch == "llama":  # q rows are reordered to llama.cpp's layout: undo it and compare
        q = values(tensors["blk.1.attn_q.weight"])
        ours = state["blocks.1.attn.qkv.weight"][: config.n_embd]
        np.testing.assert_allclose(q, interleave_rope_rows(torch.from_numpy(ours), config.n_head).numpy(),
                                   atol=tolerance, rtol=0)


def test_interleaved_rows_with_pairwise_rope_equal_rotate_half_rope():
    """What the permutation is for: llama.cpp's RoPE on permuted rows gives ownllm's RoPE, reordered the same way."""
    heads, head_size, positions = 3, 8, 5
    q = torch.randn(1, heads, positions, head_size)
    cos, sin = rope_tables(head_size, positions, 10000.0)
    ours = apply_rope(q, cos[None, None], sin[None, None])

    def pairwise_rope(x):  # llama.cpp's "normal" RoPE: rotate (x0, x1), (x2, x3), ... by the same angles
        angles = torch.outer(torch.arange(positions, dtype=torch.float64),
                             1.0 / 10000.0 ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
        c, s = angles.cos().float(), angles.sin().float()
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)

    def permute(x):  # per head, as interleave_rope_rows does to weight rows
        flat = x.transpose(1, 2).reshape(positions, heads * head_size).t()
        return interleave_rope_rows(flat, heads).t().reshape(1, positions, heads, head_size).transpose(1, 2)

    assert_parity(pairwise_rope(permute(q)), permute(ours), layers=0, what="pairwise vs rotate-half RoPE")


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@pytest.mark.parametrize(("pattern", "name"), [(LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2"),
                                               ("digits", "smollm")])
def test_imported_byte_level_tokenizers_get_llama_cpp_pre_tokenizer_names(pattern, name, tokenizer, tmp_path):
    from tokenizers import Regex, pre_tokenizers

    hf = tokenizer.hf.__class__.from_str(tokenizer.hf.to_str())
    if pattern == "digits":  # SmolLM2's own tokenizer.json, and what ownllm rebuilds from a `smollm` GGUF
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    run = make_run("tiny-llama", type(tokenizer)(hf), tmp_path)
    fields, _ = read(export_gguf(run, tmp_path / "m.gguf", quant="f32"))
    assert fields["tokenizer.ggml.pre"] == name
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(OwnLLMError, match="pre-tokenizer"):
        export_gguf(make_run("tiny-llama", type(tokenizer)(hf), tmp_path), tmp_path / "w.gguf")


def test_cli_export_and_refusals(tokenizer, tmp_path, capsys):
    from ownllm.checkpoint import save_weights, write_run_config

    run = make_run("tiny-llama", tokenizer, tmp_path / "run")
    (tmp_path / "run").mkdir()
    save_weights(run.model, tmp_path / "run" / "model.safetensors")
    tokenizer.save(tmp_path / "run" / "tokenizer")
    write_run_config(tmp_path / "run", run.config)
    assert cli_main(["export", str(tmp_path / "run"), "--to", "gguf", "--out", str(tmp_path / "m.gguf"),
                     "--quant", "q8_0"]) == 0
    assert read(tmp_path / "m.gguf")[0]["general.file_type"] == 7

    from ownllm.tokenizer import char_tokenizer_from_text

    chars = char_tokenizer_from_text("abc")
    char_run = LoadedRun(path=tmp_path, model=GPT(model_config_from_preset("tiny", vocab_size=4)), tokenizer=chars,
                         config=model_config_from_preset("tiny", vocab_size=4), run_config={})
    with pytest.raises(OwnLLMError, match="char tokenizer"):
        export_gguf(char_run, tmp_path / "char.gguf")
    assert not (tmp_path / "char.gguf").exists()
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "missing"), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert capsys.readouterr().err.startswith("ownllm: error: ")


# ---- llama.cpp itself, where llama-cpp-python is installed (building it takes minutes: an optional extra) ---------

def llama_cpp_logits_and_greedy(path, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32  # llama.cpp keeps its KV cache in f16 unless told otherwise
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=f32, type_v=f32)
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)])
    tokens = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return logits, tokens


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_llama_cpp_gives_ownllm_logits_and_greedy_tokens(preset, tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    from ownllm.decoding import SamplingOptions, generate_ids

    run = make_run(preset, tokenizer, tmp_path)
    prompt = tokenizer.encode(PROMPTS[2])
    steps = 64 - len(prompt) - 1
    with torch.no_grad():
        ours = run.model(torch.tensor([prompt]))[0].numpy()
    greedy = generate_ids(run.model, [prompt], SamplingOptions(max_new_tokens=steps, temperature=0, stop_at_eot=False))
    logits, tokens = llama_cpp_logits_and_greedy(export_gguf(run, tmp_path / "f32.gguf", quant="f32"), prompt, steps)
    # llama.cpp's CPU GELU reads an f16 lookup table, so the GPT-2 graph is exact only to about 1e-3.
    np.testing.assert_allclose(logits, ours, atol=1e-3 if preset == "tiny-llama" else 5e-3, rtol=0)
    assert tokens == greedy[0]
    logits, tokens = llama_cpp_logits_and_greedy(export_gguf(run, tmp_path / "q8.gguf", quant="q8_0"), prompt, 8)
    error = np.abs(logits - ours).mean() / np.abs(ours).mean()  # measured 0.02 (gpt2), 0.04 (llama)
    assert error < 0.1 and len(tokens) == 8  # q8_0 runs and stays close to f32
