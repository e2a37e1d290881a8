"""The embedding and retrieval verbs: embed, index and ask, thin calls into
`ownllm.embeddings` and `ownllm.retrieval`.

    ownllm embed runs/smol --input texts.txt --output vectors.jsonl [--pooling mean|last|weighted-mean]
                                          # default: the model's own (a GGUF's pooling_type), else mean
    ownllm index notes/ --model runs/smol --out notes.index [--chunk-size 200 --overlap 40]   # incremental
    ownllm ask runs/smol --index notes.index "How do I renew my permit?" [-k 4] [--min-relevance 0.3]
    ownllm ask runs/smol --index notes.index --questions q.jsonl [--sources-only] --json    # one line each
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ownllm.cli.common import (
    QUANTIZE_HELP,
    add_compile_flag,
    add_device_flag,
    add_force_flag,
    add_loading_flags,
    add_out_flag,
    add_sampling_flags,
    compile_if_asked,
    sampling_options,
)
from ownllm.embeddings import LONG_TEXTS
from ownllm.errors import OwnLLMError
from ownllm.model import POOLINGS

if TYPE_CHECKING:
    from ownllm.decoding import SamplingOptions
    from ownllm.retrieval import Index
    from ownllm.runs import LoadedRun


def add_parsers(sub: argparse._SubParsersAction) -> None:
    emb = sub.add_parser("embed", help="embed texts (one per line) into vectors (JSON Lines)",
                         description="One output line {\"line\": N, \"embedding\": [...]} per input line, in order.")
    emb.add_argument("model", help="run directory or Hugging Face model directory")
    emb.add_argument("--input", required=True, help="UTF-8 text file, one text per line ('-' = stdin)")
    emb.add_argument("--output", required=True, help="JSON Lines file to write (replaced atomically)")
    _add_embedding_flags(emb)
    emb.add_argument("--long-texts", choices=LONG_TEXTS, default="truncate",
                     help="a text longer than the context: keep its start (truncate) or average its pieces (chunk)")
    emb.add_argument("--no-normalize", action="store_true", help="raw pooled vectors instead of unit length")
    emb.add_argument("--as", dest="role", choices=["document", "query"], default="document",
                     help="what the texts are, for an embedder trained with prefixes (`finetune embed`): its "
                          "document or query prefix goes first (default document)")
    add_device_flag(emb)
    add_force_flag(emb, "replace an existing --output file")

    idx = sub.add_parser("index", help="chunk and embed a folder of .txt/.md files into one index file "
                                       "(re-running re-embeds only changed files)")
    idx.add_argument("docs", help="folder of documents (.txt, .md, .rst; searched recursively)")
    idx.add_argument("--model", required=True, help="the embedding model: run or Hugging Face directory")
    add_out_flag(idx, "index file (created, or updated: only changed files re-embedded)")
    add_force_flag(idx, "rebuild the index from scratch (a file that is not an index is never replaced)")
    idx.add_argument("--chunk-size", type=int, default=200, help="words per chunk")
    idx.add_argument("--overlap", type=int, default=40, help="words shared by neighbouring chunks")
    _add_embedding_flags(idx)
    add_device_flag(idx)

    ask = sub.add_parser("ask", help="answer a question from an index's documents, citing the sources used",
                         formatter_class=argparse.RawDescriptionHelpFormatter, description=ASK_DESCRIPTION)
    ask.add_argument("model", help="the answering model (an instruct run or a Hugging Face chat model)")
    ask.add_argument("question", nargs="?", help="the question (or --questions FILE)")
    ask.add_argument("--index", required=True, help="index file made by `ownllm index`")
    ask.add_argument("--questions", help="JSONL file, one {\"question\": ...} per line: one answer line each, in order")
    ask.add_argument("--embed-model", help="the model that embedded the index (default: the answering model)")
    ask.add_argument("-k", "--chunks", type=int, default=4, help="retrieved chunks put in the prompt (default 4)")
    ask.add_argument("--mode", choices=["hybrid", "bm25", "embeddings"], default="hybrid",
                     help="retrieval ranking (default hybrid: BM25 and embeddings fused with the weights calibrated "
                          "on the index; see above)")
    ask.add_argument("--min-relevance", type=_relevance, default=None, metavar="R",
                     help="leave out sources less relevant than R (0..1; default: the index's calibrated threshold; "
                          "0 keeps all)")
    ask.add_argument("--sources-only", action="store_true", help="print the retrieved sources, do not answer")
    ask.add_argument("--json", action="store_true",
                     help="one JSON line per question: question, sources (file, lines, score, relevance, text), "
                          "answer")
    add_sampling_flags(ask)
    ask.set_defaults(max_new_tokens=256, temperature=0.0, late_positional="question")
    add_loading_flags(ask, QUANTIZE_HELP + " (the answering model's; the question is embedded as the index was)")
    add_compile_flag(ask)


ASK_DESCRIPTION = """Answer from your documents, citing them as [1], [2], ...

Ranking (--mode): `hybrid` (default) ranks by BM25 and by embedding similarity and fuses the two rankings by
reciprocal rank, weighted as calibrated on the index itself when it was built: pseudo-queries drawn from the chunks
must find their chunk, and the embeddings get the share (0..1) that finds them best. An untrained embedder gets
weight 0 (hybrid is then BM25); a retriever fine-tuned with `finetune embed` gets a share. Pick `bm25` for exact
names and numbers with no embedder you trust, `embeddings` for paraphrases with an embedder trained for retrieval.

Relevance: every source gets a relevance (0..1: the share of the question's rare words it holds, blended with its
embedding similarity); sources under --min-relevance (default: the index's calibrated threshold) are left out, and
when none is left the answer is "The documents do not say." without asking the model."""


def _relevance(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {text}")
    return value


def _add_embedding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pooling", choices=POOLINGS, default=None,
                        help="mean over tokens, the last token, or position-weighted mean (SGPT); default: the "
                             "model's own (a GGUF file's pooling_type, kept on import), else mean")
    parser.add_argument("--batch-size", type=int, default=16)


class _Progress:
    """A progress bar on a terminal, made at the first `update(done, total)` and closed at the end of the block."""

    def __init__(self, unit: str) -> None:
        self.unit, self.bar = unit, None

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit=self.unit, disable=not sys.stderr.isatty(), file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_embed(args: argparse.Namespace) -> None:
    from ownllm.embeddings import embed_file

    with _Progress("text") as bar:
        report = embed_file(args.model, args.input, args.output, force=args.force, pooling=args.pooling,
                            normalize=not args.no_normalize, long_texts=args.long_texts, batch_size=args.batch_size,
                            device=args.device, progress=bar.update, role=args.role)
    print(f"{report.texts} vectors of {report.dim} dimensions ({report.pooling} pooling) written to {args.output}",
          file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> None:
    from ownllm.retrieval import build_index

    with _Progress("chunk") as bar:
        report = build_index(args.docs, args.model, args.out, chunk_size=args.chunk_size, overlap=args.overlap,
                             pooling=args.pooling, batch_size=args.batch_size, force=args.force, device=args.device,
                             progress=bar.update)
    print(f"{args.out}: {report.summary()}")


def cmd_ask(args: argparse.Namespace) -> None:
    from ownllm.chat import chat_settings
    from ownllm.device import pick_device
    from ownllm.retrieval import open_index, read_questions
    from ownllm.runs import load_run

    if (args.question is None) == (args.questions is None):
        raise OwnLLMError("ask takes a question or --questions FILE (one of the two)")
    questions = read_questions(args.questions) if args.questions else [args.question]
    sampling_options(args)  # the flags given are checked before anything loads
    index = open_index(args.index)  # a bad index file fails before any model loads
    device = pick_device(args.device)
    run = load_run(args.model, device=device, quantize=args.quantize)  # loaded once for every question
    compile_if_asked(args, run.model)
    same_weights = args.quantize == "auto" and not args.embed_model  # `ownllm index` loads with the default
    embedder = run if same_weights else load_run(args.embed_model or args.model, device=device)
    options = None if args.sources_only else sampling_options(args, chat_settings(run.run_config))
    for question in questions:
        _ask_one(args, run, embedder, index, question, options)


def _ask_one(args: argparse.Namespace, run: "LoadedRun", embedder: "LoadedRun", index: "Index", question: str,
             options: "SamplingOptions | None") -> None:
    from ownllm.retrieval import answer, hit_record, search

    hits = search(index, embedder, question, k=args.chunks, mode=args.mode, min_relevance=args.min_relevance)
    text = None
    if not args.sources_only:
        stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        text, hits = answer(run, index, question, options=options, on_text=stream, hits=hits)
    if args.json:
        record = {"question": question, "sources": [hit_record(h) for h in hits]}
        if text is not None:
            record["answer"] = text.strip()
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    if text is not None:
        sys.stdout.write("\n\n")
    print("sources:" if hits else "sources: none relevant enough (--min-relevance)")
    for number, hit in enumerate(hits, start=1):
        print(f"  [{number}] {hit.chunk.source}  (relevance {hit.relevance:.2f})")


COMMANDS = {"embed": cmd_embed, "index": cmd_index, "ask": cmd_ask}
