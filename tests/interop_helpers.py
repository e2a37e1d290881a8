"""Shared by test_hf.py and test_gguf.py: a small BPE tokenizer, random weights, left-padded batches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer, train_bpe
from parity import assert_parity

PROMPTS = ["def main():\n    return", "The", "Python's for statement iterates over the items of any sequence"]


def python_docs(chars: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:chars]


def small_bpe(folder: Path, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained on 40k characters of Python's docs (a fraction of a second)."""
    corpus = folder / "corpus.txt"
    corpus.write_text(python_docs(40_000), encoding="utf-8")
    return train_bpe([corpus], vocab_size=vocab_size, show_progress=False)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.25) -> nn.Module:
    """Large random weights (norm gains near 1) so logits are spread out and greedy choices are never near-ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
            param.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else std * noise)
    return model.eval()


def left_pad(rows, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [batch, width], valid mask and positions for left-padded rows (how transformers pads a batch)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            valid[i, width - len(row):] = True
            positions[i, width - len(row):] = torch.arange(len(row))
    return ids.to(device), valid.to(device), positions.to(device)


def padded_logits(model: GPT, rows: list[list[int]]) -> torch.Tensor:
    """ownllm logits [batch, width, vocab] for left-padded rows (padding masked via the cache's key_valid)."""
    ids, valid, positions = left_pad(rows, 0, torch.device("cpu"))
    cache = model.new_cache(len(rows), ids.shape[1])
    cache.key_valid[:, : ids.shape[1]] = valid
    with torch.no_grad():
        return model(ids, cache=cache, positions=positions)


def hf_greedy(model: nn.Module, rows: list[list[int]], eos: int, new_tokens: int) -> list[list[int]]:
    """transformers generate (KV cache, left padding), cut at the first eos as ownllm's rows are."""
    ids, valid, _ = left_pad(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, use_cache=True)
    new = out[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in new]


def hf_padded_logits(hf_model: nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """transformers logits for the same left-padded batch (attention_mask and explicit position_ids)."""
    ids, valid, positions = left_pad(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=valid.long(), position_ids=positions).logits


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, rows: list[list[int]], layers: int,
                       exact: bool = False) -> None:
    """Equal at every real (non-padding) position: to the bit where `exact`, else up to `layers` layers' rounding."""
    width = ours.shape[1]
    a = torch.cat([ours[i, width - len(row):] for i, row in enumerate(rows)])
    b = torch.cat([theirs[i, width - len(row):] for i, row in enumerate(rows)])
    if exact:
        assert torch.equal(a, b)
    else:
        assert_parity(a, b, layers=layers, what="logits")
