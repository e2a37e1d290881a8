"""The GPT: causality, KV-cached decoding equal to full recompute, padding, presets, sizes."""

from __future__ import annotations

import pytest
import torch
from parity import assert_parity

from ownllm.config import PRESETS, ModelConfig, model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.model import GPT, flops_per_token

FLAVOURS = ["tiny", "tiny-llama"]


def make_model(preset: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config_from_preset(preset, vocab_size=97, **overrides)).eval()


@pytest.mark.parametrize("preset", FLAVOURS)
def test_changing_a_token_never_changes_earlier_logits(preset):
    model = make_model(preset)
    ids = torch.randint(0, 97, (2, 24))
    before = model(ids)
    for t in (0, 7, 23):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        after = model(changed)
        assert torch.equal(after[:, :t], before[:, :t])
        assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("preset", FLAVOURS)
def test_kv_cached_decoding_equals_full_recompute(preset):
    model = make_model(preset)
    ids = torch.randint(0, 97, (3, 30))
    full = model(ids)
    cache = model.new_cache(batch_size=3)
    pieces = [model(ids[:, :11], cache=cache)]  # prefill, then chunks of 1 and 5 tokens
    for t in range(11, 20):
        pieces.append(model(ids[:, t:t + 1], cache=cache))
    pieces.append(model(ids[:, 20:25], cache=cache))
    pieces.append(model(ids[:, 25:], cache=cache))
    assert_parity(torch.cat(pieces, dim=1), full, layers=model.config.n_layer, what="cached chunks vs full")
    assert cache.length == 30


@pytest.mark.parametrize("preset", FLAVOURS)
def test_left_padded_row_equals_the_row_alone(preset):
    model = make_model(preset)
    short = torch.randint(1, 97, (1, 9))
    long = torch.randint(1, 97, (1, 16))
    pad = 16 - 9
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    positions = torch.stack([torch.arange(16), torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(9)])])
    cache = model.new_cache(batch_size=2)
    cache.key_valid[1, :pad] = False
    out = model(batch, cache=cache, positions=positions)
    assert_parity(out[1, pad:], model(short)[0], layers=model.config.n_layer, what="padded row vs alone")
    assert_parity(out[0], model(long)[0], layers=model.config.n_layer, what="long row vs alone")


def test_llama_flavour_uses_rope_rmsnorm_swiglu_gqa_untied_head():
    model = make_model("tiny-llama")
    config = model.config
    assert model.pos_emb is None and config.kv_heads == 2 and config.n_head == 4
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.blocks[0].attn.qkv.weight.shape[0] == (4 + 2 * 2) * config.head_size
    assert model.blocks[0].mlp.fc.weight.shape[0] == 2 * config.mlp_size
    qwen = make_model("tiny-llama", qkv_bias=True)
    assert qwen.blocks[0].attn.qkv.bias is not None and qwen.blocks[0].attn.proj.bias is None


def test_gpt2_flavour_ties_embeddings_and_has_biases():
    model = make_model("tiny")
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.pos_emb is not None and model.blocks[0].mlp.fc.bias is not None


def test_gpt2_preset_has_gpt2_parameter_count():
    with torch.device("meta"):
        model = GPT(model_config_from_preset("gpt2"))
    assert model.num_params() == 124_439_808  # GPT-2 small, tied head, counted once
    assert model.num_params(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    assert flops_per_token(model) > 6 * 85e6


def test_residual_projections_have_scaled_init():
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("mini", n_layer=8, vocab_size=100))
    residual = model.blocks[0].attn.proj.weight.std().item()
    regular = model.blocks[0].attn.qkv.weight.std().item()
    assert abs(regular - 0.02) < 0.002
    assert abs(residual - 0.02 / (2 * 8) ** 0.5) < 0.001


def test_sequence_longer_than_context_is_refused():
    model = make_model("tiny")
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_presets_and_overrides():
    for name in PRESETS:
        model_config_from_preset(name)
    config = model_config_from_preset("mini", n_layer=3, dropout=0.1)
    assert (config.n_layer, config.n_embd, config.dropout) == (3, 384, 0.1)
    with pytest.raises(OwnLLMError, match="unknown model preset 'huge'"):
        model_config_from_preset("huge")
    with pytest.raises(OwnLLMError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_last_only_logits_equal_the_last_position_of_all_logits():
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])
