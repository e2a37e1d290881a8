"""Sampling: cached greedy decoding equals recompute, batched prompts equal single ones, filters, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.decoding import SamplingOptions, filter_logits, generate, generate_ids
from ownllm.model import GPT
from ownllm.tokenizer import char_tokenizer_from_text

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer_from_text(TEXT)


def make_model(preset: str, vocab_size: int, block_size: int = 64) -> GPT:
    torch.manual_seed(1)
    return GPT(model_config_from_preset(preset, vocab_size=vocab_size, block_size=block_size)).eval()


def greedy_by_recompute(model: GPT, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            window = ids[-model.config.block_size:]
            ids.append(int(model(torch.tensor([window]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_cached_greedy_equals_full_recompute(preset):
    model = make_model(preset, 50)
    prompt = [3, 14, 15, 9, 2, 6]
    got = generate_ids(model, [prompt], SamplingOptions(max_new_tokens=40, temperature=0))[0]
    assert got == greedy_by_recompute(model, prompt, 40)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_batched_prompts_of_different_lengths_equal_each_alone(preset):
    model = make_model(preset, 50)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    options = SamplingOptions(max_new_tokens=20, temperature=0)
    batched = generate_ids(model, prompts, options)
    for prompt, got in zip(prompts, batched):
        assert got == generate_ids(model, [prompt], options)[0]


def test_generation_past_the_context_window_keeps_going():
    model = make_model("tiny", 50, block_size=16)
    got = generate_ids(model, [[1, 2, 3]], SamplingOptions(max_new_tokens=40, temperature=0))[0]
    assert len(got) == 40


def test_seed_makes_sampling_reproducible(tokenizer):
    model = make_model("tiny", tokenizer.vocab_size)
    a = generate(model, tokenizer, "the", max_new_tokens=30, temperature=1.0, seed=7, stop_at_eot=False)
    b = generate(model, tokenizer, "the", max_new_tokens=30, temperature=1.0, seed=7, stop_at_eot=False)
    c = generate(model, tokenizer, "the", max_new_tokens=30, temperature=1.0, seed=8, stop_at_eot=False)
    assert a == b and a != c


def test_top_k_one_is_greedy(tokenizer):
    model = make_model("tiny", tokenizer.vocab_size)
    greedy = generate(model, tokenizer, "the", max_new_tokens=25, temperature=0, stop_at_eot=False)
    top1 = generate(model, tokenizer, "the", max_new_tokens=25, temperature=1.5, top_k=1, seed=3, stop_at_eot=False)
    assert greedy == top1


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_k=None, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    kept = ~torch.isinf(filter_logits(logits, top_k=None, top_p=0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the best token always stays


class ScriptedModel(GPT):
    """A GPT whose next token follows a fixed script, to test stopping rules exactly."""

    def __init__(self, vocab_size: int, script: list[int]) -> None:
        super().__init__(model_config_from_preset("tiny", vocab_size=vocab_size))
        self.script = script
        self.calls = 0

    def forward(self, ids, *, cache=None, positions=None, last_only=False, last_index=None):
        super().forward(ids, cache=cache, positions=positions)  # keep the cache bookkeeping real
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def test_stops_at_end_of_text_and_at_stop_strings_while_streaming(tokenizer):
    script = tokenizer.encode("over the lazy dog") + [tokenizer.eot_id] + tokenizer.encode("THE END")
    pieces: list[str] = []
    out = generate(ScriptedModel(tokenizer.vocab_size, script), tokenizer, "fox ", max_new_tokens=50,
                   temperature=0, on_text=lambda row, piece: pieces.append(piece))
    assert out == ["over the lazy dog"] and "".join(pieces) == out[0]

    pieces.clear()
    out = generate(ScriptedModel(tokenizer.vocab_size, script), tokenizer, "fox ", max_new_tokens=50,
                   temperature=0, stop=["lazy"], on_text=lambda row, piece: pieces.append(piece))
    assert out == ["over the "] and "".join(pieces) == "over the "


def test_bad_sampling_options_are_refused():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=-2)):
        with pytest.raises(OwnLLMError):
            SamplingOptions(**bad)


UNICODE = ("naïve café — 日本語のテキストを少し。 emoji 😀🎉👩‍👩‍👧 Ελληνικά κείμενο, русский текст, עברית, "
           "∑∫√∞ … «quotes» ß œ ﬁ 한국어 문장 ")


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    """A byte-level BPE with few merges: most multi-byte characters are split across tokens."""
    from ownllm.tokenizer import train_bpe

    corpus = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    corpus.write_text(UNICODE * 30 + TEXT * 30, encoding="utf-8")
    return train_bpe([corpus], vocab_size=300)


def _streamed(tokenizer, ids, stop=()):
    from ownllm.decoding import IncrementalText

    row = IncrementalText(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(row.add(token))
        if row.finished:
            break
    pieces.append(row.flush())
    return "".join(pieces), row.text


def test_incremental_text_equals_the_full_decode_on_unicode_text(small_bpe):
    ids = small_bpe.encode(UNICODE * 3)
    assert any("\ufffd" in small_bpe.decode([i]) for i in ids)  # characters really are split across tokens
    assert _streamed(small_bpe, ids) == (small_bpe.decode(ids),) * 2
    for stop in ["語の", "😀", "κείμενο", "ß œ"]:
        expected = small_bpe.decode(ids).split(stop, 1)[0]
        assert _streamed(small_bpe, ids, [stop, "never there"]) == (expected, expected)
    # random token ids: invalid UTF-8 (lone continuation bytes, cut characters) decodes as the full decode does
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, small_bpe.vocab_size, (60,), generator=generator).tolist()
        assert _streamed(small_bpe, ids) == (small_bpe.decode(ids),) * 2


def test_incremental_text_decodes_a_short_window_per_token(small_bpe):
    """O(new tokens) per token: no decode call sees the whole output."""
    from ownllm.decoding import IncrementalText

    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return small_bpe.decode(ids)

    ids = small_bpe.encode(UNICODE * 20)
    row = IncrementalText(Counting(), ["</s>"])
    text = "".join(row.add(token) for token in ids) + row.flush()
    assert text == small_bpe.decode(ids) and len(ids) > 1000
    assert max(lengths) <= 12 and len(lengths) <= 2 * len(ids) + 1
