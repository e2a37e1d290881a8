"""Tokenizers: train, load and save byte-level BPE (via Hugging Face `tokenizers`) or a character table.

One `Tokenizer` class wraps either kind, so the rest of the package never asks which one it holds:

    from ownllm.tokenizer import train_bpe, load_tokenizer
    tok = train_bpe(["corpus.txt"], vocab_size=8000)
    tok.save("runs/tok")                       # writes runs/tok/tokenizer.json
    tok = load_tokenizer("runs/tok")           # also reads GPT-2's vocab.json+merges.txt or encoder.json+vocab.bpe
    ids = tok.encode("Hello<|endoftext|>")     # the document separator EOT becomes the single id tok.eot_id

Byte-level BPE maps every byte to a symbol before merging, so any Unicode text round-trips:
`tok.decode(tok.encode(s)) == s`. Corpus files are read as strict UTF-8 (`read_text_file`, `iter_text_chunks`);
a file that is not UTF-8 is refused with a message that says how to fix it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ownllm.errors import OwnLLMError

EOT = "<|endoftext|>"

HF_FILE = "tokenizer.json"
SPECIALS_FILE = "tokenizer_config.json"  # Hugging Face's: eos/bos tokens, add_bos_token, chat_template
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save the chat template
CHAR_FILE = "char_vocab.json"
GPT2_HF_FILES = ("vocab.json", "merges.txt")
GPT2_OPENAI_FILES = ("encoder.json", "vocab.bpe")

_BINARY_SNIFF_BYTES = 8192
_TRAIN_CHUNK_CHARS = 1 << 16
_BOM = "\ufeff"


# ---------------------------------------------------------------------------------------------------------------
# Reading corpus files as strict UTF-8


def read_text_file(path: str | Path) -> str:
    """Return the whole file as text; raise OwnLLMError if it is missing or not UTF-8. A leading BOM is dropped."""
    path = Path(path)
    data = _read_bytes(path)
    return _strip_bom(_decode_utf8(data, path, start_offset=0, head=data[:_BINARY_SNIFF_BYTES]))


def iter_text_chunks(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream a UTF-8 file as strings of about `chunk_chars` characters, each ending at a line boundary.

    Joined, the chunks equal `read_text_file(path)`. Bad bytes raise the same OwnLLMError, with their byte offset.
    A line longer than 16 chunks is cut at a character boundary so memory stays bounded.
    """
    path = Path(path)
    chunk_bytes = max(1, chunk_chars)
    with _open_binary(path) as file:
        head = file.read(_BINARY_SNIFF_BYTES)
        pieces = _split_bytes_at_lines(_blocks(file, head, chunk_bytes), chunk_bytes)
        offset = 0
        for piece in pieces:
            text = _decode_utf8(piece, path, start_offset=offset, head=head)
            yield _strip_bom(text) if offset == 0 else text
            offset += len(piece)


def _read_bytes(path: Path) -> bytes:
    with _open_binary(path) as file:
        return file.read()


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise OwnLLMError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OwnLLMError(f"{path}: is a directory, not a text file; pass the files inside it") from None
    except PermissionError:
        raise OwnLLMError(f"{path}: permission denied; make the file readable") from None


def _blocks(file, first: bytes, size: int) -> Iterator[bytes]:
    if first:
        yield first
    while block := file.read(size):
        yield block


def _split_bytes_at_lines(blocks: Iterable[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Regroup raw blocks into pieces of at least `chunk_bytes` that end just after a newline."""
    pending = bytearray()
    longest_line = 16 * chunk_bytes
    for block in blocks:
        pending += block
        if len(pending) < chunk_bytes:
            continue
        cut = pending.rfind(b"\n") + 1
        if cut == 0 and len(pending) >= longest_line:
            cut = _utf8_char_start(pending, len(pending) - 1)
        if cut > 0:
            yield bytes(pending[:cut])
            del pending[:cut]
    if pending:
        yield bytes(pending)


def _utf8_char_start(data: bytearray, index: int) -> int:
    """Index of the first byte of the UTF-8 character that holds data[index] (at most 3 steps back)."""
    for _ in range(3):
        if index <= 0 or data[index] & 0xC0 != 0x80:
            break
        index -= 1
    return index


def _decode_utf8(data: bytes, path: Path, start_offset: int, head: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8_error(path, start_offset + error.start, looks_binary=b"\x00" in head) from None


def _not_utf8_error(path: Path, offset: int, looks_binary: bool) -> OwnLLMError:
    problem = f"{path}: is not UTF-8 text (invalid byte at offset {offset})"
    if looks_binary:
        return OwnLLMError(f"{problem}; it looks like a binary file, remove it from the corpus")
    return OwnLLMError(
        f"{problem}; convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > {path}.utf8`) or remove it"
    )


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith(_BOM) else text


# ---------------------------------------------------------------------------------------------------------------
# The byte-level alphabet: GPT-2 shows each byte as a printable character


@lru_cache(maxsize=1)
def byte_of_symbol() -> dict[str, int]:
    """Map each of the 256 byte-level symbols back to its byte.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen...) are shifted, in
    byte order, to the code points from 256 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in symbols)
    for index, byte in enumerate(shifted):
        symbols[byte] = chr(256 + index)
    return {symbol: byte for byte, symbol in symbols.items()}


def _byte_level_token_bytes(token: str) -> bytes:
    table = byte_of_symbol()
    return b"".join(bytes([table[ch]]) if ch in table else ch.encode("utf-8") for ch in token)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _plain_token_bytes(token: str) -> bytes:
    """Bytes of a token from a non-byte-level tokenizer (SentencePiece style: '▁' is a space, <0xNN> a byte)."""
    byte_token = _BYTE_FALLBACK.fullmatch(token)
    if byte_token:
        return bytes([int(byte_token.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# The two kinds of tokenizer behind the one public class


class _HFBackend:
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE or any other tokenizer.json)."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eot_id = hf.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encode_many = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast: tokenizers >= 0.20
        return [encoding.ids for encoding in encode_many(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def token(self, id: int) -> str:
        return self.hf.id_to_token(id) or ""

    def is_byte_level(self) -> bool:
        return isinstance(self.hf.decoder, decoders.ByteLevel)

    def token_bytes_table(self) -> list[bytes]:
        added = {index: token.content for index, token in self.hf.get_added_tokens_decoder().items()}
        to_bytes = _byte_level_token_bytes if self.is_byte_level() else _plain_token_bytes
        table = []
        for index in range(self.vocab_size):
            token = self.hf.id_to_token(index)
            if index in added:
                table.append(added[index].encode("utf-8"))
            else:
                table.append(b"" if token is None else to_bytes(token))
        return table

    def save(self, directory: Path) -> None:
        _write_text_atomically(directory / HF_FILE, self.hf.to_str(pretty=True))
        (directory / CHAR_FILE).unlink(missing_ok=True)


class _CharBackend:
    """A character table: id i is chars[i]; EOT comes last."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self.symbols = [*self.chars, EOT]
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for number, piece in enumerate(text.split(EOT)):
            if number:
                ids.append(self.eot_id)
            ids.extend(self._ids_of_chars(piece))
        return ids

    def _ids_of_chars(self, piece: str) -> list[int]:
        try:
            return [self.index[ch] for ch in piece]
        except KeyError as missing:
            raise OwnLLMError(
                f"character {missing.args[0]!r} is not in the char tokenizer's vocabulary; "
                "train it on text that contains it, or use a BPE tokenizer"
            ) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.symbols[i] for i in ids)

    def token(self, id: int) -> str:
        return self.symbols[id]

    def token_bytes_table(self) -> list[bytes]:
        return [symbol.encode("utf-8") for symbol in self.symbols]

    def save(self, directory: Path) -> None:
        record = {"kind": "char", "chars": self.chars, "eot": EOT}
        _write_text_atomically(directory / CHAR_FILE, json.dumps(record, ensure_ascii=False, indent=1))
        (directory / HF_FILE).unlink(missing_ok=True)  # it would shadow char_vocab.json in load_tokenizer


class Tokenizer:
    """Text <-> token ids, for either byte-level BPE (`kind == "bpe"`) or a character table (`kind == "char"`).

    Build one with `train_bpe`, `train_char`, `char_tokenizer_from_text` or `load_tokenizer`, or wrap a
    `tokenizers.Tokenizer` you already have with `Tokenizer(hf)`.

    Tokenizers of open-weight models name their own end-of-sequence token (`</s>`, `<|im_end|>`, ...): `eos_id`
    overrides which id `eot_id` is, `bos_id`/`add_bos` say whether prompts start with a begin-of-sequence token,
    and `chat_template` keeps the model's Jinja chat template. `save` and `load_tokenizer` keep them in
    tokenizer_config.json, the file Hugging Face uses for them.
    """

    def __init__(self, hf: HFTokenizer | None = None, *, chars: Sequence[str] | None = None,
                 eos_id: int | None = None, bos_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None) -> None:
        if (hf is None) == (chars is None):
            raise ValueError("Tokenizer needs exactly one of a tokenizers.Tokenizer or a list of chars")
        self._backend = _HFBackend(_with_eot_special(hf)) if hf is not None else _CharBackend(chars)
        self._bytes_table: list[bytes] | None = None
        for name, value in (("eos_id", eos_id), ("bos_id", bos_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise OwnLLMError(f"{name} {value} is outside the vocabulary (0..{self.vocab_size - 1})")
        self._eos_id, self.bos_id, self.chat_template = eos_id, bos_id, chat_template
        self.add_bos = add_bos and bos_id is not None

    @property
    def kind(self) -> str:
        return self._backend.kind

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def eot_id(self) -> int | None:
        """The id that ends a document: the model's end-of-sequence token (`<|endoftext|>` unless overridden)."""
        return self._eos_id if self._eos_id is not None else self._backend.eot_id

    def token(self, id: int) -> str:
        """The vocabulary entry (not its bytes) of one id, e.g. "<|endoftext|>" or "Ġthe"."""
        self._check_ids([int(id)])
        return self._backend.token(int(id))

    @property
    def hf(self) -> HFTokenizer | None:
        """The wrapped Hugging Face tokenizer (None for a char tokenizer)."""
        return self._backend.hf if isinstance(self._backend, _HFBackend) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; "<|endoftext|>" (and the tokenizer's other special tokens) become single ids."""
        return self._backend.encode(text)

    def encode_known(self, text: str) -> tuple[list[int], int]:
        """`encode` of `text` without the characters this tokenizer cannot spell, and how many there were
        (always 0 for byte-level BPE, which spells every byte; a char tokenizer knows only what it was trained on)."""
        if not isinstance(self._backend, _CharBackend):
            return self.encode(text), 0
        known = self._backend.index
        kept = EOT.join("".join(ch for ch in piece if ch in known) for piece in text.split(EOT))
        return self.encode(kept), len(text) - len(kept)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (in parallel for BPE)."""
        return self._backend.encode_batch(list(texts))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included as their text."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._backend.decode(ids)

    def starting_sequence(self, ids: list[int]) -> list[int]:
        """`ids` as the start of a sequence the model reads: with the begin-of-sequence token first where the
        tokenizer asks for one (`add_bos`, Llama-style), never twice. The one begin-of-sequence rule: training on
        instructions, `generate`, `chat` and the server all go through it."""
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            return [self.bos_id, *ids]
        return list(ids)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes one token stands for (a special token stands for its own text)."""
        id = int(id)
        self._check_ids([id])
        if self._bytes_table is None:
            self._bytes_table = self._backend.token_bytes_table()
        return self._bytes_table[id]

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (bpe) or char_vocab.json (char) into `directory`, creating it if needed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        specials = self._specials_record()
        if specials:
            _write_text_atomically(directory / SPECIALS_FILE, json.dumps(specials, ensure_ascii=False, indent=1))
        else:
            (directory / SPECIALS_FILE).unlink(missing_ok=True)

    def _specials_record(self) -> dict:
        """What tokenizer_config.json must hold for `load_tokenizer` to restore eos/bos/chat template."""
        record: dict = {}
        if self._eos_id is not None:
            record["eos_token"] = self.token(self._eos_id)
        if self.bos_id is not None:
            record["bos_token"] = self.token(self.bos_id)
            record["add_bos_token"] = self.add_bos
        if self.chat_template is not None:
            record["chat_template"] = self.chat_template
        return record

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise OwnLLMError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1}); "
                "use the tokenizer the model was trained with"
            )

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _with_eot_special(hf: HFTokenizer) -> HFTokenizer:
    """Make sure an EOT that is in the vocabulary is matched as a special token (keeping its id)."""
    already_added = any(token.content == EOT for token in hf.get_added_tokens_decoder().values())
    if hf.token_to_id(EOT) is not None and not already_added:
        hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return hf


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_bpe(
    files: Sequence[str | Path], vocab_size: int = 8000, min_frequency: int = 2, show_progress: bool = True
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on UTF-8 text files, streamed in chunks; EOT is a special token."""
    if vocab_size < 256 + 1:
        raise OwnLLMError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 257 (256 bytes + EOT)")
    paths = _checked_corpus(files)
    hf = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
    )
    hf.train_from_iterator(_corpus_chunks(paths), trainer=trainer)
    return Tokenizer(hf)


def train_char(files: Sequence[str | Path]) -> Tokenizer:
    """A character tokenizer whose vocabulary is every character in the files (sorted), then EOT."""
    chars: set[str] = set()
    for chunk in _corpus_chunks(_checked_corpus(files)):
        chars.update(chunk.replace(EOT, ""))
    return Tokenizer(chars=sorted(chars))


def char_tokenizer_from_text(text: str) -> Tokenizer:
    """A character tokenizer whose vocabulary is every character in `text` (sorted), then EOT."""
    return Tokenizer(chars=sorted(set(text.replace(EOT, ""))))


def _checked_corpus(files: Sequence[str | Path]) -> list[Path]:
    paths = [Path(file) for file in files]
    for path in paths:
        if not path.is_file():
            reason = "is a directory; pass the text files inside it" if path.is_dir() else "no such file"
            raise OwnLLMError(f"{path}: {reason}")
    if sum(path.stat().st_size for path in paths) == 0:
        names = ", ".join(str(path) for path in paths) or "(no files given)"
        raise OwnLLMError(f"no text to train on in {names}; pass non-empty UTF-8 text files")
    return paths


def _corpus_chunks(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        yield from iter_text_chunks(path, chunk_chars=_TRAIN_CHUNK_CHARS)


def _byte_level_bpe(model: models.BPE) -> HFTokenizer:
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory or a tokenizer.json / char_vocab.json file.

    A directory is searched for tokenizer.json, char_vocab.json, vocab.json+merges.txt, encoder.json+vocab.bpe,
    in that order.
    """
    path = Path(path)
    if path.is_dir():
        return _load_from_directory(path)
    if path.is_file():
        return _load_char_vocab(path) if path.name == CHAR_FILE else _load_hf_json(path)
    raise OwnLLMError(f"{path}: no such file or directory; pass a tokenizer directory or a tokenizer.json file")


def _load_from_directory(directory: Path) -> Tokenizer:
    tok = _load_vocabulary_from_directory(directory)
    return with_specials_from(directory, tok) if tok.hf is not None else tok


def _load_vocabulary_from_directory(directory: Path) -> Tokenizer:
    if (directory / HF_FILE).is_file():
        return _load_hf_json(directory / HF_FILE)
    if (directory / CHAR_FILE).is_file():
        return _load_char_vocab(directory / CHAR_FILE)
    for vocab_name, merges_name in (GPT2_HF_FILES, GPT2_OPENAI_FILES):
        if (directory / vocab_name).is_file() and (directory / merges_name).is_file():
            return _load_gpt2_files(directory / vocab_name, directory / merges_name)
    raise OwnLLMError(
        f"no tokenizer found in {directory}: expected tokenizer.json, char_vocab.json, "
        "vocab.json+merges.txt or encoder.json+vocab.bpe"
    )


def with_specials_from(directory: Path, tok: Tokenizer, eos_id: int | None = None) -> Tokenizer:
    """`tok` with eos/bos/chat template from directory/tokenizer_config.json (and chat_template.jinja) applied.

    `eos_id`, when given, wins over the file's eos_token (Hugging Face's generation_config.json does the same).
    """
    path = directory / SPECIALS_FILE
    record = _read_json(path) if path.is_file() else {}
    if not isinstance(record, dict):
        raise OwnLLMError(f"{path}: not a JSON object; re-save the tokenizer")

    def special_id(key: str) -> int | None:
        value = record.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if content is None:
            return None
        id = tok.hf.token_to_id(content) if isinstance(content, str) else None
        if id is None:
            raise OwnLLMError(f"{path}: {key} {content!r} is not in the tokenizer's vocabulary")
        return id

    eos_id = eos_id if eos_id is not None else special_id("eos_token")
    bos_id = special_id("bos_token")
    add_bos = record.get("add_bos_token")
    if add_bos is None and bos_id is not None:  # no flag: does the tokenizer's post-processor prepend bos?
        add_bos = tok.hf.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    template = record.get("chat_template")
    if isinstance(template, list):  # older layout: a list of named templates
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        template = read_text_file(directory / CHAT_TEMPLATE_FILE)
    if eos_id == tok.eot_id and bos_id is None and template is None:
        return tok
    return Tokenizer(tok.hf, eos_id=eos_id, bos_id=bos_id, add_bos=bool(add_bos),
                     chat_template=template if isinstance(template, str) else None)


def _load_hf_json(path: Path) -> Tokenizer:
    try:
        hf = HFTokenizer.from_str(read_text_file(path))
    except OwnLLMError:
        raise
    except Exception as error:
        raise OwnLLMError(f"{path}: not a valid tokenizer.json ({_first_line(error)}); re-save the tokenizer") from None
    return Tokenizer(hf)


def _load_char_vocab(path: Path) -> Tokenizer:
    record = _read_json(path)
    chars = record.get("chars") if isinstance(record, dict) else None
    valid = (
        isinstance(chars, list)
        and all(isinstance(ch, str) and len(ch) == 1 for ch in chars)
        and len(set(chars)) == len(chars)
        and record.get("kind", "char") == "char"
        and record.get("eot", EOT) == EOT
    )
    if not valid:
        raise OwnLLMError(
            f'{path}: not a valid char vocabulary (want {{"kind": "char", "chars": [unique single characters], '
            f'"eot": "{EOT}"}}); re-create it with train_char'
        )
    return Tokenizer(chars=chars)


def _load_gpt2_files(vocab_path: Path, merges_path: Path) -> Tokenizer:
    vocab = _read_gpt2_vocab(vocab_path)
    merges = _read_gpt2_merges(merges_path)
    try:
        model = models.BPE(vocab=vocab, merges=merges)
    except Exception as error:
        raise OwnLLMError(
            f"{merges_path}: does not fit {vocab_path.name} ({_first_line(error)}); use the two files of one tokenizer"
        ) from None
    return Tokenizer(_byte_level_bpe(model))


def _read_gpt2_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise OwnLLMError(f"{path}: not a GPT-2 vocabulary (want a JSON object of token -> id); check the file")
    return vocab


def _read_gpt2_merges(path: Path) -> list[tuple[str, str]]:
    lines = read_text_file(path).split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise OwnLLMError(f"{path}: merge line {number} is not two tokens separated by one space: {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def save_gpt2_files(tok: Tokenizer, directory: str | Path) -> None:
    """Write vocab.json + merges.txt (GPT-2 / Hugging Face slow-tokenizer layout) for a byte-level BPE tokenizer."""
    hf = tok.hf
    if hf is None or not isinstance(hf.model, models.BPE) or not isinstance(hf.decoder, decoders.ByteLevel):
        raise OwnLLMError(f"save_gpt2_files needs a byte-level BPE tokenizer, not {tok!r}; use tok.save instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = dict(sorted(hf.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]))
    _write_text_atomically(directory / GPT2_HF_FILES[0], json.dumps(vocab, ensure_ascii=False))
    merge_lines = [" ".join(merge_pair(merge)) for merge in json.loads(hf.to_str())["model"]["merges"]]
    _write_text_atomically(directory / GPT2_HF_FILES[1], "#version: 0.2\n" + "".join(f"{m}\n" for m in merge_lines))


def merge_pair(merge: str | list[str]) -> list[str]:
    """A merge as serialised by `tokenizers`: "a b" in older versions, ["a", "b"] in newer ones."""
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _read_json(path: Path):
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as error:
        raise OwnLLMError(f"{path}: not valid JSON ({error}); re-create the file") from None


def _write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8", newline="")
    os.replace(partial, path)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
