"""Index and ask: chunking, BM25, rank fusion, `ownllm index` (incremental by content hash), `ownllm ask`, and the
one-line answer to a corrupt or foreign index file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from embedding_helpers import assert_one_line_error, tiny  # noqa: F401  (tiny is a fixture)

DOCS = {
    "permits.md": "# Permits\n\nTo renew a parking permit, bring the old permit and a utility bill to the town hall "
                  "before it expires.\nRenewal costs twenty euros.",
    "garden.txt": "Water tomatoes in the morning. Compost keeps the soil rich and the worms happy.",
    "notes/python.txt": "The for statement iterates over the items of any sequence, such as a list or a string.",
    "bikes.md": "Oil the chain of the bicycle every month and check the tyre pressure before long rides.",
}


def write_docs(folder: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_chunks_overlap_and_keep_their_lines():
    from ownllm.retrieval import chunk_file, chunk_text

    text = " ".join(f"w{i}" for i in range(10))
    assert [text[s:e].split() for s, e in chunk_text(text, size=4, overlap=1)] == [
        ["w0", "w1", "w2", "w3"], ["w3", "w4", "w5", "w6"], ["w6", "w7", "w8", "w9"]]
    chunks = chunk_file("a b\nc d\n\ne f\n", "x.txt", size=2, overlap=0)
    assert [(c.text, c.start_line, c.end_line) for c in chunks] == [("a b", 1, 1), ("c d", 2, 2), ("e f", 4, 4)]
    assert chunks[1].source == "x.txt:2-2"


def test_bm25_prefers_rare_matching_words_and_fusion_rewards_agreement():
    from ownllm.retrieval import BM25, fuse

    bm25 = BM25(["the cat sat on the mat", "the dog barked", "the the the the"])
    scores = bm25.scores("the cat")
    assert scores.argmax() == 0 and scores[1] < scores[0] and scores[1] > 0
    assert bm25.scores("zebra").tolist() == [0.0, 0.0, 0.0]
    fused = fuse([np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0])])
    assert fused.argmax() == 1  # second in one ranking and first in the other beats first and last


def test_index_then_ask_end_to_end(tiny, tmp_path, capsys):  # noqa: F811
    import ownllm
    from ownllm.cli import main
    from ownllm.chat import ChatFormat, chat_reply
    from ownllm.chat_templates import get_template
    from ownllm.decoding import SamplingOptions
    from ownllm.retrieval import build_question_prompt, open_index, question_messages, search

    docs = write_docs(tmp_path / "docs", DOCS)
    index_file = tmp_path / "docs.index"
    assert main(["index", str(docs), "--model", str(tiny), "--out", str(index_file), "--chunk-size", "12",
                 "--overlap", "3"]) == 0
    assert "embedded 9 chunks of 4 new or changed files" in capsys.readouterr().out
    question = "How do I renew my parking permit?"
    assert main(["ask", str(tiny), "--index", str(index_file), question, "-k", "2", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    answer, sources = printed.split("\n\nsources:\n")
    assert sources.splitlines()[0].startswith("  [1] permits.md:1-3  (relevance ")
    run = ownllm.load(tiny)
    hits = search(open_index(index_file), run, question, k=2)
    assert [f"  [{i + 1}] {h.chunk.source}  (relevance {h.relevance:.2f})" for i, h in enumerate(hits)] == \
        sources.splitlines()
    prompt = build_question_prompt(question, hits)
    assert "[1] (permits.md:1-3)\n# Permits" in prompt and prompt.endswith(question)
    chatml = ChatFormat(run.tokenizer, get_template("chatml"))
    examples = len(chatml.encode(question_messages(question, hits))) <= 512 - 8  # the tiny BPE spends many tokens
    expected = chat_reply(run.model, chatml, question_messages(question, hits, examples),
                          SamplingOptions(max_new_tokens=8, temperature=0))
    assert answer == expected  # the run's chat template (ChatML for a base model), greedy


def test_reindexing_embeds_only_the_changed_file(tiny, tmp_path):  # noqa: F811
    import ownllm
    from ownllm.retrieval import build_index, open_index

    run = ownllm.load(tiny)
    docs = write_docs(tmp_path / "docs", DOCS)
    index_file = tmp_path / "docs.index"
    first = build_index(docs, run, index_file, chunk_size=12, overlap=3)
    assert (first.files_embedded, first.chunks_embedded, first.chunks_total) == (4, 9, 9)
    before = open_index(index_file)
    (docs / "garden.txt").write_text("Water tomatoes at dawn; compost feeds the soil.", encoding="utf-8")
    (docs / "bikes.md").unlink()
    (docs / "new.txt").write_text("A new note about taxes.", encoding="utf-8")
    again = build_index(docs, run, index_file, chunk_size=12, overlap=3)
    assert (again.files_embedded, again.files_unchanged, again.files_removed) == (2, 2, 1)
    assert again.chunks_embedded == 2 and again.chunks_total == 7
    after = open_index(index_file)
    kept = {(c.source, c.text): v for c, v in zip(before.chunks, before.vectors)
            if c.path in ("permits.md", "notes/python.txt")}
    still = {(c.source, c.text): v for c, v in zip(after.chunks, after.vectors) if (c.source, c.text) in kept}
    assert len(still) == len(kept) == 5 and all(np.array_equal(kept[key], v) for key, v in still.items())
    assert build_index(docs, run, index_file, chunk_size=12, overlap=3).chunks_embedded == 0
    resized = build_index(docs, run, index_file, chunk_size=30, overlap=3)  # new chunking: everything again
    assert resized.files_embedded == 4 and resized.chunks_total == 4
    rebuilt = build_index(docs, run, index_file, chunk_size=30, overlap=3, force=True)  # --force: from scratch
    assert (rebuilt.files_embedded, rebuilt.files_unchanged, rebuilt.chunks_total) == (4, 0, 4)
    (docs / "empty.md").write_text(" \n\n", encoding="utf-8")
    skipped = build_index(docs, run, index_file, chunk_size=30, overlap=3)
    assert skipped.files_empty == ["empty.md"] and skipped.chunks_total == 4
    assert skipped.summary().endswith("4 chunks in all; skipped 1 empty file (empty.md)")


@pytest.mark.parametrize("kind", ["garbage", "foreign-sqlite", "truncated"])
def test_a_corrupt_or_foreign_index_is_one_line_and_exit_2(tiny, tmp_path, capsys, kind):  # noqa: F811
    from ownllm.cli import main
    from ownllm.retrieval import build_index

    index_file = tmp_path / "docs.index"
    if kind == "garbage":
        index_file.write_bytes(b"\x00not an index at all" * 50)
    elif kind == "foreign-sqlite":
        with sqlite3.connect(index_file) as connection:
            connection.execute("CREATE TABLE notes (body TEXT)")
    else:
        build_index(write_docs(tmp_path / "docs", DOCS), tiny, index_file, chunk_size=12, overlap=3)
        index_file.write_bytes(index_file.read_bytes()[:2048])
    capsys.readouterr()
    code = main(["ask", str(tiny), "--index", str(index_file), "a question"])
    assert_one_line_error(code, capsys.readouterr().err, str(index_file))
    code = main(["index", str(tmp_path), "--model", str(tiny), "--out", str(index_file)])
    assert_one_line_error(code, capsys.readouterr().err, str(index_file))


# A real `ownllm index` process, paused (a patched step sleeps) at a moment of its update, for the test to kill -9.
PAUSED_INDEX = """
import sys, time
import ownllm.retrieval as retrieval
from ownllm.cli import main

moment, real_write = sys.argv[1], retrieval._write_changes

def pause():
    print("paused", flush=True)
    time.sleep(120)

def write_changes(connection, *args):
    if moment == "mid-transaction":
        connection.execute("DELETE FROM chunks")  # the update's transaction has begun: no chunks in it
        pause()
    if moment == "before-write":
        pause()
    removed = real_write(connection, *args)
    if moment == "after-commit":
        pause()
    return removed

retrieval._write_changes = write_changes
sys.exit(main(sys.argv[2:]))
"""


def test_an_index_update_killed_at_any_moment_leaves_the_previous_index_usable(tiny, tmp_path, capsys):  # noqa: F811
    import os
    import subprocess
    import sys

    from ownllm.cli import main
    from ownllm.retrieval import build_index

    docs = write_docs(tmp_path / "docs", DOCS)
    index_file = tmp_path / "docs.index"
    build_index(docs, tiny, index_file, chunk_size=12, overlap=3)
    ask = ["ask", str(tiny), "--index", str(index_file), "How are parking permits renewed?", "--sources-only",
           "--min-relevance", "0"]
    assert main(ask) == 0
    sources, before = capsys.readouterr().out, index_file.read_bytes()
    (docs / "permits.md").write_text("Permits are renewed online now.", encoding="utf-8")
    (docs / "bikes.md").unlink()
    command = [sys.executable, "-c", PAUSED_INDEX, "MOMENT", "index", str(docs), "--model", str(tiny), "--out",
               str(index_file), "--chunk-size", "12", "--overlap", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [subprocess.Popen([*command[:3], moment, *command[4:]], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for moment in ("before-write", "mid-transaction", "after-commit")]  # three at once, one index
    for process in processes:
        assert process.stdout.readline() == "paused\n", process.stderr.read()
        process.kill()  # kill -9
        assert process.wait(timeout=30) == -9
    assert index_file.read_bytes() == before  # untouched by the three killed updates
    assert main(ask) == 0 and capsys.readouterr().out == sources  # `ask` reads it as before

    report = build_index(docs, tiny, index_file, chunk_size=12, overlap=3)  # the next run completes
    assert (report.files_embedded, report.files_unchanged, report.files_removed) == (1, 2, 1)
    assert main(ask) == 0 and "permits.md:1-1" in capsys.readouterr().out
