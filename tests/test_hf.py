"""Hugging Face interop: tiny random GPT-2 / Llama / Qwen2 models made with `transformers` load in ownllm with the
same logits and greedy tokens; ownllm models export back to a directory transformers loads with the same logits;
bad checkpoints are one clear error (exit code 2 from the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (pip install -e ".[test]"): missing, the tests fail loudly
from interop_helpers import (PROMPTS, assert_same_logits, hf_greedy, hf_padded_logits, padded_logits, randomize,
                             small_bpe)
from safetensors.torch import load_file, save_file

import ownllm
from ownllm.cli import main as cli_main
from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.decoding import SamplingOptions, generate_ids
from ownllm.interop.readers.hf import import_hf
from ownllm.interop.writers.hf import export_hf, hf_model_type
from ownllm.model import GPT
from ownllm.runs import LoadedRun


NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_bpe(tmp_path_factory.mktemp("tok"))


def hf_model(kind: str, vocab_size: int, eos: int) -> torch.nn.Module:
    """A tiny random transformers model of each supported family, exercising the layout's corners."""
    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":  # grouped-query attention, untied head, a non-default rope_theta and norm eps
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, rope_theta=500.0, rms_norm_eps=1e-5, **common)
        model = transformers.LlamaForCausalLM(config)
    else:  # qwen2: qkv biases, an explicit head_dim (q is wider than the residual), one kv head, tied head
        config = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                          max_position_embeddings=64, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(config)
    return randomize(model, seed=len(kind))


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def hf_dir(request, tokenizer, tmp_path_factory):
    """(directory, transformers model): save_pretrained + our tokenizer.json, as a downloaded model looks."""
    model = hf_model(request.param, tokenizer.vocab_size, tokenizer.eot_id)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory, model


def rows_of(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(prompt) for prompt in PROMPTS]



# ---- import -------------------------------------------------------------------------------------------------------

def test_hf_directory_loads_with_equal_logits_on_a_padded_batch(hf_dir, tokenizer):
    directory, model = hf_dir
    run = ownllm.load(directory)
    rows = rows_of(run.tokenizer)
    assert rows == rows_of(tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(model, rows), rows, run.model.config.n_layer)
    assert run.tokenizer.eot_id == tokenizer.eot_id


def test_greedy_generation_equals_transformers_generate(hf_dir):
    directory, model = hf_dir
    run = ownllm.load(directory)
    rows = rows_of(run.tokenizer)
    ours = generate_ids(run.model, rows, SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0),
                        eot_id=run.tokenizer.eot_id)
    assert ours == hf_greedy(model, rows, run.tokenizer.eot_id, NEW_TOKENS)


def test_eos_token_id_outside_the_vocabulary_warns_and_loads_as_in_transformers(tokenizer, tmp_path, caplog):
    """GPT2Config's default eos 50256 on a small vocabulary (common in tiny test models): transformers loads it."""
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    assert config.eos_token_id == 50256
    model = randomize(transformers.GPT2LMHeadModel(config), seed=5)
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    with caplog.at_level("WARNING", logger="ownllm.interop.readers.hf"):
        run = ownllm.load(tmp_path)
    assert "eos_token_id 50256 is outside the tokenizer's vocabulary" in caplog.text
    assert run.tokenizer.eot_id == tokenizer.eot_id  # the tokenizer's own <|endoftext|>
    rows = rows_of(tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(model, rows), rows, run.model.config.n_layer)


def test_import_writes_a_run_that_generates_from_the_cli(hf_dir, tmp_path, capsys):
    directory, model = hf_dir
    out = import_hf(directory, tmp_path / "run")
    run = ownllm.load(out)
    assert run.run_config["format"] == "ownllm-run-v1" and run.run_config["source"]["kind"] == "huggingface"
    rows = rows_of(run.tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(model, rows), rows, run.model.config.n_layer)
    (tmp_path / "held-out.txt").write_text("for item in items:\n    print(item)\n" * 20, encoding="utf-8")
    for target in (directory, out):  # the HF directory itself works wherever a run does
        capsys.readouterr()
        assert cli_main(["generate", str(target), "--prompt", "def", "--max-new-tokens", "5",
                         "--temperature", "0", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.startswith("def")
        assert cli_main(["evaluate", str(target), "--text", str(tmp_path / "held-out.txt"), "--json",
                         "--device", "cpu"]) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_sharded_checkpoint_and_gpt2_vocab_merges_files(tokenizer, tmp_path):
    model = hf_model("gpt2", tokenizer.vocab_size, tokenizer.eot_id)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    from ownllm.tokenizer import save_gpt2_files

    save_gpt2_files(tokenizer, tmp_path)  # the old layout: vocab.json + merges.txt, no tokenizer.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    run = ownllm.load(tmp_path)
    rows = rows_of(run.tokenizer)
    assert rows == rows_of(tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(model, rows), rows, run.model.config.n_layer)


def test_eos_bos_and_chat_template_come_from_the_tokenizer_files(tokenizer, tmp_path):
    model = hf_model("llama", tokenizer.vocab_size + 2, tokenizer.eot_id)
    model.save_pretrained(tmp_path)
    tok = tokenizer.hf.__class__.from_str(tokenizer.hf.to_str())
    tok.add_special_tokens(["<s>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>", "add_bos_token": True,
         "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>"), 0]}))
    run = ownllm.load(tmp_path)
    assert run.tokenizer.eot_id == tok.token_to_id("<|im_end|>")  # generation_config wins, first of a list
    assert (run.tokenizer.bos_id, run.tokenizer.add_bos) == (tok.token_to_id("<s>"), True)
    assert run.tokenizer.chat_template == template
    out = import_hf(tmp_path, tmp_path / "run")  # kept through an import ...
    again = ownllm.load(out).tokenizer
    assert (again.eot_id, again.bos_id, again.chat_template) == (run.tokenizer.eot_id, run.tokenizer.bos_id, template)
    exported = export_hf(ownllm.load(out), tmp_path / "exported")  # ... and an export
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert (hf_tok.eos_token, hf_tok.bos_token) == ("<|im_end|>", "<s>")
    assert hf_tok.chat_template == template


# ---- export -------------------------------------------------------------------------------------------------------

def qwen2_like(vocab_size: int) -> GPT:
    return GPT(model_config_from_preset("tiny-llama", vocab_size=vocab_size, bias=False, qkv_bias=True,
                                        tie_embeddings=True))


@pytest.mark.parametrize("flavour", ["tiny", "tiny-llama", "qwen2-like", "llama-biases"])
def test_export_loads_in_transformers_with_equal_logits(flavour, tokenizer, tmp_path):
    vocab = tokenizer.vocab_size
    if flavour == "qwen2-like":
        model = qwen2_like(vocab)
    elif flavour == "llama-biases":  # attention biases and an MLP bias: HF llama's attention_bias and mlp_bias
        model = GPT(model_config_from_preset("tiny-llama", vocab_size=vocab, bias=True, mlp_bias=True))
    else:
        model = GPT(model_config_from_preset(flavour, vocab_size=vocab))
    randomize(model, seed=3)
    run = LoadedRun(path=tmp_path, model=model, tokenizer=tokenizer, config=model.config, run_config={})
    out = export_hf(run, tmp_path / "hf")
    expected = {"tiny": "gpt2", "tiny-llama": "llama", "qwen2-like": "qwen2", "llama-biases": "llama"}[flavour]
    assert json.loads((out / "config.json").read_text())["model_type"] == expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    rows = rows_of(tokenizer)
    assert_same_logits(padded_logits(model, rows), hf_padded_logits(hf, rows), rows, model.config.n_layer)
    back = ownllm.load(out)  # and the export reads back into ownllm unchanged
    assert_same_logits(padded_logits(back.model, rows), padded_logits(model, rows), rows, 0, exact=True)


def test_lora_adapters_are_folded_into_the_exported_weights(tokenizer, tmp_path):
    from ownllm.lora import LoRAConfig, apply_lora

    model = randomize(GPT(model_config_from_preset("tiny-llama", vocab_size=tokenizer.vocab_size)), seed=4)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("attn.qkv", "mlp.fc")))
    randomize(model, seed=5)  # non-zero B, so the adapters change the function
    run = LoadedRun(path=tmp_path, model=model.eval(), tokenizer=tokenizer, config=model.config, run_config={})
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    rows = rows_of(tokenizer)
    assert_same_logits(padded_logits(model, rows), hf_padded_logits(hf, rows), rows, model.config.n_layer)


def test_pretrained_run_with_its_own_bpe_exports_with_equal_tokens_and_logits(tmp_path):
    from interop_helpers import python_docs

    from ownllm.pretrain import pretrain

    (tmp_path / "docs.txt").write_text(python_docs(30_000), encoding="utf-8")
    pretrain(out=tmp_path / "run", data=tmp_path / "docs.txt", preset="tiny", vocab_size=300, max_steps=3,
             eval_interval=0, device="cpu", show_progress=False, precision="fp32")
    assert cli_main(["export", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    run = ownllm.load(tmp_path / "run")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "for x in range(10):\n    print(x)  # ünïcödé <|endoftext|> done"
    assert hf_tok(text)["input_ids"] == run.tokenizer.encode(text)
    assert hf_tok.decode(run.tokenizer.encode(text)) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    rows = rows_of(run.tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(hf, rows), rows, run.model.config.n_layer)


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    from ownllm.tokenizer import char_tokenizer_from_text

    tok = char_tokenizer_from_text("abc")
    model = GPT(model_config_from_preset("tiny", vocab_size=tok.vocab_size))
    run = LoadedRun(path=tmp_path, model=model, tokenizer=tok, config=model.config, run_config={})
    with pytest.raises(OwnLLMError, match="char tokenizer"):
        export_hf(run, tmp_path / "out")
    odd = model_config_from_preset("tiny", vocab_size=tok.vocab_size, norm="rmsnorm")
    with pytest.raises(OwnLLMError, match="no Hugging Face architecture"):
        hf_model_type(odd)
    assert not (tmp_path / "out").exists()


# ---- bad checkpoints ----------------------------------------------------------------------------------------------

def broken_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def edit_weights(directory: Path, change) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def edit_config(directory: Path, **values) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(values)
    (directory / "config.json").write_text(json.dumps(config))


def truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES = {
    "missing tensor": (lambda d: edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "model.layers.1.mlp.up_proj.weight"),
    "wrong shape": (lambda d: edit_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(7)})),
                    "norm.weight"),
    "unknown model_type": (lambda d: edit_config(d, model_type="mamba"), "model_type 'mamba'"),
    "rope scaling": (lambda d: edit_config(d, rope_parameters={"rope_type": "longrope", "factor": 4.0}),
                     "rope_parameters.rope_type='longrope'"),
    "truncated file": (truncate, "model.safetensors"),
    "extra tensor": (lambda d: edit_weights(d, lambda t: t.update({"model.layers.9.mlp.up.weight": torch.ones(2)})),
                     "model.layers.9.mlp.up.weight"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_bad_checkpoint_is_one_clear_error_and_exit_code_2(breakage, tokenizer, tmp_path, capsys):
    model = hf_model("llama", tokenizer.vocab_size, tokenizer.eot_id)
    model.save_pretrained(tmp_path / "good")
    tokenizer.save(tmp_path / "good")
    directory = broken_copy(tmp_path / "good", tmp_path / "bad")
    damage, fragment = BREAKAGES[breakage]
    damage(directory)
    with pytest.raises(OwnLLMError, match=None) as error:
        ownllm.load(directory)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    capsys.readouterr()
    assert cli_main(["generate", str(directory), "--prompt", "x", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("ownllm: error: ")
    assert cli_main(["import", str(directory), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_exported_tokenizer_starts_texts_with_bos_in_transformers_too(tokenizer, tmp_path):
    """A model whose prompts start with a begin-of-sequence token (Gemma, Llama): transformers' tokenizer of the
    export adds it as the model reads it (lm-evaluation-harness relies on that), ownllm's reading is unchanged."""
    from ownllm.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer.hf, eos_id=tokenizer.eot_id, bos_id=tokenizer.eot_id, add_bos=True)
    model = GPT(model_config_from_preset("tiny-llama", vocab_size=tok.vocab_size))
    export_hf(LoadedRun(path=tmp_path, model=model, tokenizer=tok, config=model.config, run_config={}),
              tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in PROMPTS:
        assert theirs(text)["input_ids"] == tok.starting_sequence(tok.encode(text))
    assert ownllm.load(tmp_path / "out").tokenizer.encode(PROMPTS[0]) == tok.encode(PROMPTS[0])
