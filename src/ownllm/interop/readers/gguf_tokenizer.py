"""A GGUF file's byte-level BPE vocabulary (`tokenizer.ggml.*`) rebuilt as a Hugging Face `tokenizers.Tokenizer`.

    hf = byte_level_bpe(tokens, merges, token_types, pre="smollm", source="model.gguf")

llama.cpp keeps what tokenizer.json spells out as a few names: the vocabulary and merges in GPT-2's byte alphabet,
a type per token (1 normal, 3 control, 4 user-defined, 5 unused), and `tokenizer.ggml.pre`, the name of the rule
that splits text before BPE. Control tokens become special added tokens and user-defined ones plain added tokens
(both matched whole in text, as llama.cpp does); `pre` names map onto `tokenizers` pre-tokenizers
(`PRE_TOKENIZERS`). An unknown `pre` name is refused: guessing a split rule gives plausible but
wrong token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ownllm.errors import OwnLLMError
from ownllm.tokenizer import byte_of_symbol

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split rule applied before byte-level BPE.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    # GPT-2's own regex (tokenizers' ByteLevel). `default` is what llama.cpp's converter writes when it does not
    # recognise a tokenizer; transformers reads it as GPT-2's rule too.
    "gpt2": ("gpt-2", "gpt2", "default"),
    "llama3": ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral"),
    "qwen2": ("qwen2", "deepseek-r1-qwen"),
    # every digit on its own, then GPT-2's regex (the StarCoder / SmolLM tokenizer.json)
    "digits": ("smollm", "starcoder", "refact"),
}


def pre_tokenizer_for(pre: str, source: Path | str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(the pre-tokenizer llama.cpp applies for `pre`, whether whole-word vocabulary hits skip the merges)."""
    family = next((name for name, names in PRE_TOKENIZERS.items() if pre in names), None)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False), False
    if family == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)]), False
    if family in ("llama3", "qwen2"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if family == "llama3" else QWEN2_SPLIT), "isolated")
        return pre_tokenizers.Sequence([split, byte_level]), family == "llama3"  # llama.cpp: ignore_merges (Llama 3)
    known = ", ".join(name for names in PRE_TOKENIZERS.values() for name in names)
    raise OwnLLMError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (ownllm knows {known})")


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None, pre: str,
                   source: Path | str) -> HFTokenizer:
    """The tokenizer the GGUF vocabulary describes; ids are the file's ids."""
    pre_tokenizer, ignore_merges = pre_tokenizer_for(pre, source)
    vocab = _vocabulary(tokens)
    pairs = []
    for number, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise OwnLLMError(f"{source}: tokenizer.ggml.merges[{number}]={merge!r} is not two tokens")
        pairs.append((pair[0], pair[1]))
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False)
    except Exception as error:  # a merge of tokens the vocabulary lacks
        raise OwnLLMError(f"{source}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({error})") from None
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    _add_tokens(hf, tokens, token_types or [], vocab)
    return hf


def _vocabulary(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id. Tokens written as plain text rather than in the byte alphabet are respelled (as transformers
    does); a repeated token keeps its first id and later copies get a placeholder, so ids stay dense."""
    alphabet = byte_of_symbol()
    symbol_of = {byte: symbol for symbol, byte in alphabet.items()}
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet.keys():
            token = "".join(symbol_of[byte] for byte in token.encode("utf-8"))
        vocab[token if token not in vocab else f"[DUPLICATE{index}]"] = index
    return vocab


def _add_tokens(hf: HFTokenizer, tokens: Sequence[str], token_types: Sequence[int], vocab: dict[str, int]) -> None:
    """Control tokens (in the byte alphabet: others are mislabelled) as special tokens, user-defined ones as
    added tokens, so text containing them maps to their one id."""
    alphabet = byte_of_symbol().keys()
    special = [AddedToken(token, special=True, normalized=False) for token, kind in zip(tokens, token_types)
               if kind == CONTROL and set(token) <= alphabet]
    added = [AddedToken(token, special=False, normalized=False) for token, kind in zip(tokens, token_types)
             if kind == USER_DEFINED and token in vocab]
    if special:
        hf.add_special_tokens(special)
    if added:
        hf.add_tokens(added)


# ---- SentencePiece vocabularies (tokenizer.ggml.model = llama) ------------------------------------------------------

UNKNOWN = 2


def sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int] | None,
                      add_space_prefix: bool, unknown_id: int | None, source: Path | str) -> HFTokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, TinyLlama, Mistral v0.1) as a `tokenizers` BPE with byte fallback:
    the merges are recovered from the token scores (a higher score merges first), '▁' marks a space, a space is
    put before the text when `add_space_prefix`, and bytes missing from the vocabulary become <0xNN> tokens."""
    if len(scores) != len(tokens):
        raise OwnLLMError(f"{source}: tokenizer.ggml.scores has {len(scores)} values for {len(tokens)} tokens")
    vocab = {}
    for index, token in enumerate(tokens):
        vocab[token if token not in vocab else f"[DUPLICATE{index}]"] = index
    model = models.BPE(vocab=vocab, merges=merges_from_scores(vocab, dict(zip(tokens, scores))), fuse_unk=True,
                       byte_fallback=True)
    hf = HFTokenizer(model)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space_prefix
                                                else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_space_prefix else []))
    types = list(token_types or [])
    if unknown_id is not None and 0 <= unknown_id < len(types):
        types[unknown_id] = CONTROL  # matched whole, as transformers' LlamaTokenizer does with its unk token
    special = [AddedToken(token, special=True, normalized=False) for token, kind in zip(tokens, types)
               if kind == CONTROL]
    added = [AddedToken(token, special=False, normalized=False) for token, kind in zip(tokens, types)
             if kind == USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if added:
        hf.add_tokens(added)
    return hf


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens is a merge, ranked by the whole token's score (then by
    the shorter left piece), as SentencePiece's BPE applies them."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(score, left, right) for left, right in pairs]
    merges.sort(key=lambda merge: (merge[0], len(merge[1]), len(merge[2])), reverse=True)
    return [(left, right) for _, left, right in merges]
