"""Checkpoints: safetensors round trip, tied weights, compiled-model names, atomic swap and its fallback."""

from __future__ import annotations

import os

import pytest
import torch

from ownllm import checkpoint
from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.model import GPT


def make_model(seed: int, preset: str = "tiny") -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config_from_preset(preset, vocab_size=40))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_weights_round_trip_exactly(tmp_path, preset):
    source, target = make_model(1, preset), make_model(2, preset)
    checkpoint.save_weights(source, tmp_path / "w.safetensors")
    checkpoint.load_weights(target, tmp_path / "w.safetensors")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    if preset == "tiny":  # tied head stored once, still tied after loading
        assert "lm_head.weight" not in checkpoint.weights_state_dict(source)
        assert target.lm_head.weight is target.tok_emb.weight


def test_weights_saved_from_a_compiled_model_load_into_a_plain_one(tmp_path):
    source = make_model(1)
    prefixed = {f"_orig_mod.{k}": v for k, v in checkpoint.weights_state_dict(source).items()}
    from safetensors.torch import save_file

    save_file(prefixed, str(tmp_path / "w.safetensors"))
    target = make_model(2)
    checkpoint.load_weights(target, tmp_path / "w.safetensors")
    assert torch.equal(target.tok_emb.weight, source.tok_emb.weight)


def test_mismatched_or_corrupt_weights_are_clear_errors(tmp_path):
    checkpoint.save_weights(make_model(1), tmp_path / "w.safetensors")
    other = GPT(model_config_from_preset("tiny", vocab_size=41))
    with pytest.raises(OwnLLMError, match="tok_emb.weight has shape"):
        checkpoint.load_weights(other, tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(OwnLLMError, match="corrupt"):
        checkpoint.load_weights(make_model(1), tmp_path / "bad.safetensors")


def test_checkpoint_swap_keeps_a_readable_checkpoint_at_every_moment(tmp_path):
    model = make_model(1)
    rng = torch.get_rng_state()
    checkpoint.save_checkpoint(tmp_path, model, {"optimizer": {}, "rng_cpu": rng}, {"step": 1})
    assert (tmp_path / "model.safetensors").is_file()
    # A kill between the two renames leaves only checkpoint.old: loading falls back to it.
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()  # and a half-written new one, which is ignored
    state, info = checkpoint.load_checkpoint(tmp_path, make_model(3))
    assert info["step"] == 1 and torch.equal(state["rng_cpu"], rng)
    checkpoint.save_checkpoint(tmp_path, model, {"optimizer": {}, "rng_cpu": torch.get_rng_state()}, {"step": 2})
    assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()
    assert checkpoint.load_checkpoint(tmp_path, make_model(3))[1]["step"] == 2


def test_trainer_state_is_read_without_pickle_code_execution(tmp_path):
    model = make_model(1)
    checkpoint.save_checkpoint(tmp_path, model, {"optimizer": {}, "rng_cpu": torch.get_rng_state()}, {"step": 1})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    torch.save({"evil": Evil()}, tmp_path / "checkpoint" / "trainer_state.pt")
    with pytest.raises(OwnLLMError, match="unreadable trainer state"):
        checkpoint.load_checkpoint(tmp_path, make_model(1))
