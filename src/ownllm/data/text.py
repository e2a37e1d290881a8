"""Raw text for pretraining: corpus files -> token ids on disk -> random training windows.

`prepare_corpus` streams text files through a tokenizer and writes the ids as flat arrays (`train.bin`,
`val.bin`, uint16 or uint32) plus `meta.json` and a copy of the tokenizer; `load_prepared` memory-maps them
back. `WindowSampler` draws training batches that depend only on (seed, rank, step), so a resumed run sees
exactly the batches it would have seen; `eval_windows` gives a fixed set of evaluation batches.

    from ownllm.tokenizer import train_bpe
    from ownllm.data.text import find_text_files, prepare_corpus, WindowSampler
    files = find_text_files(["corpus/"])
    data = prepare_corpus(files, train_bpe(files), "data/corpus")
    x, y = WindowSampler(data.train, block_size=256, batch_size=32).batch(step=0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from ownllm.checkpoint import TOKENIZER_DIR, read_json
from ownllm.errors import OwnLLMError
from ownllm.outputs import check_output, replaced_dir
from ownllm.tokenizer import Tokenizer, iter_text_chunks

FORMAT = "ownllm-tokens-v1"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
PIECE_CHARS = 1 << 14  # text handed to encode_batch in pieces of about this size, cut after a newline


# ---------------------------------------------------------------------------------------------------------
# Finding the corpus


def find_text_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders into a list of text files.

    A file given by name is taken whatever its suffix; a folder is searched recursively for
    .txt/.md/.rst/.text files (sorted), skipping hidden files and folders. Duplicates are dropped.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(_text_files_in_folder(path))
        elif path.is_file():
            found.append(path)
        else:
            raise OwnLLMError(f"{path}: no such file or directory")
    files = _unique(found)
    if not files:
        names = ", ".join(str(item) for item in inputs) or "(no inputs given)"
        suffixes = ", ".join(TEXT_SUFFIXES)
        raise OwnLLMError(f"no text files found in {names}: give text files, or folders with {suffixes} files")
    return files


def _text_files_in_folder(folder: Path) -> list[Path]:
    files = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in TEXT_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(files)


def _unique(paths: list[Path]) -> list[Path]:
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


# ---------------------------------------------------------------------------------------------------------
# Writing a prepared dataset


@dataclass
class PreparedData:
    """A tokenized corpus on disk: `train` and `val` are read-only memory maps of token ids."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    meta: dict[str, Any]


@dataclass
class _SplitWriter:
    """Appends the token ids of one split (train or val) to its .bin file and counts tokens and bytes."""

    handle: BinaryIO
    dtype: np.dtype
    tokens: int = 0
    bytes: int = 0
    document_open: bool = False

    def add_text(self, text: str, tokenizer: Tokenizer) -> None:
        if not text:
            return
        for ids in tokenizer.encode_batch(_line_pieces(text, PIECE_CHARS)):
            self._write(ids)
        self.bytes += len(text.encode("utf-8"))
        self.document_open = True

    def end_document(self, eot_id: int | None) -> None:
        """Mark the end of a file's part: append the end-of-text id if this part had any text."""
        if self.document_open and eot_id is not None:
            self._write([eot_id])
        self.document_open = False

    def _write(self, ids: list[int]) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.handle)
        self.tokens += len(ids)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary this size."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_corpus(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    show_progress: bool = True,
    *,
    chunk_chars: int = 1 << 20,
    force: bool = False,
) -> PreparedData:
    """Tokenize text files into `out_dir` (train.bin, val.bin, meta.json, tokenizer/) and memory-map the result.

    Each file is streamed; the last `val_fraction` of it (cut after a line, roughly) goes to val, the rest to
    train, and each non-empty part is followed by the tokenizer's end-of-text id when it has one. Everything is
    written to a staging folder that replaces `out_dir` at the end; an existing non-empty `out_dir` is replaced
    only with `force` (it may be the dataset a run resumes on), and a failure leaves no folder behind.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise OwnLLMError(f"val fraction {val_fraction} is out of range: use a value in [0, 1), e.g. 0.05")
    out_dir = Path(out_dir)
    check_output(out_dir, "dir", inputs=inputs, force=force)
    files = [path for path in find_text_files(inputs) if not _is_inside(path, out_dir)]
    if not files:
        raise OwnLLMError(f"no text files found in {', '.join(map(str, inputs))} outside the output folder {out_dir}")
    with replaced_dir(out_dir) as staging:
        meta = _write_dataset(files, tokenizer, staging, val_fraction, show_progress, chunk_chars)
        if meta["train_tokens"] + meta["val_tokens"] == 0:
            raise OwnLLMError(f"no tokens in {', '.join(map(str, inputs))}: the text files are empty")
    return load_prepared(out_dir)


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _write_dataset(
    files: list[Path], tokenizer: Tokenizer, staging: Path, val_fraction: float, show_progress: bool, chunk_chars: int
) -> dict[str, Any]:
    """Write train.bin, val.bin, tokenizer/ and then meta.json into `staging`; return the metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    total_bytes = sum(path.stat().st_size for path in files)
    with (
        open(staging / "train.bin", "wb") as train_file,
        open(staging / "val.bin", "wb") as val_file,
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress) as bar,
    ):
        train, val = _SplitWriter(train_file, dtype), _SplitWriter(val_file, dtype)
        try:
            for path in files:
                _tokenize_file(path, tokenizer, train, val, val_fraction, bar, chunk_chars)
        except BaseException:
            bar.leave = False  # the bar is cleared: the error stays the one line printed
            raise
    tokenizer.save(staging / TOKENIZER_DIR)
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "files": [str(path) for path in files],
        "bytes": {"train": train.bytes, "val": val.bytes},
        "val_fraction": val_fraction,
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _tokenize_file(
    path: Path,
    tokenizer: Tokenizer,
    train: _SplitWriter,
    val: _SplitWriter,
    val_fraction: float,
    bar: tqdm,
    chunk_chars: int,
) -> None:
    """Stream one file: bytes before the split point go to `train`, the tail to `val`."""
    size = path.stat().st_size
    split_byte = size - round(size * val_fraction)
    offset = 0
    for chunk in iter_text_chunks(path, chunk_chars=chunk_chars):
        chunk_bytes = chunk.encode("utf-8")
        head, tail = _divide_chunk(chunk_bytes, split_byte - offset)
        train.add_text(head, tokenizer)
        val.add_text(tail, tokenizer)
        offset += len(chunk_bytes)
        bar.update(len(chunk_bytes))
    train.end_document(tokenizer.eot_id)
    val.end_document(tokenizer.eot_id)


def _divide_chunk(chunk_bytes: bytes, cut: int) -> tuple[str, str]:
    """Split UTF-8 text near byte `cut`: after the next newline if there is one, else at a character boundary."""
    if cut <= 0:
        return "", chunk_bytes.decode("utf-8")
    if cut >= len(chunk_bytes):
        return chunk_bytes.decode("utf-8"), ""
    newline = chunk_bytes.find(b"\n", cut - 1)
    if newline != -1:
        cut = newline + 1
    else:
        while cut < len(chunk_bytes) and chunk_bytes[cut] & 0xC0 == 0x80:  # UTF-8 continuation byte
            cut += 1
    return chunk_bytes[:cut].decode("utf-8"), chunk_bytes[cut:].decode("utf-8")


def _line_pieces(text: str, piece_chars: int) -> list[str]:
    """Cut text into pieces of about `piece_chars`, each ending after a newline where possible."""
    pieces = []
    start = 0
    while start < len(text):
        end = start + piece_chars
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline == -1:
                newline = text.find("\n", end)
            end = len(text) if newline == -1 else newline + 1
        pieces.append(text[start:end])
        start = end
    return pieces


# ---------------------------------------------------------------------------------------------------------
# Reading a prepared dataset


def load_prepared(directory: str | Path) -> PreparedData:
    """Memory-map a dataset written by `prepare_corpus` (read-only)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    dtype = np.dtype(meta["dtype"])
    train = _map_tokens(directory / "train.bin", dtype, meta["train_tokens"])
    val = _map_tokens(directory / "val.bin", dtype, meta["val_tokens"])
    return PreparedData(directory=directory, train=train, val=val, vocab_size=int(meta["vocab_size"]), meta=meta)


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise OwnLLMError(f"{directory} is not a prepared dataset (no meta.json): run `ownllm prepare` first")
    meta = read_json(meta_path, advice=": run `ownllm prepare` again")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OwnLLMError(f"{meta_path}: not an {FORMAT} dataset: run `ownllm prepare` again")
    missing = [key for key in ("dtype", "vocab_size", "train_tokens", "val_tokens") if key not in meta]
    if missing:
        raise OwnLLMError(f"{meta_path}: missing {', '.join(missing)}: run `ownllm prepare` again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise OwnLLMError(f"{meta_path}: dtype {meta['dtype']!r} is not uint16 or uint32: run `ownllm prepare` again")
    return meta


def _map_tokens(path: Path, dtype: np.dtype, expected: int) -> np.ndarray:
    """Open a .bin file as a read-only memmap, checking its length against meta.json."""
    if not path.is_file():
        raise OwnLLMError(f"{path}: missing from the prepared dataset: run `ownllm prepare` again")
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        raise OwnLLMError(
            f"{path}: holds {size} bytes but meta.json says {expected} {dtype.name} tokens: run `ownllm prepare` again"
        )
    if expected == 0:  # an empty file cannot be memory-mapped
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------------------------
# Batches


def _check_fits(tokens: np.ndarray, block_size: int) -> None:
    if block_size < 1:
        raise OwnLLMError(f"block size {block_size} must be at least 1")
    if len(tokens) < block_size + 1:
        raise OwnLLMError(
            f"block size {block_size} is larger than the data ({len(tokens)} tokens): "
            "use a smaller --block-size or more text"
        )


def _windows_to_batch(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows of block_size + 1 tokens at `starts`; return inputs and next-token targets as int64."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size + 1)[starts]
    windows = np.array(windows, dtype=np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


class WindowSampler:
    """Random contiguous windows from a token array, deterministic per step: batch for step s is a pure function
    of (seed, rank, s), so a resumed run draws the same batches and different ranks draw different windows."""

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1:
            raise OwnLLMError(f"batch size {batch_size} must be at least 1")
        if seed < 0:
            raise OwnLLMError(f"seed {seed} must be zero or positive")
        if not 0 <= rank < world_size:
            raise OwnLLMError(f"rank {rank} is outside world size {world_size}")
        _check_fits(tokens, block_size)
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def starts(self, step: int) -> np.ndarray:
        """The start offsets of the windows in the batch for `step`."""
        if step < 0:
            raise OwnLLMError(f"step {step} must be zero or positive")
        rng = np.random.Generator(np.random.PCG64([self.seed, self.rank, step]))
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y (x shifted by one), both int64 [batch_size, block_size]."""
        return _windows_to_batch(self.tokens, self.starts(step), self.block_size)

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore seed, block size and batch size. Rank and world size stay those of this process (they are
        saved for the record only), so that every rank resuming from one checkpoint keeps its own windows."""
        missing = [key for key in ("seed", "block_size", "batch_size") if key not in state]
        if missing:
            raise OwnLLMError(f"sampler state is missing {', '.join(missing)}: the checkpoint is incomplete")
        _check_fits(self.tokens, int(state["block_size"]))
        self.seed = int(state["seed"])
        self.block_size = int(state["block_size"])
        self.batch_size = int(state["batch_size"])


def eval_windows(
    tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of up to `max_batches` evaluation batches of evenly spaced windows over `tokens`.

    Windows do not overlap when the data holds enough of them; with little data every non-overlapping window
    is used once and the last batch may be smaller than `batch_size`. The result is the same on every call.
    """
    _check_fits(tokens, block_size)
    if batch_size < 1 or max_batches < 1:
        raise OwnLLMError(f"eval batch size {batch_size} and batch count {max_batches} must be at least 1")
    starts = evenly_spaced_starts(len(tokens), block_size, batch_size * max_batches)
    return [
        _windows_to_batch(tokens, starts[first : first + batch_size], block_size)
        for first in range(0, len(starts), batch_size)
    ]


def evenly_spaced_starts(length: int, block_size: int, wanted: int) -> np.ndarray:
    """Up to `wanted` window starts from 0 to the last possible one, at least `block_size` apart."""
    last = length - block_size - 1
    count = min(wanted, last // block_size + 1)
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    return np.arange(count, dtype=np.int64) * last // (count - 1)

