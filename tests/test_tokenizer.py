"""Tests for ownllm.tokenizer: byte-level BPE, GPT-2 file layouts, char tokenizer, strict UTF-8 corpus reading.

Run: PYTHONPATH=src python -m pytest tests/test_tokenizer.py -q
The corpus is Python's own help text (pydoc_data), so the tests need no network and no shared data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydoc_data.topics import topics

from ownllm.errors import OwnLLMError
from ownllm.tokenizer import (
    EOT,
    Tokenizer,
    char_tokenizer_from_text,
    iter_text_chunks,
    load_tokenizer,
    read_text_file,
    save_gpt2_files,
    train_bpe,
    train_char,
)

TRICKY = (
    "Family 👩‍👩‍👧‍👦, thumbs 👍🏽, flag 🇯🇵, 中文字符 日本語 한국어, "
    "e\u0301 n\u0303 Z\u0324\u0354\u0367\u0311 "
    "line\r\nnext\ttab\x00nul  trailing   \n\n\u00a0nbsp\u2028sep\ufeffbom \U0001f600\n"
)
VARIED = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "def f(x):\n\treturn x ** 2  # comment\r\n",
    "numbers 1234567890 3.14159 -42",
    TRICKY,
    f"first document{EOT}second document{EOT}",
    "",
]
PROSE = (
    "The quick brown fox jumps over the lazy dog while the programmer reads the documentation "
    "about classes, functions and the statements of the language, and then writes a small example."
)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "python_docs.txt"
    path.write_text(EOT.join(topics.values()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus_file: Path) -> Tokenizer:
    return train_bpe([corpus_file], vocab_size=500, show_progress=False)


# --- byte-level BPE -------------------------------------------------------------------------------------------


def test_bpe_has_the_requested_vocabulary_and_eot(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 500
    assert bpe.eot_id is not None and 0 <= bpe.eot_id < 500


def test_bpe_round_trips_tricky_unicode(bpe: Tokenizer) -> None:
    for text in [TRICKY, *VARIED, "\x00", "\r", " ", "\t\t \n"]:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_compresses_english_prose(bpe: Tokenizer) -> None:
    ids = bpe.encode(PROSE)
    assert len(ids) < 0.6 * len(PROSE.encode("utf-8"))


def test_eot_in_text_becomes_the_single_eot_id(bpe: Tokenizer) -> None:
    assert bpe.encode(EOT) == [bpe.eot_id]
    ids = bpe.encode(f"one{EOT}two")
    assert ids.count(bpe.eot_id) == 1
    assert ids == bpe.encode("one") + [bpe.eot_id] + bpe.encode("two")
    assert bpe.decode(ids) == f"one{EOT}two"


def test_training_does_not_learn_pieces_of_eot(bpe: Tokenizer) -> None:
    pieces = [bpe.decode([i]) for i in range(bpe.vocab_size) if i != bpe.eot_id]
    assert not any("endoftext" in piece or "<|" in piece for piece in pieces)


def test_token_bytes_concatenate_to_the_utf8_text(bpe: Tokenizer) -> None:
    ids = bpe.encode(TRICKY)
    assert b"".join(bpe.token_bytes(i) for i in ids) == TRICKY.encode("utf-8")
    assert bpe.token_bytes(bpe.eot_id) == EOT.encode("utf-8")
    single_bytes = {bpe.token_bytes(i) for i in range(bpe.vocab_size) if len(bpe.token_bytes(i)) == 1}
    assert single_bytes == {bytes([b]) for b in range(256)}


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    assert bpe.encode_batch(VARIED) == [bpe.encode(text) for text in VARIED]


def test_decode_refuses_ids_outside_the_vocabulary(bpe: Tokenizer) -> None:
    with pytest.raises(OwnLLMError, match="outside the vocabulary"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(OwnLLMError, match="outside the vocabulary"):
        bpe.token_bytes(-1)


def test_bpe_save_and_load_give_identical_encodings(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir" / "tokenizer.json").is_file()
    for path in (tmp_path / "new" / "dir", tmp_path / "new" / "dir" / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == ("bpe", bpe.vocab_size, bpe.eot_id)
        assert loaded.encode_batch(VARIED) == bpe.encode_batch(VARIED)


def test_gpt2_vocab_and_merges_give_identical_encodings(bpe: Tokenizer, tmp_path: Path) -> None:
    save_gpt2_files(bpe, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = load_tokenizer(tmp_path)
    assert (loaded.vocab_size, loaded.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert loaded.encode_batch(VARIED) == bpe.encode_batch(VARIED)
    assert [loaded.token_bytes(i) for i in range(bpe.vocab_size)] == [bpe.token_bytes(i) for i in range(500)]


def test_openai_encoder_and_vocab_bpe_give_identical_encodings(bpe: Tokenizer, tmp_path: Path) -> None:
    save_gpt2_files(bpe, tmp_path / "hf")
    openai = tmp_path / "openai"
    openai.mkdir()
    (tmp_path / "hf" / "vocab.json").rename(openai / "encoder.json")
    merges = (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").split("\n", 1)[1]
    (openai / "vocab.bpe").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    loaded = load_tokenizer(openai)
    assert loaded.eot_id == bpe.eot_id
    assert loaded.encode_batch(VARIED) == bpe.encode_batch(VARIED)
    assert loaded.encode(f"a{EOT}b") == bpe.encode(f"a{EOT}b")


def test_gpt2_layout_without_eot_has_no_eot_id(tmp_path: Path) -> None:
    symbols = {"a": 0, "b": 1, "ab": 2}
    (tmp_path / "vocab.json").write_text(json.dumps(symbols), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.eot_id is None
    assert tok.encode("abba") == [2, 1, 0]


def test_mismatched_gpt2_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na c\n", encoding="utf-8")
    with pytest.raises(OwnLLMError, match="merges.txt"):
        load_tokenizer(tmp_path)


def test_save_gpt2_files_refuses_a_char_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="byte-level BPE"):
        save_gpt2_files(char_tokenizer_from_text("abc"), tmp_path)


def test_train_bpe_refuses_bad_arguments(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="257"):
        train_bpe([corpus_file], vocab_size=256, show_progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(OwnLLMError, match="no text to train on"):
        train_bpe([empty], vocab_size=300, show_progress=False)
    with pytest.raises(OwnLLMError, match="no such file"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300, show_progress=False)


def test_train_bpe_refuses_a_latin1_file(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("plain text\n" * 100, encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(OwnLLMError, match="bad.txt.*UTF-8"):
        train_bpe([good, bad], vocab_size=300, show_progress=False)


# --- char tokenizer ---------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_appends_eot() -> None:
    text = "hello wörld\r\n\t\x00 中"
    tok = char_tokenizer_from_text(text)
    assert tok.kind == "char"
    assert tok.vocab_size == len(set(text)) + 1
    assert tok.eot_id == tok.vocab_size - 1
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(f"he{EOT}ll") == [*tok.encode("he"), tok.eot_id, *tok.encode("ll")]
    assert tok.decode(tok.encode(f"he{EOT}")) == f"he{EOT}"
    assert tok.token_bytes(tok.encode("中")[0]) == "中".encode("utf-8")


def test_char_vocabulary_is_sorted_and_ignores_eot_text() -> None:
    tok = char_tokenizer_from_text(f"cab{EOT}ba")
    assert tok.vocab_size == 4
    assert tok.encode("abc") == [0, 1, 2]


def test_char_tokenizer_names_an_unknown_character() -> None:
    tok = char_tokenizer_from_text("abc")
    with pytest.raises(OwnLLMError, match="'z'"):
        tok.encode("abzy")


def test_char_save_and_load_give_identical_encodings(tmp_path: Path) -> None:
    text = "To be, or not to be: that is the question.\n\u00e9\u00e8 \U0001f600"
    tok = char_tokenizer_from_text(text)
    tok.save(tmp_path)
    record = json.loads((tmp_path / "char_vocab.json").read_text(encoding="utf-8"))
    assert record["kind"] == "char" and record["eot"] == EOT
    for path in (tmp_path, tmp_path / "char_vocab.json"):
        loaded = load_tokenizer(path)
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == ("char", tok.vocab_size, tok.eot_id)
        assert loaded.encode(text + EOT) == tok.encode(text + EOT)


def test_train_char_reads_all_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("xyz é", encoding="utf-8")
    tok = train_char([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert tok.encode("zé") == char_tokenizer_from_text("abc\nxyz é").encode("zé")


def test_saving_a_char_tokenizer_over_a_bpe_one_loads_the_char_one(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    char_tokenizer_from_text("abc").save(tmp_path)
    assert load_tokenizer(tmp_path).kind == "char"
    bpe.save(tmp_path)
    assert load_tokenizer(tmp_path).kind == "bpe"


# --- loading errors ---------------------------------------------------------------------------------------------


def test_load_tokenizer_on_an_empty_directory_says_what_it_expects(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="no tokenizer found in .*tokenizer.json, char_vocab.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_on_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="no such file"):
        load_tokenizer(tmp_path / "nowhere")


def test_load_tokenizer_on_a_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(OwnLLMError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "char_vocab.json").write_text(json.dumps({"kind": "char", "chars": ["ab"]}), encoding="utf-8")
    with pytest.raises(OwnLLMError, match="char_vocab.json"):
        load_tokenizer(tmp_path / "char_vocab.json")


# --- reading corpus files ---------------------------------------------------------------------------------------


def test_read_text_file_refuses_latin1_with_path_offset_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    with pytest.raises(OwnLLMError) as caught:
        read_text_file(path)
    message = str(caught.value)
    assert str(path) in message and "UTF-8" in message
    assert "offset 2" in message and "iconv" in message
    assert "\n" not in message


def test_read_text_file_refuses_a_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x00\x01\xff" + random.Random(0).randbytes(4000))
    with pytest.raises(OwnLLMError, match="blob.bin.*binary"):
        read_text_file(path)
    with pytest.raises(OwnLLMError, match="blob.bin.*binary"):
        list(iter_text_chunks(path))


def test_read_text_file_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="missing.txt: no such file"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(OwnLLMError, match="missing.txt: no such file"):
        list(iter_text_chunks(tmp_path / "missing.txt"))


def test_utf8_text_with_nul_and_crlf_is_read_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ok.txt"
    path.write_bytes(TRICKY.encode("utf-8"))
    assert read_text_file(path) == TRICKY


def test_chunks_join_to_the_file_text_and_end_at_lines(tmp_path: Path) -> None:
    text = "".join(f"line {i} é中😀\r\n" if i % 7 else "x" * 300 + "é\n" for i in range(400)) + "no newline at end"
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = list(iter_text_chunks(path, chunk_chars=64))
    assert "".join(chunks) == text == read_text_file(path)
    assert len(chunks) > 10
    assert all(chunk.endswith("\n") for chunk in chunks[:-1])


def test_chunks_cut_a_very_long_line_at_character_boundaries(tmp_path: Path) -> None:
    text = "é中😀" * 2000
    path = tmp_path / "one_line.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = list(iter_text_chunks(path, chunk_chars=50))
    assert len(chunks) > 1 and "".join(chunks) == text


def test_chunks_report_the_byte_offset_of_a_bad_byte_far_into_the_file(tmp_path: Path) -> None:
    good = "good line\n" * 1000
    path = tmp_path / "late.txt"
    path.write_bytes(good.encode("utf-8") + b"caf\xe9\n")
    with pytest.raises(OwnLLMError, match=f"offset {len(good) + 3}"):
        list(iter_text_chunks(path, chunk_chars=100))


def test_a_leading_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello\n".encode("utf-8"))
    assert read_text_file(path) == "hello\n"
    assert "".join(iter_text_chunks(path)) == "hello\n"
