"""Tests for ownllm.data.text: finding corpus files, preparing token files, sampling training and eval windows.

Run: PYTHONPATH=src python -m pytest tests/test_data_text.py -q
The corpus is made in tmp_path from Python's own documentation (pydoc_data), so the tests run offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydoc_data.topics import topics

from ownllm.data.text import (
    PreparedData,
    WindowSampler,
    eval_windows,
    find_text_files,
    load_prepared,
    prepare_corpus,
)
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import Tokenizer, char_tokenizer_from_text, train_bpe

TOPIC_NAMES = sorted(topics)
UNICODE_LINE = "Unicode too: café, naïve, Ελληνικά, 日本語, emoji ✓\n"


def topic_text(first: int, count: int) -> str:
    return "".join(topics[name] for name in TOPIC_NAMES[first : first + count])


def write_corpus(folder: Path) -> dict[Path, str]:
    """Three documents in a folder tree, plus files that must be ignored."""
    texts = {
        folder / "a.txt": topic_text(0, 3) + UNICODE_LINE,
        folder / "b.md": UNICODE_LINE + topic_text(3, 3),
        folder / "sub" / "c.rst": topic_text(6, 3),
    }
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (folder / ".hidden.txt").write_text("hidden file\n", encoding="utf-8")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.txt").write_text("hidden folder\n", encoding="utf-8")
    (folder / "script.py").write_text("print('not text')\n", encoding="utf-8")
    return texts


@pytest.fixture
def corpus(tmp_path: Path) -> dict[Path, str]:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def char_tokenizer(corpus: dict[Path, str]) -> Tokenizer:
    return char_tokenizer_from_text("".join(corpus.values()))


class BigVocab:
    """A tokenizer that claims a vocabulary too big for uint16 (ids come from a char tokenizer)."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.vocab_size = 70_000
        self.eot_id = inner.eot_id

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.inner.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def save(self, directory) -> None:
        self.inner.save(directory)


class FailingTokenizer(BigVocab):
    """Fails in the middle of a corpus, like a crash or Ctrl-C during prepare."""

    def __init__(self, inner: Tokenizer, fail_after: int) -> None:
        super().__init__(inner)
        self.vocab_size = inner.vocab_size
        self.calls_left = fail_after

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls_left -= 1
        if self.calls_left < 0:
            raise KeyboardInterrupt
        return self.inner.encode_batch(texts)


def split_documents(ids: np.ndarray, eot_id: int) -> list[list[int]]:
    """Split an id array on end-of-text ids; every document ends with one."""
    ids = ids.tolist()
    assert ids and ids[-1] == eot_id
    documents, current = [], []
    for token in ids:
        if token == eot_id:
            documents.append(current)
            current = []
        else:
            current.append(token)
    return documents


def decoded_parts(data: PreparedData, tokenizer: Tokenizer, split: str) -> list[str]:
    ids = data.train if split == "train" else data.val
    return [tokenizer.decode(document) for document in split_documents(np.asarray(ids), tokenizer.eot_id)]


def assert_round_trip(data: PreparedData, tokenizer: Tokenizer, texts: dict[Path, str], val_fraction: float) -> None:
    """Each file is its train part followed by its val part; val is about `val_fraction` of it; counts agree."""
    train_parts = decoded_parts(data, tokenizer, "train")
    val_parts = decoded_parts(data, tokenizer, "val")
    assert len(train_parts) == len(val_parts) == len(texts)
    for text, train_part, val_part in zip(texts.values(), train_parts, val_parts):
        assert train_part + val_part == text
        assert abs(len(val_part) / len(text) - val_fraction) < 0.02
    assert data.meta["train_tokens"] == len(data.train) > 0
    assert data.meta["val_tokens"] == len(data.val) > 0
    assert data.meta["bytes"] == {
        "train": sum(len(part.encode("utf-8")) for part in train_parts),
        "val": sum(len(part.encode("utf-8")) for part in val_parts),
    }


# ---------------------------------------------------------------------------------------------------------
# find_text_files


def test_find_text_files_searches_folders_and_skips_hidden_and_other_suffixes(corpus: dict[Path, str]) -> None:
    folder = next(iter(corpus)).parent
    assert find_text_files([folder]) == sorted(corpus)


def test_find_text_files_takes_named_files_whatever_the_suffix_once(corpus: dict[Path, str]) -> None:
    folder = next(iter(corpus)).parent
    script = folder / "script.py"
    expected = [script, folder / "a.txt", folder / "b.md", folder / "sub" / "c.rst"]
    assert find_text_files([script, folder / "a.txt", folder]) == expected


def test_find_text_files_errors(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="nope.txt: no such file or directory"):
        find_text_files([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(OwnLLMError, match="no text files found in .*empty"):
        find_text_files([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------------------
# prepare_corpus / load_prepared


def test_prepare_with_char_tokenizer_round_trips(
    tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer
) -> None:
    folder = next(iter(corpus)).parent
    data = prepare_corpus([folder], char_tokenizer, tmp_path / "data", val_fraction=0.1, show_progress=False)
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    assert not data.train.flags.writeable
    assert data.vocab_size == char_tokenizer.vocab_size
    assert_round_trip(data, char_tokenizer, corpus, 0.1)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text(encoding="utf-8"))
    assert meta["format"] == "ownllm-tokens-v1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == char_tokenizer.vocab_size
    assert meta["files"] == [str(path) for path in sorted(corpus)]
    assert (tmp_path / "data" / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert (tmp_path / "data" / "tokenizer").is_dir()
    assert not [path for path in (tmp_path / "data").iterdir() if path.name.startswith(".")]


def test_prepare_with_trained_bpe_round_trips(tmp_path: Path, corpus: dict[Path, str]) -> None:
    tokenizer = train_bpe(sorted(corpus), vocab_size=400, show_progress=False)
    folder = next(iter(corpus)).parent
    data = prepare_corpus([folder], tokenizer, tmp_path / "data", show_progress=False)
    assert data.train.dtype == np.uint16
    assert_round_trip(data, tokenizer, corpus, 0.05)
    reloaded = load_prepared(tmp_path / "data")
    assert np.array_equal(reloaded.train, data.train) and np.array_equal(reloaded.val, data.val)
    assert reloaded.meta == data.meta


def test_big_vocabulary_is_stored_as_uint32(tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer) -> None:
    tokenizer = BigVocab(char_tokenizer)
    data = prepare_corpus(sorted(corpus), tokenizer, tmp_path / "data", val_fraction=0.1, show_progress=False)
    assert data.train.dtype == np.uint32 and data.meta["dtype"] == "uint32"
    assert (tmp_path / "data" / "val.bin").stat().st_size == 4 * len(data.val)
    assert_round_trip(data, tokenizer, corpus, 0.1)


def test_corpus_larger_than_a_chunk_is_streamed_to_the_same_ids(tmp_path: Path) -> None:
    text = topic_text(0, len(TOPIC_NAMES)) + UNICODE_LINE
    path = tmp_path / "python-docs.txt"
    path.write_text(text, encoding="utf-8")
    tokenizer = char_tokenizer_from_text(text)
    largest_call = []
    original = tokenizer.encode_batch

    def spying_encode_batch(texts: list[str]) -> list[list[int]]:
        largest_call.append(sum(map(len, texts)))
        return original(texts)

    tokenizer.encode_batch = spying_encode_batch
    data = prepare_corpus([path], tokenizer, tmp_path / "data", val_fraction=0.0, show_progress=False, chunk_chars=4096)
    assert list(data.train) == tokenizer.encode(text) + [tokenizer.eot_id]
    assert len(data.val) == 0 and data.meta["val_tokens"] == 0 and data.meta["bytes"]["val"] == 0
    assert len(largest_call) > 50 and max(largest_call) < 3 * 4096
    assert data.meta["bytes"]["train"] == len(text.encode("utf-8"))


def test_single_file_tail_goes_to_val(tmp_path: Path, char_tokenizer: Tokenizer, corpus: dict[Path, str]) -> None:
    path, text = next(iter(corpus.items()))
    data = prepare_corpus([path], char_tokenizer, tmp_path / "data", val_fraction=0.2, show_progress=False)
    assert_round_trip(data, char_tokenizer, {path: text}, 0.2)
    (val_part,) = decoded_parts(data, char_tokenizer, "val")
    assert text.endswith(val_part)
    assert text[: len(text) - len(val_part)].endswith("\n")  # cut at a line boundary


def test_prepare_replaces_an_existing_dataset_only_with_force(
    tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer
) -> None:
    paths = sorted(corpus)
    first = prepare_corpus(paths, char_tokenizer, tmp_path / "data", show_progress=False)
    with pytest.raises(OwnLLMError, match="--force"):  # a run may be resuming on it
        prepare_corpus(paths[:1], char_tokenizer, tmp_path / "data", show_progress=False)
    second = prepare_corpus(paths[:1], char_tokenizer, tmp_path / "data", show_progress=False, force=True)
    assert second.meta["files"] == [str(paths[0])]
    assert len(second.train) < len(first.train)
    names = sorted(path.name for path in (tmp_path / "data").iterdir())
    assert names == ["meta.json", "tokenizer", "train.bin", "val.bin"]


def test_crash_during_prepare_keeps_the_previous_dataset(
    tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer
) -> None:
    paths = sorted(corpus)
    old = prepare_corpus(paths[:1], char_tokenizer, tmp_path / "data", show_progress=False)
    old_train = np.array(old.train)
    with pytest.raises(KeyboardInterrupt):
        failing = FailingTokenizer(char_tokenizer, fail_after=5)
        prepare_corpus(paths, failing, tmp_path / "data", show_progress=False, chunk_chars=4096, force=True)
    kept = load_prepared(tmp_path / "data")
    assert np.array_equal(kept.train, old_train) and kept.meta == old.meta
    assert not [path for path in (tmp_path / "data").iterdir() if path.name.startswith(".")]


def test_output_folder_inside_the_corpus_is_not_read_back(corpus: dict[Path, str], char_tokenizer: Tokenizer) -> None:
    folder = next(iter(corpus)).parent
    first = prepare_corpus([folder], char_tokenizer, folder / "prepared", show_progress=False)
    second = prepare_corpus([folder], char_tokenizer, folder / "prepared", show_progress=False, force=True)
    assert second.meta["files"] == first.meta["files"] == [str(path) for path in sorted(corpus)]


def test_empty_corpus_is_an_error(tmp_path: Path, char_tokenizer: Tokenizer) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(OwnLLMError, match="empty.txt"):
        prepare_corpus([empty], char_tokenizer, tmp_path / "data", show_progress=False)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_missing_input_is_an_error(tmp_path: Path, char_tokenizer: Tokenizer) -> None:
    with pytest.raises(OwnLLMError, match="missing.txt: no such file or directory"):
        prepare_corpus([tmp_path / "missing.txt"], char_tokenizer, tmp_path / "data", show_progress=False)


def test_latin1_file_is_an_error_naming_the_file(tmp_path: Path, char_tokenizer: Tokenizer) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(OwnLLMError, match="latin.txt"):
        prepare_corpus([latin], char_tokenizer, tmp_path / "data", show_progress=False)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_bad_val_fraction_is_an_error(tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer) -> None:
    with pytest.raises(OwnLLMError, match="val fraction"):
        prepare_corpus(sorted(corpus), char_tokenizer, tmp_path / "data", val_fraction=1.0, show_progress=False)


def test_load_prepared_errors(tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer) -> None:
    with pytest.raises(OwnLLMError, match="is not a prepared dataset \\(no meta.json\\): run `ownllm prepare` first"):
        load_prepared(tmp_path / "nowhere")
    prepare_corpus(sorted(corpus), char_tokenizer, tmp_path / "data", show_progress=False)
    with open(tmp_path / "data" / "train.bin", "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(OwnLLMError, match="train.bin"):
        load_prepared(tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------
# WindowSampler


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(123).integers(0, 60_000, size=5_000).astype(np.uint16)


def test_sampler_batches_are_a_function_of_seed_rank_and_step(tokens: np.ndarray) -> None:
    sampler = WindowSampler(tokens, block_size=32, batch_size=8, seed=7)
    x, y = sampler.batch(3)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    again_x, again_y = WindowSampler(tokens, block_size=32, batch_size=8, seed=7).batch(3)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert not torch.equal(x, sampler.batch(4)[0])
    assert not torch.equal(x, WindowSampler(tokens, 32, 8, seed=8).batch(3)[0])
    rank1 = WindowSampler(tokens, 32, 8, seed=7, rank=1, world_size=2)
    assert not torch.equal(x, rank1.batch(3)[0])


def test_sampler_windows_come_from_the_data(tokens: np.ndarray) -> None:
    sampler = WindowSampler(tokens, block_size=16, batch_size=64, seed=1)
    x, y = sampler.batch(0)
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row, start in zip(x, sampler.starts(0)):
        assert 0 <= start <= len(tokens) - 17
        assert row.tolist() == tokens[start : start + 16].tolist()
    assert y[0, -1].item() == tokens[sampler.starts(0)[0] + 16]


def test_sampler_reaches_both_ends_of_the_data() -> None:
    tokens = np.arange(40, dtype=np.uint16)
    sampler = WindowSampler(tokens, block_size=8, batch_size=64)
    starts = np.concatenate([sampler.starts(step) for step in range(10)])
    assert starts.min() == 0 and starts.max() == 40 - 9


def test_sampler_state_round_trips_and_keeps_the_rank(tokens: np.ndarray) -> None:
    saved = WindowSampler(tokens, 32, 8, seed=5, rank=0, world_size=2).state_dict()
    assert saved == {"seed": 5, "rank": 0, "world_size": 2, "block_size": 32, "batch_size": 8}
    resumed = WindowSampler(tokens, 16, 4, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == {**saved, "rank": 1}
    assert torch.equal(resumed.batch(9)[0], WindowSampler(tokens, 32, 8, seed=5, rank=1, world_size=2).batch(9)[0])


def test_sampler_block_size_too_large(tokens: np.ndarray) -> None:
    with pytest.raises(OwnLLMError, match="block size 5000 is larger than the data \\(5000 tokens\\)"):
        WindowSampler(tokens, block_size=5000, batch_size=2)
    WindowSampler(tokens, block_size=4999, batch_size=2).batch(0)  # exactly one window fits


def test_sampler_on_prepared_memmap(tmp_path: Path, corpus: dict[Path, str], char_tokenizer: Tokenizer) -> None:
    data = prepare_corpus(sorted(corpus), char_tokenizer, tmp_path / "data", show_progress=False)
    x, y = WindowSampler(data.train, block_size=64, batch_size=4).batch(0)
    assert x.shape == (4, 64) and int(x.max()) < data.vocab_size


# ---------------------------------------------------------------------------------------------------------
# eval_windows


def test_eval_windows_are_fixed_and_spread_evenly(tokens: np.ndarray) -> None:
    batches = eval_windows(tokens, block_size=32, batch_size=4, max_batches=5)
    again = eval_windows(tokens, block_size=32, batch_size=4, max_batches=5)
    assert len(batches) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    rows = torch.cat([x for x, _ in batches])
    starts = [find_start(tokens, row) for row in rows]
    gaps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == len(tokens) - 33
    assert gaps.min() >= 32 and gaps.max() - gaps.min() <= 1
    for x, y in batches:
        assert x.shape == y.shape == (4, 32) and torch.equal(y[:, :-1], x[:, 1:])


def test_eval_windows_with_little_data_use_every_non_overlapping_window() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    batches = eval_windows(tokens, block_size=10, batch_size=4, max_batches=50)
    starts = [int(x[0]) for batch, _ in batches for x in batch]
    assert len(starts) == (100 - 1) // 10 == 9
    assert [len(x) for x, _ in batches] == [4, 4, 1]
    assert starts[0] == 0 and starts[-1] == 100 - 11
    assert min(np.diff(starts)) >= 10


def test_eval_windows_block_size_too_large() -> None:
    with pytest.raises(OwnLLMError, match="block size 10 is larger than the data \\(10 tokens\\)"):
        eval_windows(np.arange(10, dtype=np.uint16), block_size=10, batch_size=2, max_batches=2)


def find_start(tokens: np.ndarray, row: torch.Tensor) -> int:
    """The offset in `tokens` where the window `row` begins (tokens are random, so it is unique)."""
    window = row.numpy()
    candidates = np.flatnonzero(tokens[: len(tokens) - len(window) + 1] == window[0])
    matches = [int(start) for start in candidates if np.array_equal(tokens[start : start + len(window)], window)]
    assert len(matches) == 1
    return matches[0]
