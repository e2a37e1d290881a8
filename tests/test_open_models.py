"""The open models people fine-tune on a laptop today: Qwen3, Gemma 3, Llama 3.2 and SmolLM3. For each, a tiny
random model built from transformers' own config class with the family's distinctive options on (Qwen3: q/k norms
with a gain and YaRN scaling; Gemma 3: a sliding window shorter than the prompt, its own RoPE base on local layers,
linear scaling on global ones, final logit soft-capping; Llama 3.2: llama3 RoPE scaling; SmolLM3: a layer without RoPE) loads
in ownllm with transformers' logits and greedy tokens, exports to Hugging Face and back, writes to GGUF and reads
back, and takes a LoRA fine-tuning step. Options the one model class cannot compute are one line, exit code 2."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
import transformers
from finetune_helpers import instruction_records, write_json
from interop_helpers import (PROMPTS, assert_same_logits, hf_greedy, hf_padded_logits, padded_logits, randomize,
                             small_bpe)
from parity import assert_parity

import ownllm
from ownllm.cli import main as cli_main
from ownllm.decoding import SamplingOptions, generate_ids
from ownllm.errors import OwnLLMError
from ownllm.interop.readers.gguf import read_gguf
from ownllm.interop.readers.hf import import_hf
from ownllm.interop.writers.gguf import export_gguf
from ownllm.interop.writers.hf import export_hf

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 12
WINDOW = 4  # Gemma 3's sliding window: every prompt but the shortest is longer
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=128)


# The smallest shapes llama.cpp computes the same way: it fixes Gemma 3's local/global pattern (5:1) and SmolLM3's
# NoPE step (4) in its code, so those two have 6 and 4 layers; the others 2.
def family_model(family: str, vocab_size: int, eos: int) -> torch.nn.Module:
    """A tiny random transformers model of `family`, its distinctive options switched on."""
    common = dict(SMALL, vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=None)
    if family == "qwen3":  # q/k RMSNorms with a gain, untied head, YaRN long-context scaling
        config = transformers.Qwen3Config(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32})
        return randomize(transformers.Qwen3ForCausalLM(config), seed=3)
    if family == "gemma3":  # llama.cpp's Gemma 3: five local layers (window 4, RoPE base 10000), then a global one
        config = transformers.Gemma3TextConfig(**dict(common, num_hidden_layers=6), sliding_window=WINDOW,
                                               query_pre_attn_scalar=16, rope_parameters={
                                                   "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}})
        return randomize(transformers.Gemma3ForCausalLM(config), seed=4)
    if family == "gemma3-options":  # 2 layers with the options llama.cpp's gemma3 fixes otherwise: HF only
        config = transformers.Gemma3TextConfig(
            **common, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=30.0, attn_logit_softcapping=20.0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
        # (transformers' Gemma 3 leaves attn_logit_softcapping unused, as ownllm does)
        return randomize(transformers.Gemma3ForCausalLM(config), seed=7)
    if family == "llama3.2":  # Llama 3.2's llama3 frequency scaling (a short original context so every band shows)
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return randomize(transformers.LlamaForCausalLM(config), seed=5)
    assert family == "smollm3"  # every fourth layer without positional encoding (NoPE), as in SmolLM3-3B
    small = {k: v for k, v in common.items() if k != "head_dim"}
    config = transformers.SmolLM3Config(**dict(small, num_hidden_layers=4), no_rope_layer_interval=4,
                                        rope_parameters={"rope_type": "default", "rope_theta": 2e6})
    return randomize(transformers.SmolLM3ForCausalLM(config), seed=6)


FAMILIES = ["qwen3", "gemma3", "llama3.2", "smollm3"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_bpe(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tokenizer, tmp_path_factory):
    """(family, directory, transformers model): save_pretrained plus the tokenizer, as a downloaded model looks."""
    model = family_model(request.param, tokenizer.vocab_size, tokenizer.eot_id)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return request.param, directory, model


def prompt_rows(tokenizer) -> list[list[int]]:
    rows = [tokenizer.encode(prompt) for prompt in PROMPTS]
    assert max(len(row) for row in rows) > 3 * WINDOW
    return rows



def test_the_config_has_the_family_options(family_dir):
    family, directory, _ = family_dir
    config = ownllm.load(directory).config
    expected = {"qwen3": dict(qk_norm_gain=True, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 32}),
                "gemma3": dict(mlp="geglu", sandwich_norm=True, norm_offset=1.0, scale_embeddings=True,
                               local_layers=(0, 1, 2, 3, 4), sliding_window=WINDOW, local_rope_theta=10000.0,
                               rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                "llama3.2": dict(tie_embeddings=True, rope_scaling={
                    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}),
                "smollm3": dict(nope_layers=(3,), rope_theta=2e6)}[family]
    assert {key: getattr(config, key) for key in expected} == expected


def test_logits_equal_transformers_on_a_padded_batch_longer_than_the_window(family_dir, tokenizer):
    _, directory, model = family_dir
    run = ownllm.load(directory)
    rows = prompt_rows(tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(model, rows), rows, run.config.n_layer)


def test_greedy_generation_equals_transformers_generate(family_dir, tokenizer):
    _, directory, model = family_dir
    run = ownllm.load(directory)
    rows = prompt_rows(tokenizer)
    ours = generate_ids(run.model, rows, SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0),
                        eot_id=tokenizer.eot_id)
    assert ours == hf_greedy(model, rows, tokenizer.eot_id, NEW_TOKENS)
    assert any(len(row) == NEW_TOKENS for row in ours)  # decoding went well past the window


def test_export_to_hf_loads_in_transformers_and_reads_back_equal(family_dir, tokenizer, tmp_path):
    family, directory, _ = family_dir
    run = ownllm.load(directory)
    export_hf(run, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == {"gemma3": "gemma3_text", "llama3.2": "llama"}.get(family, family)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    rows = prompt_rows(tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(theirs, rows), rows, run.config.n_layer)
    back = ownllm.load(tmp_path / "out")
    assert back.config == run.config
    ours, again = run.model.state_dict(), back.model.state_dict()
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)


def test_gguf_write_and_read_back_equal(family_dir, tokenizer, tmp_path):
    family, directory, _ = family_dir
    run = ownllm.load(directory)
    path = export_gguf(run, tmp_path / "m.gguf", quant="f32")
    back = read_gguf(path)
    assert back.config.norm_eps == pytest.approx(run.config.norm_eps, rel=1e-6)  # GGUF keeps a float32
    assert dataclasses.replace(back.config, norm_eps=run.config.norm_eps) == run.config
    ours = run.model.state_dict()
    for name, tensor in back.state.items():
        assert_parity(tensor, ours[name], layers=0, what=name)
    loaded = ownllm.load(path)
    rows = prompt_rows(tokenizer)
    assert_same_logits(padded_logits(loaded.model, rows), padded_logits(run.model, rows), rows, run.config.n_layer)


def test_a_lora_fine_tuning_step_runs(family_dir, tmp_path):
    from ownllm.finetune import finetune_instruct

    _, directory, _ = family_dir
    base = import_hf(directory, tmp_path / "base")
    data = write_json(tmp_path / "ins.json", instruction_records(16))
    result = finetune_instruct(model=base, data=data, out=tmp_path / "lora", lora_rank=4, max_steps=2, batch_size=4,
                               lr=1e-2, eval_interval=0, log_interval=1, test_fraction=0.0, show_progress=False,
                               precision="fp32", final_eval=False)
    assert result.train.step == 2
    adapted = ownllm.load(tmp_path / "lora")
    base_state = ownllm.load(base).model.state_dict()
    changed = [name for name, tensor in adapted.model.state_dict().items()
               if name in base_state and not torch.equal(tensor, base_state[name])]
    assert changed == [] and any("lora_B" in name for name in adapted.model.state_dict())


def test_gemma3_options_llama_cpp_fixes_otherwise_load_equal_and_refuse_gguf(tokenizer, tmp_path):
    """A 2-layer Gemma 3 with a global layer after one local one, a local RoPE base of 100, query_pre_attn_scalar
    24 and a final logit soft-cap: transformers' logits; GGUF export refused in one line (llama.cpp would compute
    another function), HF export equal."""
    model = family_model("gemma3-options", tokenizer.vocab_size, tokenizer.eot_id)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    run = ownllm.load(tmp_path / "m")
    assert (run.config.local_layers, run.config.local_rope_theta, run.config.query_pre_attn_scalar,
            run.config.logit_softcap) == ((0,), 100.0, 24.0, 30.0)
    rows = prompt_rows(tokenizer)
    assert_same_logits(padded_logits(run.model, rows), hf_padded_logits(model, rows), rows, run.config.n_layer)
    with pytest.raises(OwnLLMError, match="llama.cpp's gemma3 fixes five local layers of every six"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    export_hf(run, tmp_path / "hf")
    assert ownllm.load(tmp_path / "hf").config == run.config


REFUSALS = {
    "mixture of experts": (dict(num_experts=8), "num_experts=8"),
    "vision tower": (dict(vision_config={"hidden_size": 32}), "vision_config"),
    "unknown rope": (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_type='longrope'"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_options_the_model_cannot_compute_are_one_line_and_exit_2(refusal, tokenizer, tmp_path, capsys):
    model = family_model("qwen3", tokenizer.vocab_size, tokenizer.eot_id)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    values, fragment = REFUSALS[refusal]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **values}))
    with pytest.raises(OwnLLMError) as error:
        ownllm.load(tmp_path / "m")
    assert fragment in str(error.value) and "\n" not in str(error.value)
    capsys.readouterr()
    assert cli_main(["import", str(tmp_path / "m"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ownllm: error: ") and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_qwen3_embedding_pools_the_last_token_after_its_query_instruction(tokenizer, tmp_path, capsys):
    """A Qwen3-Embedding-style directory (a bare Qwen3Model, Sentence Transformers files: last-token pooling, an
    instruction before queries, the end-of-text token appended by the tokenizer): ownllm's vectors are
    transformers' hidden state at that last token, for queries (with the instruction) and documents (without)."""
    from tokenizers.processors import TemplateProcessing

    from ownllm.embeddings import embed_texts

    config = transformers.Qwen3Config(**dict(SMALL, vocab_size=tokenizer.vocab_size), tie_word_embeddings=True)
    model = randomize(transformers.Qwen3Model(config), seed=8)
    model.save_pretrained(tmp_path / "emb")
    hf_tok = tokenizer.hf.__class__.from_str(tokenizer.hf.to_str())
    eot = tokenizer.token(tokenizer.eot_id)
    hf_tok.post_processor = TemplateProcessing(single=f"$A {eot}", special_tokens=[(eot, tokenizer.eot_id)])
    hf_tok.save(str(tmp_path / "emb" / "tokenizer.json"))
    instruction = "Instruct: Given a question, retrieve passages that answer it\nQuery:"
    write_json(tmp_path / "emb" / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    (tmp_path / "emb" / "1_Pooling").mkdir()
    write_json(tmp_path / "emb" / "1_Pooling" / "config.json", {"pooling_mode_lasttoken": True})
    write_json(tmp_path / "emb" / "config_sentence_transformers.json",
               {"prompts": {"query": instruction, "document": ""}})
    run = ownllm.load(tmp_path / "emb")
    texts = PROMPTS
    for role, prefix in (("query", instruction), ("document", "")):
        ours = embed_texts(run, texts, role=role).vectors
        rows = [hf_tok.encode(prefix + text).ids for text in texts]
        assert all(row[-1] == tokenizer.eot_id for row in rows)
        with torch.no_grad():
            theirs = torch.stack([model(torch.tensor([row])).last_hidden_state[0, -1] for row in rows])
        assert_parity(ours, torch.nn.functional.normalize(theirs, dim=-1), layers=2, what=f"{role} vectors")
    lines = [text.replace("\n", " ") for text in texts]
    (tmp_path / "q.txt").write_text("\n".join(lines), encoding="utf-8")
    assert cli_main(["embed", str(tmp_path / "emb"), "--input", str(tmp_path / "q.txt"), "--output",
                     str(tmp_path / "q.jsonl"), "--as", "query", "--device", "cpu"]) == 0
    written = [json.loads(line)["embedding"] for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert_parity(torch.tensor(written), embed_texts(run, lines, role="query").vectors, layers=0, what="CLI")
    assert "last pooling" in capsys.readouterr().err


def test_the_server_engine_decodes_each_family_as_generate_does(family_dir, tokenizer):
    """Continuous batching (rows of different lengths in one slot pool, each under its own sliding-window mask)
    gives every request the tokens it gets decoded alone."""
    from ownllm.serve.engine import Engine

    _, directory, _ = family_dir
    run = ownllm.load(directory)
    rows = prompt_rows(tokenizer)
    budgets = [NEW_TOKENS, 5, 9]
    engine = Engine(run.model, run.tokenizer, max_batch=3, max_queue=3).start()
    try:
        requests = [engine.submit(row, SamplingOptions(max_new_tokens=budget, temperature=0), lambda event: None)
                    for row, budget in zip(rows, budgets)]
        deadline = time.monotonic() + 60
        while not all(request.finished for request in requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        outputs = [request.output for request in requests]
    finally:
        engine.close()
    for row, budget, output in zip(rows, budgets, outputs):
        assert output == generate_ids(run.model, [row], SamplingOptions(max_new_tokens=budget, temperature=0),
                                      eot_id=tokenizer.eot_id)[0]


def test_a_gemma3_image_text_checkpoint_loads_its_language_model(tokenizer, tmp_path, caplog):
    """model_type gemma3 (Gemma3ForConditionalGeneration: a SigLIP vision tower, a projector and the language model
    under a prefix): ownllm reads the language model, with a warning, and gives transformers' text-only logits."""
    text = transformers.Gemma3TextConfig(**dict(SMALL, vocab_size=tokenizer.vocab_size), sliding_window=WINDOW)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    top = tokenizer.vocab_size - 1
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=top, boi_token_index=top - 2, eoi_token_index=top - 1)
    model = randomize(transformers.Gemma3ForConditionalGeneration(config), seed=9)
    model.save_pretrained(tmp_path / "mm")
    tokenizer.save(tmp_path / "mm")
    run = ownllm.load(tmp_path / "mm")
    assert "vision tower out" in caplog.text
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])])
    with torch.no_grad():
        assert_parity(run.model(ids), model(input_ids=ids).logits, layers=2, what="language model logits")
