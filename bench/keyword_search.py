"""Keyword search at scale: ownllm's in-memory BM25 (ownllm.ranking.BM25) against SQLite's FTS5 `bm25()`, on the
same synthetic collection: build time, query latency, memory, and whether their top 10 agree.

    PYTHONPATH=src nice -n 10 python bench/keyword_search.py [--chunks 100000] [--words 120] [--queries 200]

Chunks are `--words` words drawn from a Zipf-distributed vocabulary of 50,000 made-up words (natural text's word
frequencies, roughly); queries are 4 words of a random chunk. FTS5 is SQLite's full-text index (in Python's own
sqlite3, no new dependency); its `bm25()` uses k1 1.2, b 0.75 and ours k1 1.5, b 0.75, so top-10 overlap, not
identity, is reported. Last, the whole hybrid search of `ownllm ask` per question (BM25, exact cosine over random
unit vectors of `--dim`, weighted reciprocal rank fusion, top 4), the question's embedding left out. Times are wall-clock seconds on this machine; memory is the growth of the process's peak
resident set while building.
"""

from __future__ import annotations

import argparse
import resource
import sqlite3
import time

import numpy as np

from ownllm.ranking import BM25, fuse


def collection(chunks: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i:05d}x" for i in range(50_000)])
    ranks = np.minimum(rng.zipf(1.1, size=(chunks, words)), 50_000) - 1
    return [" ".join(row) for row in vocabulary[ranks]]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fts5_index(texts: list[str]) -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE VIRTUAL TABLE chunks USING fts5(text)")
    with connection:
        connection.executemany("INSERT INTO chunks (rowid, text) VALUES (?, ?)", enumerate(texts))
    return connection


def fts5_top(connection: sqlite3.Connection, query: str, k: int = 10) -> list[int]:
    match = " OR ".join(f'"{word}"' for word in query.split())
    return [row[0] for row in connection.execute(
        "SELECT rowid FROM chunks WHERE chunks MATCH ? ORDER BY bm25(chunks) LIMIT ?", (match, k))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=576, help="vector size for the hybrid timing (SmolLM2-135M's)")
    args = parser.parse_args()
    texts = collection(args.chunks, args.words)
    rng = np.random.default_rng(1)
    queries = [" ".join(rng.choice(texts[int(rng.integers(len(texts)))].split(), size=4)) for _ in range(args.queries)]

    before = peak_mb()
    start = time.perf_counter()
    ours = BM25(texts)
    ours_build, ours_memory = time.perf_counter() - start, peak_mb() - before
    start = time.perf_counter()
    ours_top = [list(np.argsort(-ours.scores(q), kind="stable")[:10]) for q in queries]
    ours_query = (time.perf_counter() - start) / len(queries)

    before = peak_mb()
    start = time.perf_counter()
    connection = fts5_index(texts)
    fts_build, fts_memory = time.perf_counter() - start, peak_mb() - before
    start = time.perf_counter()
    fts_top = [fts5_top(connection, q) for q in queries]
    fts_query = (time.perf_counter() - start) / len(queries)

    vectors = np.random.default_rng(2).standard_normal((len(texts), args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = time.perf_counter()
    for query in queries:  # what `ask` does per question after embedding it: BM25, exact cosine, fusion, top 4
        fused = fuse([ours.scores(query), vectors @ vectors[0]], (0.8, 0.2))
        np.argsort(-fused, kind="stable")[:4]
    hybrid_query = (time.perf_counter() - start) / len(queries)

    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ours_top, fts_top)])
    print(f"{args.chunks:,} chunks of {args.words} words, {args.queries} queries of 4 words")
    print("| keyword search | build (s) | chunks/s | query (ms) | peak memory growth (MB) |\n|---|---|---|---|---|")
    for name, build, query, memory in (("ownllm BM25 (in memory, numpy)", ours_build, ours_query, ours_memory),
                                       ("SQLite FTS5 bm25()", fts_build, fts_query, fts_memory)):
        print(f"| {name} | {build:.1f} | {args.chunks / build:,.0f} | {1000 * query:.1f} | {memory:,.0f} |")
    print(f"top-10 overlap between the two: {100 * overlap:.1f}%")
    print(f"hybrid search (ours + exact cosine over {args.dim}-dim float32 vectors, weighted RRF, top 4): "
          f"{1000 * hybrid_query:.1f} ms per question (the question's embedding not counted)")


if __name__ == "__main__":
    main()
