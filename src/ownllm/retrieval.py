"""Ask your own documents, privately: chunk a folder, embed the chunks, keep them in one local index file, and
retrieve with hybrid ranking (BM25 + embeddings, fused by reciprocal rank in weights calibrated on the index,
ownllm.ranking), keeping only sources relevant enough, and answer citing them.

    report = build_index("notes/", model="runs/smol", out="notes.index")   # again later: only changed files
    index = open_index("notes.index")
    hits = search(index, run, "How do I renew my permit?", k=4)            # ranked chunks with their sources

The index is one SQLite file (Python's own sqlite3: no extra dependency, one file, transactions): a `meta` table
(format, version, model, pooling, chunking, a probe vector that identifies the embedding model), `files` (path,
SHA-256 of the content) and `chunks` (file, lines, text, float32 vector). Search is exact (a matrix product over
all vectors; fine up to a few hundred thousand chunks on a laptop), and BM25 is computed in memory from the
chunk texts at load time (`ownllm.ranking.BM25`: a few lines, so no dependency). Building or updating an index
also calibrates it (`ownllm.ranking.calibrate`: the fusion weights and the relevance threshold, kept in `meta`). Re-indexing compares each file's hash and
re-embeds only new or changed files; a different model, pooling or chunking (or `force`) re-embeds everything.
Every update is made on a copy beside the index, renamed over it at the end: `ask` never sees half an update, and a
run killed at any moment leaves the previous index as it was. A file with no words is skipped (and counted); a
folder with no documents, or an `out` that is a folder, a document or a file other than an index, is refused
before the model loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ownllm.chat import chat_format_for, prompt_room, reply_to_prompt
from ownllm.chat_templates import Message
from ownllm.decoding import SamplingOptions
from ownllm.embeddings import default_pooling, embed_texts
from ownllm.documents import DOC_SUFFIXES, find_documents, read_document, read_documents  # noqa: F401
from ownllm.errors import OwnLLMError
from ownllm.model import check_pooling
from ownllm.outputs import check_output, temporary_path
from ownllm.ranking import BM25, RRF_K, Calibration, calibrate, fuse, ranks_of, relevance, words_of  # noqa: F401

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun

INDEX_FORMAT = "ownllm-index"
INDEX_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
PROBE_TEXT = "ownllm index probe: which model embedded these chunks?"
MODES = ("hybrid", "bm25", "embeddings")


# ---- chunking ------------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    path: str  # relative to the indexed folder
    start_line: int  # 1-based, inclusive
    end_line: int
    text: str

    @property
    def source(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"


def chunk_text(text: str, size: int = 200, overlap: int = 40) -> list[tuple[int, int]]:
    """(start, end) character spans of chunks of `size` words, each sharing `overlap` words with the one before."""
    if size < 1 or not 0 <= overlap < size:
        raise OwnLLMError(f"chunk size must be at least 1 and overlap in [0, size); got size {size}, overlap {overlap}")
    words = [match.span() for match in re.finditer(r"\S+", text)]
    spans = []
    start = 0
    while start < len(words):
        end = min(start + size, len(words))
        spans.append((words[start][0], words[end - 1][1]))
        if end == len(words):
            break
        start = end - overlap
    return spans


def chunk_file(text: str, path: str, size: int, overlap: int) -> list[Chunk]:
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    chunks = []
    for start, end in chunk_text(text, size, overlap):
        first = int(np.searchsorted(line_starts, start, side="right"))
        last = int(np.searchsorted(line_starts, end - 1, side="right"))
        chunks.append(Chunk(path, first, last, text[start:end]))
    return chunks


# ---- the index file ------------------------------------------------------------------------------------------------

@dataclass
class Index:
    path: Path
    meta: dict[str, Any]
    chunks: list[Chunk]
    vectors: np.ndarray  # [chunks, dim] float32, L2-normalised
    bm25: BM25
    calibration: Calibration | None = None  # fusion weights and relevance threshold (`ownllm.ranking`)


@dataclass
class IndexReport:
    files_embedded: int
    files_unchanged: int
    files_removed: int
    chunks_embedded: int
    chunks_total: int
    files_empty: list[str] = field(default_factory=list)  # documents with no words: nothing to index
    files_unreadable: list[str] = field(default_factory=list)  # "path (why)": skipped (ownllm.documents)

    def summary(self) -> str:
        """One line: what was embedded, kept, removed and skipped."""
        empty = ""
        if self.files_empty:
            shown = ", ".join(self.files_empty[:5]) + (", ..." if len(self.files_empty) > 5 else "")
            empty = f"; skipped {len(self.files_empty)} empty file{'s' * (len(self.files_empty) > 1)} ({shown})"
        unreadable = ""
        if self.files_unreadable:
            count = len(self.files_unreadable)
            unreadable = f"; skipped {count} unreadable file{'s' * (count > 1)}: {'; '.join(self.files_unreadable)}"
        return (f"embedded {self.chunks_embedded} chunks of {self.files_embedded} new or changed files; "
                f"{self.files_unchanged} unchanged, {self.files_removed} removed; {self.chunks_total} chunks in all"
                f"{empty}{unreadable}")


BUILD_HINT = " (build one with `ownllm index DOCS --model RUN --out FILE`)"


def _connect(path: Path, hint: str = BUILD_HINT) -> sqlite3.Connection:
    """An open index database; a missing, corrupt or foreign file is an OwnLLMError (ending with `hint`)."""
    try:
        head = path.open("rb").read(len(SQLITE_MAGIC))
    except OSError as error:
        raise OwnLLMError(f"{path}: cannot read the index ({error.strerror})") from None
    if head != SQLITE_MAGIC:
        raise OwnLLMError(f"{path}: not an ownllm index{hint}")
    connection = sqlite3.connect(path)
    try:
        rows = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as error:
        connection.close()
        raise OwnLLMError(f"{path}: not an ownllm index, or a damaged one ({error}){hint}") from None
    if rows.get("format") != json.dumps(INDEX_FORMAT):
        connection.close()
        raise OwnLLMError(f"{path}: not an ownllm index (a SQLite file of something else){hint}")
    if rows.get("version") != json.dumps(INDEX_VERSION):
        connection.close()
        raise OwnLLMError(f"{path}: index format version {rows.get('version')} is not supported (this ownllm "
                          f"reads {INDEX_VERSION}); rebuild it with `ownllm index`")
    return connection


def _read_meta(connection: sqlite3.Connection) -> dict[str, Any]:
    try:
        return {key: json.loads(value) for key, value in connection.execute("SELECT key, value FROM meta")}
    except ValueError as error:
        raise OwnLLMError(f"a damaged index (unreadable settings: {error})") from None


def _create(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL);
        CREATE TABLE chunks (id INTEGER PRIMARY KEY, path TEXT NOT NULL, start_line INTEGER, end_line INTEGER,
                             text TEXT NOT NULL, vector BLOB NOT NULL);
        CREATE INDEX chunks_by_path ON chunks(path);
    """)
    connection.executemany("INSERT INTO meta VALUES (?, ?)",
                           [("format", json.dumps(INDEX_FORMAT)), ("version", json.dumps(INDEX_VERSION))])
    connection.commit()
    return connection


def open_index(path: str | Path) -> Index:
    """Load an index file: chunks, their vectors and the BM25 statistics."""
    path = Path(path)
    connection = _connect(path)
    try:
        meta = _read_meta(connection)
        dim = int(meta.get("dim", 0))
        chunks, vectors = [], []
        for file, start, end, text, blob in connection.execute(
                "SELECT path, start_line, end_line, text, vector FROM chunks ORDER BY id"):
            if len(blob) != 4 * dim:
                raise OwnLLMError(f"{path}: a damaged index (a vector of {len(blob)} bytes, expected {4 * dim})")
            chunks.append(Chunk(file, start, end, text))
            vectors.append(np.frombuffer(blob, dtype="<f4"))
    except sqlite3.DatabaseError as error:
        raise OwnLLMError(f"{path}: a damaged index ({error})") from None
    finally:
        connection.close()
    matrix = np.stack(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    calibration = Calibration.from_json(meta["calibration"]) if meta.get("calibration") else None
    return Index(path, meta, chunks, matrix, BM25([c.text for c in chunks]), calibration)


def _settings(run: "LoadedRun", pooling: str, chunk_size: int, overlap: int) -> dict[str, Any]:
    probe = embed_texts(run, [PROBE_TEXT], pooling=pooling).vectors[0]
    return {"model": str(Path(run.path).resolve()), "pooling": pooling, "chunk_size": chunk_size,
            "overlap": overlap, "dim": int(probe.shape[0]), "probe": [round(float(x), 6) for x in probe]}


def _same_embedder(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = ("pooling", "chunk_size", "overlap", "dim")
    if any(old.get(key) != new[key] for key in keys) or len(old.get("probe", ())) != len(new["probe"]):
        return False
    return bool(np.allclose(old["probe"], new["probe"], atol=1e-4))


def check_index_output(out: str | Path) -> Path:
    """The index file `out`, checked before any work: a folder (the documents' own, say) or a file that is not an
    index (one of the documents, say) is refused, even to rebuild it: an output of the wrong kind is never touched.
    An index may live among the documents: it is never read as one."""
    out = check_output(out, "file", force=True)
    if out.exists():  # an existing index is updated (or rebuilt with force); anything else is refused
        _connect(out, hint="; choose another --out (a file that is not an index is never replaced)").close()
    return out


def build_index(docs: str | Path, model: "str | Path | LoadedRun", out: str | Path, *, chunk_size: int = 200,
                overlap: int = 40, pooling: str | None = None, batch_size: int = 16, force: bool = False,
                device: str = "auto", progress: Callable[[int, int], None] | None = None) -> IndexReport:
    """Index the .txt/.md/.rst files under `docs` into the file `out`, incrementally (see the module docstring;
    `force` re-embeds everything). The new index is written beside `out` and renamed over it at the end: a run
    interrupted at any moment (even killed) leaves the previous index as it was (or none).
    Without `pooling`, the model's own (`ownllm.embeddings.default_pooling`)."""
    from ownllm.device import pick_device
    from ownllm.runs import LoadedRun, load_run

    if pooling is not None:
        check_pooling(pooling)
    chunk_text("", chunk_size, overlap)  # validates the sizes before the model loads
    docs, out = Path(docs), check_index_output(out)
    files = find_documents(docs, leave_out=out.resolve())
    texts, unreadable = read_documents(docs, files)
    run = model if isinstance(model, LoadedRun) else load_run(model, device=pick_device(device))
    pooling = pooling or default_pooling(run)
    settings = _settings(run, pooling, chunk_size, overlap)
    staging = temporary_path(out)
    try:
        if out.exists() and not force:
            shutil.copyfile(out, staging)
            connection = _connect(staging)
        else:
            connection = _create(staging)
        with contextlib.closing(connection):
            report = _update(connection, texts, settings, run, chunk_size, overlap, batch_size, progress)
            report.files_unreadable = unreadable
            if report.chunks_embedded or report.files_removed or "calibration" not in _read_meta(connection):
                _store_calibration(connection, query_embedder(run, pooling))
        os.replace(staging, out)
    except BaseException as error:
        staging.unlink(missing_ok=True)
        if isinstance(error, sqlite3.DatabaseError):
            raise OwnLLMError(f"{out}: cannot update the index ({error})") from None
        raise
    return report


def _update(connection: sqlite3.Connection, texts: dict[str, str], settings: dict[str, Any], run: "LoadedRun",
            chunk_size: int, overlap: int, batch_size: int,
            progress: Callable[[int, int], None] | None) -> IndexReport:
    """Embed the new and changed documents of `texts` and write every change to the open index, in one
    transaction."""
    same = _same_embedder(_read_meta(connection), settings)
    known = dict(connection.execute("SELECT path, sha256 FROM files")) if same else {}
    hashes = {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in texts.items()}
    changed = [name for name in texts if known.get(name) != hashes[name]]
    chunks = [c for name in changed for c in chunk_file(texts[name], name, chunk_size, overlap)]
    vectors = embed_texts(run, [c.text for c in chunks], pooling=settings["pooling"], batch_size=batch_size,
                          progress=progress).vectors.numpy().astype("<f4") if chunks else None
    removed = _write_changes(connection, settings, same, changed, set(known) - set(texts), chunks, vectors, hashes)
    total = connection.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    return IndexReport(files_embedded=len(changed), files_unchanged=len(texts) - len(changed), files_removed=removed,
                       chunks_embedded=len(chunks), chunks_total=total,
                       files_empty=[name for name, text in texts.items() if not text.split()])


def _write_changes(connection: sqlite3.Connection, settings: dict[str, Any], same: bool, changed: list[str],
                   removed: set[str], chunks: list[Chunk], vectors: np.ndarray | None,
                   hashes: dict[str, str]) -> int:
    with connection:  # one transaction
        if not same:
            connection.execute("DELETE FROM chunks")
            connection.execute("DELETE FROM files")
        for name in [*changed, *removed]:
            connection.execute("DELETE FROM chunks WHERE path = ?", (name,))
            connection.execute("DELETE FROM files WHERE path = ?", (name,))
        connection.executemany(
            "INSERT INTO chunks (path, start_line, end_line, text, vector) VALUES (?, ?, ?, ?, ?)",
            [(c.path, c.start_line, c.end_line, c.text, vectors[i].tobytes()) for i, c in enumerate(chunks)])
        connection.executemany("INSERT INTO files VALUES (?, ?)", [(name, hashes[name]) for name in changed])
        connection.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               [(key, json.dumps(value)) for key, value in settings.items()])
    return len(removed)


def _store_calibration(connection: sqlite3.Connection, embed_queries: Callable[[list[str]], np.ndarray]) -> None:
    """Calibrate the fusion and the relevance threshold on the index's chunks (ownllm.ranking) and store them."""
    texts, blobs = [], []
    for text, blob in connection.execute("SELECT text, vector FROM chunks ORDER BY id"):
        texts.append(text)
        blobs.append(np.frombuffer(blob, dtype="<f4"))
    if not texts:
        return
    calibration = calibrate(BM25(texts), np.stack(blobs), embed_queries, texts)
    with connection:
        connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           ("calibration", json.dumps(calibration.to_json())))


def query_embedder(run: "LoadedRun", pooling: str) -> Callable[[list[str]], np.ndarray]:
    """A function embedding questions (float32 [n, dim], normalised) with `run`, as the index's queries are."""
    return lambda texts: embed_texts(run, texts, pooling=pooling, warn=False, role="query").vectors.numpy()


# ---- search and answers --------------------------------------------------------------------------------------------

LEXICAL_ONLY = Calibration((1.0, 0.0), 0.0, 1.0, 0.0, 0.0, 0, {})  # `--mode bm25` on an index with no calibration


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the ranking's own score (BM25, cosine or fused)
    relevance: float = 1.0  # 0..1, comparable across questions (ownllm.ranking.relevance)


def query_vector(index: Index, run: "LoadedRun") -> Callable[[str], np.ndarray]:
    """A function embedding queries as the index's chunks were (same model and pooling), checked by the probe."""
    settings = _settings(run, index.meta["pooling"], index.meta["chunk_size"], index.meta["overlap"])
    if not _same_embedder(index.meta, settings):
        raise OwnLLMError(f"{index.path}: was embedded with {index.meta.get('model')} ({index.meta.get('pooling')} "
                          f"pooling), not with {run.path}: pass that model, or re-index with this one")
    embed = query_embedder(run, index.meta["pooling"])
    return lambda text: embed([text])[0]


def index_calibration(index: Index, run: "LoadedRun") -> Calibration:
    """The index's calibration; an index built before there was one is calibrated now (in memory)."""
    if index.calibration is None:
        query_vector(index, run)  # the same embedder, checked
        index.calibration = calibrate(index.bm25, index.vectors, query_embedder(run, index.meta["pooling"]),
                                      [c.text for c in index.chunks])
    return index.calibration


def rank(index: Index, query: str, vector: np.ndarray | None, mode: str = "hybrid",
         weights: tuple[float, float] | None = None) -> np.ndarray:
    """Scores of every chunk for a query: BM25, cosine similarity, or their weighted reciprocal rank fusion
    (`weights` for BM25 and the embeddings: the index's calibrated ones, ownllm.ranking)."""
    if mode not in MODES:
        raise OwnLLMError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    lexical = index.bm25.scores(query) if mode != "embeddings" else None
    dense = index.vectors @ vector if mode != "bm25" else None
    if mode == "bm25":
        return lexical
    if mode == "embeddings":
        return dense
    return fuse([lexical, dense], weights or (index.calibration.weights if index.calibration else None))


def search(index: Index, run: "LoadedRun", query: str, k: int = 4, mode: str = "hybrid",
           min_relevance: float | None = None) -> list[Hit]:
    """The top-k chunks for `query`, best first, each with its relevance; those below `min_relevance` are left
    out (None: the index's calibrated threshold; 0: none left out)."""
    if not query.strip():
        raise OwnLLMError("the question is empty; ask something")
    if not index.chunks:
        raise OwnLLMError(f"{index.path}: the index holds no chunks (was the folder empty?)")
    if mode not in MODES:
        raise OwnLLMError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    vector = query_vector(index, run)(query) if mode != "bm25" else None
    calibration = index_calibration(index, run) if mode != "bm25" or min_relevance is None \
        else index.calibration or LEXICAL_ONLY
    scores = rank(index, query, vector, mode, calibration.weights)
    best = np.argsort(-scores, kind="stable")[:k]
    similarities = index.vectors[best] @ vector if vector is not None else None
    relevances = relevance(index.bm25, calibration, query, list(best), similarities)
    if min_relevance is None:
        min_relevance = calibration.min_relevance if vector is not None else calibration.min_lexical_relevance
    return [Hit(index.chunks[i], float(scores[i]), round(float(r), 4)) for i, r in zip(best, relevances)
            if r >= min_relevance]


NO_ANSWER = "The documents do not say."
INSTRUCTION = ("Answer the question from the numbered sources, in one or two sentences, and cite the source of "
               "each fact as [1], [2], ... If the sources do not answer it, reply exactly: " + NO_ANSWER)


def build_question_prompt(question: str, hits: Sequence[Hit]) -> str:
    """The user message of a question and its numbered sources."""
    sources = "\n\n".join(f"[{i + 1}] ({hit.chunk.source})\n{hit.chunk.text}" for i, hit in enumerate(hits))
    return f"{INSTRUCTION}\n\nSources:\n{sources}\n\nQuestion: {question}"


def _worked_example(question: str, source: str, text: str, reply: str) -> list[Message]:
    return [Message("user", build_question_prompt(question, [Hit(Chunk(source, 3, 4, text), 1.0)])),
            Message("assistant", reply)]


# One worked exchange before the real question: an answer that cites. (A second one replying NO_ANSWER made
# SmolLM2-135M reply NO_ANSWER to every question: bench/grounded_answers.py, docs/benchmarks.md; refusals come from
# the relevance threshold instead.)
EXAMPLES = _worked_example("How long does the bread bake?", "recipes.md",
                           "Bake the bread for 40 minutes at 220 degrees.", "40 minutes, at 220 degrees [1].")


def question_messages(question: str, hits: Sequence[Hit], examples: bool = True) -> list[Message]:
    """The conversation that asks a question from its sources: the worked examples, then the question."""
    return [*(EXAMPLES if examples else []), Message("user", build_question_prompt(question, hits))]


def fit_question(encode: Callable[[list[Message]], list[int]], question: str, hits: Sequence[Hit],
                 block_size: int, max_new_tokens: int) -> tuple[list[int], list[Hit]]:
    """(prompt ids, hits) of a question: as many of the best sources as fit (`sources_that_fit`), and the worked
    examples before them when they fit too (they never cost a source). `encode(messages)` renders the prompt."""
    prompt, kept = sources_that_fit(lambda chosen: encode(question_messages(question, chosen, examples=False)),
                                    hits, block_size, max_new_tokens)
    with_examples = encode(question_messages(question, kept))
    if len(with_examples) <= prompt_room(block_size, max_new_tokens):
        return with_examples, kept
    return prompt, kept


def sources_that_fit(encode: Callable[[Sequence[Hit]], list[int]], hits: Sequence[Hit], block_size: int,
                     max_new_tokens: int) -> tuple[list[int], list[Hit]]:
    """(prompt ids, hits) with as many of the best `hits` as fit the context beside the answer (`prompt_room`, the
    chat rule): the one context budget of `ask` and the server. `encode(hits)` renders a prompt; a prompt that
    does not fit even with one source is an OwnLLMError."""
    room = prompt_room(block_size, max_new_tokens)
    kept = list(hits)
    while True:
        prompt = encode(kept)
        if len(prompt) <= room:
            return prompt, kept
        if len(kept) <= 1:
            raise OwnLLMError(f"the question and its best source take {len(prompt)} tokens, more than fit the "
                              f"context ({block_size}) with the answer: use smaller chunks or fewer answer tokens")
        kept.pop()


def answer(run: "LoadedRun", index: Index, question: str, *, k: int = 4, mode: str = "hybrid",
           options: SamplingOptions | None = None, embedder: "LoadedRun | None" = None,
           on_text: Callable[[str], None] | None = None, min_relevance: float | None = None,
           hits: Sequence[Hit] | None = None) -> tuple[str, list[Hit]]:
    """Retrieve the top-k chunks at least `min_relevance` relevant (None: the index's calibrated threshold;
    queries embedded by `embedder`, default `run`), put as many as fit in the prompt and answer in the run's chat
    format (ownllm.chat; greedy, 256 tokens unless `options` say otherwise), citing them as [n]. With no relevant
    chunk, the answer is NO_ANSWER and the model is not asked. `hits`: already retrieved ones."""
    if run.run_config.get("task") == "classify":
        raise OwnLLMError(f"{run.path}: is a classifier run, which predicts labels, not answers; pass a language "
                          "model to answer (an instruct run or a chat model), the classifier as --embed-model if it "
                          "embedded the index")
    if hits is None:
        hits = search(index, embedder or run, question, k=k, mode=mode, min_relevance=min_relevance)
    if not hits:
        if on_text is not None:
            on_text(NO_ANSWER)
        return NO_ANSWER, []
    options = options or SamplingOptions(max_new_tokens=256, temperature=0)
    chat_format = chat_format_for(run.run_config, run.tokenizer)
    prompt, hits = fit_question(chat_format.encode, question, hits, run.config.block_size, options.max_new_tokens)
    return reply_to_prompt(run.model, chat_format, prompt, options, on_text), hits


def hit_record(hit: Hit) -> dict[str, Any]:
    """A source as `ask --json` and the server return it."""
    return {"file": hit.chunk.path, "lines": [hit.chunk.start_line, hit.chunk.end_line], "score": round(hit.score, 6),
            "relevance": hit.relevance, "text": hit.chunk.text}


def read_questions(path: str | Path) -> list[str]:
    """The questions of a JSONL file (one {"question": "..."} per line; blank lines skipped); a line that is not
    such an object is an OwnLLMError naming the file and line."""
    from ownllm.data.records import json_lines

    questions = []
    for number, record in json_lines(path):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise OwnLLMError(f"{path}:{number}: needs a non-empty string field \"question\"")
        questions.append(question)
    if not questions:
        raise OwnLLMError(f"{path}: no questions (one {{\"question\": ...}} per line)")
    return questions
