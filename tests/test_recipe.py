"""The speedrun recipe options (ReLU^2, QK-norm, zero-init projections, untied head, logit soft-cap, Muon): each
trains on real text, resumes bit for bit, and exports or refuses; --precision/--compile auto are measured and
recorded in the run's config.json; --max-minutes ends with an evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from interop_helpers import assert_same_logits, hf_padded_logits, padded_logits, python_docs, randomize, small_bpe
from safetensors.torch import load_file

from ownllm import probe
from ownllm.checkpoint import read_run_config
from ownllm.runs import LoadedRun
from ownllm.config import TrainConfig, model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.interop.writers.gguf import export_gguf
from ownllm.interop.writers.hf import export_hf
from ownllm.model import GPT
from ownllm.optim import MuonWithAdamW, make_optimizer
from ownllm.pretrain import pretrain

OPTIONS = {  # one recipe option each, on the tiny GPT-2 flavour; "muon" is the optimizer
    "relu2": ({"mlp": "relu2"}, {}),
    "qk_norm": ({"qk_norm": True}, {}),
    "zero_init_proj": ({"zero_init_proj": True}, {}),
    "untied": ({"tie_embeddings": False}, {}),
    "softcap": ({"logit_softcap": 10.0}, {}),
    "muon": ({}, {"optimizer": "muon", "muon_lr": 0.02}),
}
ALL_ON = ({"mlp": "relu2", "qk_norm": True, "zero_init_proj": True, "tie_embeddings": False, "logit_softcap": 10.0,
           "position": "rope", "norm": "rmsnorm", "bias": False}, {"optimizer": "muon", "muon_lr": 0.02})
SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "docs.txt"
    path.write_text(python_docs(40_000), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OWNLLM_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


def _train(corpus: Path, out: Path, model: dict, train: dict, **extra) -> object:
    values = dict(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=40, eval_steps=2,
                  log_interval=5, precision="fp32", compile=False)
    values.update(train)
    values.update(extra)
    return pretrain(out=out, data=corpus, preset="tiny", tokenizer="char", show_progress=False,
                    model_overrides={**SMALL, **model}, **values)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_and_the_loss_falls_on_real_text(option, corpus, tmp_path, one_thread):
    model, train = OPTIONS[option]
    result = _train(corpus, tmp_path / "run", model, train)
    rows = _rows(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.8, rows
    config = read_run_config(tmp_path / "run")["model"]
    assert result.val_loss is not None and result.val_loss < math.log(config["vocab_size"]) - 0.8  # from uniform
    assert all(config[k] == v for k, v in model.items())


def test_options_change_the_model_as_described():
    base = dict(vocab_size=40, **SMALL)
    torch.manual_seed(0)
    zero = GPT(model_config_from_preset("tiny", zero_init_proj=True, **base))
    assert all(not b.attn.proj.weight.any() and not b.mlp.proj.weight.any() for b in zero.blocks)
    ids = torch.randint(0, 40, (2, 16))
    capped = randomize(GPT(model_config_from_preset("tiny", logit_softcap=2.0, **base)), std=1.0)
    raw = torch.nn.functional.linear(capped.hidden_states(ids), capped.lm_head.weight)
    assert raw.abs().max() > 4.0 and capped(ids).abs().max() <= 2.0
    assert torch.allclose(capped(ids), 2.0 * torch.tanh(raw / 2.0))
    untied = GPT(model_config_from_preset("tiny", tie_embeddings=False, **base))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    plain = randomize(GPT(model_config_from_preset("tiny", **base)), seed=1)
    normed = GPT(model_config_from_preset("tiny", qk_norm=True, **base))
    normed.load_state_dict(plain.state_dict())
    assert not torch.allclose(plain(ids), normed(ids))  # same weights, different attention
    relu2 = GPT(model_config_from_preset("tiny", mlp="relu2", **base))
    x = torch.randn(3, 32)
    mlp = relu2.blocks[0].mlp
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = GPT(model_config_from_preset("tiny", vocab_size=40, tie_embeddings=False, **SMALL))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight"} <= adamw and not muon & adamw
    assert muon | adamw == set(names.values())
    assert all(g["lr_scale"] == pytest.approx(20) for g in optimizer.muon.param_groups)


def test_resume_with_every_option_on_is_bit_identical(corpus, tmp_path, one_thread):
    model, train = ALL_ON
    _train(corpus, tmp_path / "a", model, train, max_steps=16, eval_interval=8)
    _train(corpus, tmp_path / "b", model, train, max_steps=16, eval_interval=8, stop_at=8)
    state = torch.load(tmp_path / "b" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["muon"]["state"]  # Muon's momentum buffers are in the checkpoint
    pretrain(out=tmp_path / "b", resume=True, show_progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["step"], r["train_loss"], r.get("val_loss")) for r in _rows(tmp_path / run)] for run in "ab"]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("option", ["zero_init_proj", "untied"])
def test_expressible_options_export_to_hf_with_equal_logits(option, tmp_path):
    tokenizer = small_bpe(tmp_path)
    for flavour in ("tiny", "tiny-llama"):
        model = GPT(model_config_from_preset(flavour, vocab_size=tokenizer.vocab_size, **OPTIONS[option][0]))
        randomize(model, seed=2)
        run = LoadedRun(path=tmp_path, model=model, tokenizer=tokenizer, config=model.config, run_config={})
        hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / flavour)).eval()
        rows = [tokenizer.encode("def main():\n    return x"), tokenizer.encode("The class")]
        assert_same_logits(padded_logits(model, rows), hf_padded_logits(hf, rows), rows, model.config.n_layer)


@pytest.mark.parametrize("option,flag", [("relu2", "--mlp relu2"), ("qk_norm", "--qk-norm"),
                                         ("softcap", "--logit-softcap")])
def test_inexpressible_options_refuse_export_naming_the_option(option, flag, tmp_path):
    tokenizer = small_bpe(tmp_path)
    model = GPT(model_config_from_preset("tiny-llama", vocab_size=tokenizer.vocab_size, **OPTIONS[option][0]))
    run = LoadedRun(path=tmp_path, model=model, tokenizer=tokenizer, config=model.config, run_config={})
    for export, out in ((export_hf, tmp_path / "hf"), (export_gguf, tmp_path / "m.gguf")):
        with pytest.raises(OwnLLMError, match=f"uses {flag}"):
            export(run, out)
        assert not out.exists()


def test_cli_flags_record_the_recipe_and_the_measured_speed_choice(corpus, tmp_path):
    run = tmp_path / "run"
    env_args = ["pretrain", "--data", str(corpus), "--out", str(run), "--model", "tiny", "--vocab-size", "300",
                "--n-embd", "32", "--block-size", "32", "--max-steps", "6", "--eval-interval", "6",
                "--eval-steps", "1", "--batch-size", "4", "--mlp", "relu2", "--qk-norm", "--zero-init-proj",
                "--no-tie-embeddings", "--logit-softcap", "12", "--optimizer", "muon", "--precision", "auto",
                "--compile", "auto"]
    done = subprocess.run([sys.executable, "-m", "ownllm", *env_args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "peak memory" in done.stdout
    config = read_run_config(run)
    assert {k: config["model"][k] for k in ("mlp", "qk_norm", "zero_init_proj", "tie_embeddings",
                                            "logit_softcap")} == {"mlp": "relu2", "qk_norm": True,
                                                                  "zero_init_proj": True, "tie_embeddings": False,
                                                                  "logit_softcap": 12.0}
    assert config["train"]["optimizer"] == "muon"
    speed = config["speed"]
    assert speed["asked"] == {"precision": "auto", "compile": "auto"}
    assert speed["precision"] in ("fp32", "bf16") and speed["compile"] is False  # 6 tiny steps: never pays
    assert "fp32" in speed["step_ms"] and speed["step_ms"]["fp32"] > 0  # measured, not assumed
    refused = subprocess.run([sys.executable, "-m", "ownllm", "export", str(run), "--to", "hf", "--out",
                              str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--mlp relu2" in refused.stderr


def test_auto_choice_is_measured_cached_and_leaves_the_rng_alone(monkeypatch):
    config = model_config_from_preset("tiny", vocab_size=40, **SMALL)
    train = TrainConfig(batch_size=4, precision="auto", compile="auto", max_steps=10)
    monkeypatch.setattr(probe, "cpu_has_native_bf16", lambda: True)  # both arms, whatever this CPU has
    calls = []
    real = probe._time_steps
    monkeypatch.setattr(probe, "_time_steps", lambda *a: calls.append(a[3:5]) or real(*a))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = probe.choose_speed(config, train, torch.device("cpu"), planned_steps=10)
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(calls) == [("bf16", False), ("fp32", False)] and "measured now" in first.reason
    second = probe.choose_speed(config, train, torch.device("cpu"), planned_steps=10)
    assert len(calls) == 2 and "cached" in second.reason  # no new measurement
    assert (second.precision, second.compile) == (first.precision, first.compile) and first.compile is False
    expected = "bf16" if first.step_ms["bf16"] < 0.9 * first.step_ms["fp32"] else "fp32"
    assert first.precision == expected
    # a long run probes compilation too, and compiles only when the measured times say it pays back
    monkeypatch.setattr(probe, "_time_steps",
                        lambda m, t, d, p, compiled, seq_len=None: (0.01, 5.0) if compiled else (0.05, 0.1))
    long = probe.choose_speed(config, TrainConfig(batch_size=8, compile="auto", precision="fp32", max_steps=10_000),
                              torch.device("cpu"), planned_steps=10_000)
    assert long.compile is True and long.step_ms["fp32+compile"] == 10
    short = probe.choose_speed(config, TrainConfig(batch_size=8, compile="auto", precision="fp32", max_steps=10_000,
                                                   max_minutes=0.1), torch.device("cpu"), planned_steps=10_000)
    assert short.compile is False  # 6 s of training cannot pay back 5 s of compilation


def test_the_probe_times_the_length_a_run_trains_on_not_the_whole_context(monkeypatch):
    # SmolLM2's window is 8,192 tokens: timing batches that long at batch 8 took 24 GB before a fine-tuning started
    config = model_config_from_preset("tiny", vocab_size=40, **{**SMALL, "block_size": 512})
    train = TrainConfig(batch_size=2, precision="fp32", compile="auto", max_steps=10)
    shapes = []
    monkeypatch.setattr(probe, "_read_cache", lambda: {})
    monkeypatch.setattr(probe, "_write_cache", lambda key, value: None)
    monkeypatch.setattr(probe.torch, "randint", lambda low, high, shape, **kw: shapes.append(shape) or
                        torch.zeros(shape, dtype=torch.long))
    choice = probe.choose_speed(config, train, torch.device("cpu"), planned_steps=10, seq_len=24)
    assert shapes and all(shape == (2, 24) for shape in shapes)
    assert "batches of 2 x 24 tokens" in choice.reason
    shapes.clear()
    assert "2 x 512 tokens" in probe.choose_speed(config, train, torch.device("cpu"), planned_steps=10).reason
    assert shapes and all(shape == (2, 512) for shape in shapes)  # pretraining: its batches fill the context


def test_max_minutes_ends_the_run_with_a_final_evaluation(corpus, tmp_path, one_thread):
    result = _train(corpus, tmp_path / "run", {}, {}, max_steps=100_000, eval_interval=50_000, max_minutes=0.02)
    assert result.stopped_early and result.val_loss is not None
    assert _rows(tmp_path / "run")[-1]["step"] == result.step and "val_loss" in _rows(tmp_path / "run")[-1]
    assert result.peak_memory_mb > 10
