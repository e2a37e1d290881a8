"""Serving an imported Hugging Face model: its own Jinja chat template, bos and eos, answered like transformers."""

from __future__ import annotations

import json

import torch
import transformers
from openai import OpenAI

from interop_helpers import randomize, small_bpe
from serve_helpers import serve_in_thread

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_hf_chat_template_prompt_and_greedy_answer_match_transformers(tmp_path):
    import ownllm
    from ownllm.serve.app import create_app

    base = small_bpe(tmp_path)
    tok = base.hf.__class__.from_str(base.hf.to_str())
    tok.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    im_end, bos = tok.token_to_id("<|im_end|>"), tok.token_to_id("<s>")
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=bos, eos_token_id=im_end)
    model = randomize(transformers.LlamaForCausalLM(config), std=0.1)
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt[0] == bos and prompt.count(bos) == 1
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=im_end,
                             pad_token_id=0)[0, len(prompt):].tolist()
    expected = hf_tok.decode(out[: out.index(im_end)] if im_end in out else out)
    assert len(expected) > 5  # a real answer to compare, not an immediate end

    with serve_in_thread(create_app(ownllm.load(tmp_path), model_name="hf")) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="hf", messages=messages, max_tokens=20, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt)  # the same rendered and tokenized prompt as transformers
    assert reply.choices[0].message.content == expected  # the same greedy tokens, stopped at <|im_end|>
    assert reply.choices[0].finish_reason == ("stop" if im_end in out else "length")
