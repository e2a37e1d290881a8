"""GGUF import: a model exported by ownllm reads back with the source's logits and token ids in every writer type,
transformers' own GGUF loader agrees with ownllm on the same file, and a damaged or foreign file is one line,
exit code 2 and nothing written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from interop_helpers import PROMPTS, randomize, small_bpe
from parity import assert_parity

import ownllm
from ownllm.runs import LoadedRun
from ownllm.cli import main as cli_main
from ownllm.config import model_config_from_preset
from ownllm.interop.names import deinterleave_rope_rows
from ownllm.interop.readers.gguf import read_gguf
from ownllm.interop.writers.gguf import export_gguf, tensor_type
from ownllm.model import GPT

UNICODE_TEXT = ("Grüße aus Köln: naïve café, 東京タワー und Ελληνικά, русский текст, עברית, العربية; emoji 🤖🚀👍🏽, "
                "ligature ﬁ, math ∑∞≠, tabs\tand  double  spaces\n\nnumbers 1234567 3.14159<|endoftext|>def f(x):\n"
                "    return x ** 2  # ✓")
# Mean error relative to the logits' size, of the GGUF type against the float32 source.
RELATIVE_ERROR = {"f32": 1e-7, "f16": 2e-3, "q8_0": 0.06, "q4_0": 0.5}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_bpe(tmp_path_factory.mktemp("tok"))


def make_run(preset: str, tokenizer, **overrides) -> LoadedRun:
    overrides.setdefault("vocab_size", tokenizer.vocab_size + 3)
    config = model_config_from_preset(preset, **overrides)
    model = randomize(GPT(config), seed=11)
    return LoadedRun(path=".", model=model, tokenizer=tokenizer, config=config, run_config={})


def assert_same_shape_and_flavour(a, b) -> None:
    """Equal models, though one may spell a default out (mlp_hidden=128 vs None) or hold eps as a float32."""
    derived = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "kv_heads", "head_size", "mlp_size",
               "bias", "use_qkv_bias", "use_mlp_bias", "norm", "mlp", "position", "rope_theta", "tie_embeddings")
    assert {k: getattr(a, k) for k in derived} == {k: getattr(b, k) for k in derived}
    assert a.norm_eps == pytest.approx(b.norm_eps, rel=1e-6)


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def stored_as(model: GPT, quant: str) -> GPT:
    """`model` with every weight rounded the way the GGUF writer stores it for `quant` (quantize, dequantize)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            qtype = getattr(gguf.GGMLQuantizationType, tensor_type(name, tuple(param.shape), quant))
            stored = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
            param.copy_(torch.from_numpy(np.asarray(stored, dtype=np.float32).reshape(param.shape)))
    return model


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_round_trip_in_every_writer_type(quant, tokenizer, tmp_path):
    source = make_run("tiny-llama", tokenizer)
    path = export_gguf(source, tmp_path / "m.gguf", quant=quant)
    run = ownllm.load(str(path), quantize="none")  # float32 (the default keeps q8_0/q4_0 blocks: test_gguf_quantized)
    assert_same_shape_and_flavour(run.config, source.config)
    ids = tokenizer.encode(UNICODE_TEXT)
    assert run.tokenizer.encode(UNICODE_TEXT) == ids and run.tokenizer.decode(ids) == UNICODE_TEXT
    ours, theirs = logits(run.model, ids[:60]), logits(source.model, ids[:60])
    error = ((ours - theirs).abs().mean() / theirs.abs().mean()).item()
    assert error < RELATIVE_ERROR[quant], error  # measured 0, 3e-4, 0.03, 0.25 (large random weights)
    # The reader adds no error of its own: the logits are those of the source with the writer's rounding.
    assert_parity(ours, logits(stored_as(source.model, quant), ids[:60]), layers=run.config.n_layer,
                  what=f"read {quant} vs source rounded to {quant}")


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny-llama", {"qkv_bias": True}),
                                              ("tiny-llama", {"tie_embeddings": True})])
def test_gpt2_qwen2_biases_and_tied_heads_read_back_exactly(preset, overrides, tokenizer, tmp_path):
    source = make_run(preset, tokenizer, **overrides)
    model = read_gguf(export_gguf(source, tmp_path / "m.gguf", quant="f32"))
    assert_same_shape_and_flavour(model.config, source.config)
    assert model.sections["source"]["architecture"] == ("gpt2" if preset == "tiny" else "llama")
    expected = {name: t for name, t in source.model.state_dict().items()
                if not (name == "lm_head.weight" and source.config.tie_embeddings) and not name.startswith("rope_")}
    assert set(model.state) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(model.state[name], tensor, atol=0, rtol=0)


def test_qwen2_architecture_keeps_the_rotate_half_rows(tokenizer, tmp_path):
    """llama.cpp's converter reorders q/k rows for `llama` only; a `qwen2` file holds them as Hugging Face does."""
    source = make_run("tiny-llama", tokenizer, qkv_bias=True, tie_embeddings=True)
    llama = export_gguf(source, tmp_path / "llama.gguf", quant="f32")
    heads = {"attn_q": source.config.n_head, "attn_k": source.config.kv_heads}
    rotate_half = {}
    for tensor in gguf.GGUFReader(llama).tensors:
        kind = tensor.name.split(".")[-2]
        if kind in heads:
            rows = torch.from_numpy(np.array(tensor.data))
            rotate_half[tensor.name] = deinterleave_rope_rows(rows, heads[kind]).numpy()
    rewrite(llama, tmp_path / "qwen2.gguf", arch="qwen2", tensors=rotate_half)
    run = ownllm.load(str(tmp_path / "qwen2.gguf"))
    assert run.run_config["source"]["architecture"] == "qwen2"
    ids = tokenizer.encode(PROMPTS[2])
    assert_parity(logits(run.model, ids), logits(source.model, ids), layers=run.config.n_layer, what="qwen2 rows")


def test_transformers_gguf_loader_gives_the_same_tokens_and_logits(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    source = make_run("tiny-llama", tokenizer)
    path = export_gguf(source, tmp_path / "tiny.gguf", quant="f32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    run = ownllm.load(str(path))
    for text in [UNICODE_TEXT, *PROMPTS]:
        assert run.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
    ids = run.tokenizer.encode(UNICODE_TEXT)[:60]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert_parity(logits(run.model, ids), theirs, layers=run.config.n_layer, what="vs transformers' GGUF loader")


def sentencepiece_vocabulary(tmp_path) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) laid out as a Llama 2 GGUF holds them: <unk> <s> </s>, 256 byte tokens, then pieces
    with '▁' for spaces whose scores fall in the order their merges were learned."""
    from tokenizers import SentencePieceBPETokenizer

    from interop_helpers import python_docs

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator([python_docs(20_000)], vocab_size=400, show_progress=False)
    pieces = [token for token, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1]) if token != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def test_sentencepiece_vocabulary_reads_as_transformers_reads_it(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens, scores, types = sentencepiece_vocabulary(tmp_path)
    source = export_gguf(make_run("tiny-llama", tokenizer, vocab_size=len(tokens)), tmp_path / "bpe.gguf", "f32")

    def sentencepiece_keys(writer):
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(True)
        writer.add_unk_token_id(0)

    rewrite(source, tmp_path / "spm.gguf", add=sentencepiece_keys, drop=("tokenizer.ggml.merges",
                                                                         "tokenizer.ggml.pre"),
            fields={"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                    "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
                    "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True})
    ours = read_gguf(tmp_path / "spm.gguf").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert (ours.bos_id, ours.eot_id, ours.add_bos) == (1, 2, True)
    for text in [UNICODE_TEXT.replace("<|endoftext|>", "</s>"), *PROMPTS, " leading space", "x"]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ours.encode("naïve 東京 🤖")) == "naïve 東京 🤖"  # bytes the vocabulary lacks: <0xNN>


# ---- damaged and foreign files --------------------------------------------------------------------------------------

def rewrite(source, target, arch: str | None = None, fields: dict | None = None, tensors: dict | None = None,
            drop: tuple = (), add=None):
    """Copy a GGUF file, changing its architecture, some fields or some tensors (name -> numpy array), dropping
    fields, and adding what `add(writer)` writes."""
    reader = gguf.GGUFReader(source)
    old_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch or old_arch)
    if add is not None:
        add(writer)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        value = (fields or {}).get(name, field.contents())
        new_name = name.replace(f"{old_arch}.", f"{arch}.", 1) if arch else name
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(new_name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        replacement = (tensors or {}).get(tensor.name)
        if replacement is not None:
            writer.add_tensor(tensor.name, replacement)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def truncate(source, target):
    data = open(source, "rb").read()
    open(target, "wb").write(data[: len(data) * 2 // 3])


BREAKAGES = {
    "truncated file": (truncate, "truncated"),
    "unknown architecture": (lambda s, t: rewrite(s, t, arch="mamba"), "general.architecture='mamba'"),
    "unsupported tensor type": (lambda s, t: rewrite(s, t, tensors={"output_norm.weight": np.ones(32, np.int32)}),
                                "output_norm.weight has type I32"),
    "unknown tokenizer kind": (lambda s, t: rewrite(s, t, fields={"tokenizer.ggml.model": "bert"}),
                               "tokenizer.ggml.model='bert'"),
    "unknown pre-tokenizer": (lambda s, t: rewrite(s, t, fields={"tokenizer.ggml.pre": "klingon"}),
                              "tokenizer.ggml.pre='klingon'"),
    "sentencepiece vocabulary without scores": (
        lambda s, t: rewrite(s, t, fields={"tokenizer.ggml.model": "llama"}, drop=("tokenizer.ggml.merges",)),
        "tokenizer.ggml.scores is missing"),
}


@pytest.fixture(scope="module")
def good_gguf(tokenizer, tmp_path_factory):
    return export_gguf(make_run("tiny-llama", tokenizer), tmp_path_factory.mktemp("good") / "good.gguf", quant="q8_0")


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_bad_file_is_one_line_exit_2_and_nothing_written(breakage, good_gguf, tmp_path, capsys):
    damage, fragment = BREAKAGES[breakage]
    bad = tmp_path / "bad.gguf"
    damage(good_gguf, bad)
    capsys.readouterr()
    assert cli_main(["import", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ownllm: error: ") and err.count("\n") == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
    assert cli_main(["generate", str(bad), "--prompt", "x", "--device", "cpu"]) == 2


def test_import_writes_a_run_that_every_verb_reads(good_gguf, tmp_path, capsys):
    assert cli_main(["import", str(good_gguf), "--out", str(tmp_path / "run")]) == 0
    direct, imported = ownllm.load(str(good_gguf), quantize="none"), ownllm.load(str(tmp_path / "run"))
    ids = direct.tokenizer.encode(PROMPTS[2])
    torch.testing.assert_close(logits(imported.model, ids), logits(direct.model, ids), atol=0, rtol=0)
    assert imported.run_config["source"]["kind"] == "gguf"
    outputs = []
    for model in (str(good_gguf), str(tmp_path / "run")):
        capsys.readouterr()
        assert cli_main(["generate", model, "--prompt", "The", "--temperature", "0", "--max-new-tokens", "5",
                         "--device", "cpu", "--quantize", "none"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("The") and len(outputs[0]) > 4
    assert cli_main(["import", str(good_gguf), "--out", str(tmp_path / "run")]) == 2  # never over a run


def test_a_pooling_type_ownllm_lacks_is_ignored_with_a_warning(good_gguf, tmp_path, caplog):
    cls = tmp_path / "cls.gguf"
    rewrite(good_gguf, cls, add=lambda writer: writer.add_pooling_type(gguf.PoolingType.CLS))
    with caplog.at_level("WARNING", logger="ownllm.interop.readers.gguf"):
        run = ownllm.load(str(cls))
    assert "embedding_pooling" not in run.run_config
    assert "llama.pooling_type=2 is a pooling ownllm does not implement" in caplog.text
