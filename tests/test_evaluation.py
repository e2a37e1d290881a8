"""Held-out evaluation: loss equals a direct computation, perplexity and bits per byte follow from it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.evaluation import evaluate_text
from ownllm.model import GPT
from ownllm.tokenizer import char_tokenizer_from_text


def test_loss_perplexity_and_bits_per_byte(tmp_path):
    text = "héllo wörld, a small text to score. " * 6  # non-ASCII: bytes differ from characters
    tokenizer = char_tokenizer_from_text(text)
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32)).eval()
    path = tmp_path / "held.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate_text(model, tokenizer, path, batch_size=3)

    ids = torch.tensor(tokenizer.encode(text))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):  # every token after the first, in 32-token windows
            piece = ids[start:start + 33]
            logits = model(piece[None, :-1])[0]
            total += F.cross_entropy(logits, piece[1:], reduction="sum").item()
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-6)
    assert result.bytes == len(text.encode("utf-8")) - 1
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / result.bytes, rel=1e-5)


def test_too_little_text_is_an_error(tmp_path):
    tokenizer = char_tokenizer_from_text("ab")
    model = GPT(model_config_from_preset("tiny", vocab_size=tokenizer.vocab_size))
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(OwnLLMError, match="one.txt"):
        evaluate_text(model, tokenizer, tmp_path / "one.txt")


def test_characters_a_char_tokenizer_never_saw_count_as_a_uniform_guess(tmp_path):
    known = "a small text to score. " * 6
    tokenizer = char_tokenizer_from_text(known)
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32)).eval()
    (tmp_path / "known.txt").write_text(known, encoding="utf-8")
    (tmp_path / "new.txt").write_text(known.replace("small", "smäll ☃"), encoding="utf-8")  # 2 unseen, 6 times
    plain = evaluate_text(model, tokenizer, tmp_path / "known.txt")
    result = evaluate_text(model, tokenizer, tmp_path / "new.txt")

    # the model reads the same ids as for the known text plus the spaces; each unseen character costs ln(vocab)
    kept = known.replace("small", "smll ")
    (tmp_path / "kept.txt").write_text(kept, encoding="utf-8")
    base = evaluate_text(model, tokenizer, tmp_path / "kept.txt")
    assert result.unknown == 12 and plain.unknown == 0 and result.tokens == base.tokens + 12
    expected_total = base.loss * base.tokens + 12 * math.log(tokenizer.vocab_size)
    assert result.loss == pytest.approx(expected_total / result.tokens, rel=1e-5)
    assert result.bytes == len(known.replace("small", "smäll ☃").encode("utf-8")) - 1  # every byte counted
    assert result.bits_per_byte == pytest.approx(expected_total / math.log(2) / result.bytes, rel=1e-5)
