"""LoRA: init equals the base, only adapters (and a head) train, merged equals unmerged, the PEFT layout (with
fused projections split exactly), resume, and merge-lora from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_helpers import (instruction_records, run_cli, sentiment_lines, write_json)
from parity import assert_parity
from ownllm.runs import load_run
from ownllm.config import model_config_from_preset
from ownllm.finetune import finetune_classify, finetune_instruct
from ownllm.lora import (LoRAConfig, LoRALinear, apply_lora, from_peft_tensors, hf_target_modules,
                         load_peft_adapter, lora_tensors, merge_lora, save_peft_adapter, to_peft_tensors)
from ownllm.model import GPT


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.05)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_at_init_the_adapted_model_equals_the_base(preset):
    torch.manual_seed(0)
    model = GPT(model_config_from_preset(preset, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 16))
    before = model(ids)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    assert len(wrapped) == 4 * model.config.n_layer
    assert torch.equal(model(ids), before)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    # the base keeps its tensor names, so its weights load into the adapted model as they are
    assert "blocks.0.attn.qkv.weight" in model.state_dict()


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_merged_and_unmerged_outputs_match(preset):
    torch.manual_seed(0)
    model = GPT(model_config_from_preset(preset, vocab_size=64)).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=("attn.qkv", "mlp.fc", "mlp.proj")))
    _randomise_adapters(model)
    ids = torch.randint(0, 64, (2, 16))
    unmerged = model(ids)
    assert merge_lora(model) == 3 * model.config.n_layer
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert_parity(model(ids), unmerged, layers=model.config.n_layer, what="merged vs unmerged")


def test_peft_names_and_the_exact_split_of_fused_projections(tmp_path):
    torch.manual_seed(0)
    llama = GPT(model_config_from_preset("tiny-llama", vocab_size=64))
    config = LoRAConfig(rank=4, alpha=8)
    apply_lora(llama, config)
    _randomise_adapters(llama)
    ours = lora_tensors(llama)
    peft = to_peft_tensors(ours, llama.config)
    prefix = "base_model.model.model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"):
        assert f"{prefix}{name}.lora_A.weight" in peft and f"{prefix}{name}.lora_B.weight" in peft
    # q, k, v share A and take their rows of B: each adapter's update is exactly its rows of the fused update
    fused = llama.blocks[0].attn.qkv.delta()
    q_rows = llama.config.n_head * llama.config.head_size
    q_delta = peft[f"{prefix}self_attn.q_proj.lora_B.weight"] @ peft[f"{prefix}self_attn.q_proj.lora_A.weight"]
    v_delta = peft[f"{prefix}self_attn.v_proj.lora_B.weight"] @ peft[f"{prefix}self_attn.v_proj.lora_A.weight"]
    torch.testing.assert_close(q_delta * config.scaling, fused[:q_rows])
    torch.testing.assert_close(v_delta * config.scaling, fused[-v_delta.shape[0]:])
    back = from_peft_tensors(peft, llama.config, config.targets, llama.config.n_layer, Path("x"))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    save_peft_adapter(llama, config, tmp_path, base="llama-base")  # written and read back through the files
    fresh = GPT(llama.config)
    fresh.load_state_dict(llama.state_dict(), strict=False)
    apply_lora(fresh, config)
    load_peft_adapter(fresh, config, tmp_path)
    assert all(torch.equal(lora_tensors(fresh)[k], ours[k]) for k in ours)
    assert hf_target_modules(llama.config, ("attn.qkv",)) == ["self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj"]
    gpt2 = GPT(model_config_from_preset("tiny", vocab_size=64))
    apply_lora(gpt2, LoRAConfig(rank=2, targets=("attn.qkv", "mlp.proj")))
    assert sorted(to_peft_tensors(lora_tensors(gpt2), gpt2.config))[:2] == [
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]


def test_lora_classifier_trains_only_adapters_and_head_and_merges(base, tmp_path):
    data = tmp_path / "reviews.tsv"
    data.write_text("\n".join(sentiment_lines(200, seed=1)) + "\n", encoding="utf-8")
    run = tmp_path / "lora-clf"
    result = finetune_classify(out=run, model=base, data=data, lora_rank=8, show_progress=False, max_steps=80,
                               batch_size=16, lr=2e-3, eval_interval=40, precision="fp32")
    assert result.train.train_loss < 0.5 and result.test["accuracy"] >= 0.75
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16 and adapter_config["fan_in_fan_out"]
    assert adapter_config["modules_to_save"] == ["score"] and adapter_config["task_type"] == "SEQ_CLS"
    saved = load_file(str(run / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in saved
    assert all(".lora_" in k or k.endswith("score.weight") for k in saved)
    assert not (run / "model.safetensors").exists()  # the base is not copied
    checkpointed = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert set(checkpointed) == {k for k in checkpointed if "lora_" in k or k == "score.weight"}

    adapted, plain = load_run(run), load_run(base)
    base_state = plain.model.state_dict()
    for name, tensor in adapted.model.state_dict().items():
        if "lora_" in name or name.startswith("score."):
            continue
        assert torch.equal(tensor, base_state[name]), name  # the base did not move
    assert any(m.lora_B.abs().sum() > 0 for m in adapted.model.modules() if isinstance(m, LoRALinear))

    merged_dir = tmp_path / "merged"
    merge = run_cli("merge-lora", run, "--out", merged_dir)
    assert merge.returncode == 0, merge.stderr
    merged = load_run(merged_dir)
    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert "lora" not in merged_config and merged_config["task"] == "classify"
    assert (merged_dir / "model.safetensors").is_file()
    ids, lengths = torch.randint(0, 300, (3, 20)), torch.tensor([20, 7, 1])
    with torch.no_grad():
        assert_parity(merged.model(ids, lengths), adapted.model(ids, lengths), layers=merged.config.n_layer,
                      what="merge-lora run vs adapted run")


def test_lora_instruct_run_resumes_exactly(base, tmp_path):
    data = write_json(tmp_path / "ins.json", instruction_records(48))
    common = dict(model=base, data=data, lora_rank=4, lora_targets=("attn.qkv", "mlp.fc"), show_progress=False,
                  max_steps=12, batch_size=4, lr=3e-3, eval_interval=6, log_interval=2, test_fraction=0.0,
                  dropout=0.1, precision="fp32")
    straight = finetune_instruct(out=tmp_path / "a", **common)
    finetune_instruct(out=tmp_path / "b", stop_at=6, **common)
    resumed = finetune_instruct(out=tmp_path / "b", resume=True, show_progress=False)
    assert resumed.train.step == straight.train.step == 12
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [(r["step"], r["train_loss"], r.get("val_loss"))  # noqa: E731
                          for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
