"""Text embeddings from any run ownllm loads: one vector per text, pooled from the model's final hidden states.

    run = ownllm.load("runs/smol")
    vectors = embed_texts(run, ["first text", "second text"], pooling="mean").vectors   # [2, n_embd], float32
    embed_file("runs/smol", "texts.txt", "vectors.jsonl")   # `ownllm embed`: one JSON line per text, in order

Poolings (`ownllm.model.pool`, which the classification head uses too): `mean` (average over the text's tokens),
`last` (the hidden state of the last real token), `weighted-mean` (SGPT's position weighting). Vectors are
L2-normalised unless `normalize=False` (then cosine similarity is a dot product). Without a pooling, a run's own is
used (`default_pooling`: its run config's `embedding_pooling`, which a GGUF's `{arch}.pooling_type` sets on
import and `ownllm finetune embed` sets to the pooling it trained), else `mean`. A retrieval embedder trained by
`finetune embed` also keeps the prefixes its queries and documents were trained with (config.json
"embedding_prefixes"); `embed_texts(..., role="query")` puts the query one first, `role="document"` (the default:
`ownllm embed`, `ownllm index`) the document one.

`embed_file` reads one text per line (a blank line is skipped and counted, `ownllm.data.records`; the output keeps
each text's line number) and writes `{"line": N, "embedding": [...]}` lines by the rules of `ownllm.outputs`: never
over its input, an existing file only with `force`, under a temporary name renamed at the end.

Padding-safe: texts are right-padded in length-sorted batches; a causal model's real tokens never attend to the
padding after them and the pooling reads real tokens only, so a text's vector does not depend on its batch
neighbours. A text longer than the context window is cut to its start (`long_texts="truncate"`) or split into
context-sized pieces whose pooled vectors are averaged, weighted by their token counts (`"chunk"`); both warn.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ownllm.data.batching import fixed_batches
from ownllm.data.labelled import pad_right
from ownllm.data.records import Location, keep_informative
from ownllm.errors import OwnLLMError
from ownllm.model import POOLINGS, GPT, check_pooling, pool
from ownllm.outputs import atomic_file, check_output, warn

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun
    from ownllm.tokenizer import Tokenizer

LONG_TEXTS = ("truncate", "chunk")
ROLES = ("document", "query")  # what a text is to a retrieval embedder: its prefix (`embedding_prefix`)


@dataclass
class Embeddings:
    """Vectors [texts, n_embd] (float32, on the CPU), the tokens each text used, and how many were cut/split."""

    vectors: Tensor
    token_counts: list[int]
    shortened: int = 0


def default_pooling(run: "LoadedRun") -> str:
    """The pooling a run embeds with when none is asked for: its run config's `embedding_pooling`, else mean."""
    pooling = run.run_config.get("embedding_pooling") or "mean"
    if pooling not in POOLINGS:
        raise OwnLLMError(f"{run.path}: embedding_pooling in its config must be one of {', '.join(POOLINGS)}, "
                          f"not {pooling!r}")
    return pooling


def embedding_prefix(run_config: dict, role: str) -> str:
    """What goes before a text of `role` ("query" or "document") for this run: the prefixes a retrieval embedder was
    trained with (config.json "embedding_prefixes", `ownllm finetune embed`, or a Sentence Transformers model's
    prompts read on import: Qwen3-Embedding's instruction before queries), else nothing."""
    if role not in ROLES:
        raise OwnLLMError(f"a text's role must be one of {', '.join(ROLES)}, not {role!r}")
    return (run_config.get("embedding_prefixes") or {}).get(role) or ""


def encode_for_embedding(tokenizer: "Tokenizer", texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as the model reads a document: a begin-of-sequence token first where the model
    uses one; an empty text becomes the end-of-text token (a vector still comes out)."""
    rows = [tokenizer.starting_sequence(ids) for ids in tokenizer.encode_batch(list(texts))]
    fallback = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    return [ids or list(fallback) for ids in rows]


@torch.inference_mode()
def encode_rows(model: GPT, rows: Sequence[Sequence[int]], head: Callable[[Tensor, Tensor], Tensor], width: int,
                *, pad_id: int = 0, batch_size: int = 16,
                progress: Callable[[int, int], None] | None = None) -> Tensor:
    """`head(ids, lengths)` -> [batch, width] over token-id rows, in right-padded batches of similar length, as
    float32 [len(rows), width] on the CPU in input order: the one loop behind embeddings and classification.
    `progress(done, total)` is called after each batch, counting rows."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    out = torch.empty(len(rows), width, dtype=torch.float32)
    done = 0
    for indices in fixed_batches([len(row) for row in rows], batch_size):
        ids, lengths = pad_right([rows[i] for i in indices], pad_id)
        out[indices] = head(ids.to(device), lengths.to(device)).float().cpu()
        done += len(indices)
        if progress is not None:
            progress(done, len(rows))
    model.train(was_training)
    return out


def embed_ids(model: GPT, rows: Sequence[Sequence[int]], pooling: str = "mean", batch_size: int = 16,
              progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Pooled (not normalised) float32 vectors [len(rows), n_embd] of token-id rows that fit the context window,
    in input order."""
    check_pooling(pooling)
    if any(not row for row in rows):
        raise OwnLLMError("every text to embed needs at least one token")
    longest = max((len(row) for row in rows), default=0)
    if longest > model.config.block_size:
        raise OwnLLMError(f"a text of {longest} tokens is longer than the context window ({model.config.block_size})")
    return encode_rows(model, rows, lambda ids, lengths: pool(model.hidden_states(ids).float(), lengths, pooling),
                       model.config.n_embd, batch_size=batch_size, progress=progress)


def normalize_rows(vectors: Tensor) -> Tensor:
    return torch.nn.functional.normalize(vectors, dim=-1)


def embed_token_rows(model: GPT, rows: Sequence[Sequence[int]], *, pooling: str = "mean", normalize: bool = True,
                     long_texts: str = "truncate", batch_size: int = 16, warn: bool = True,
                     progress: Callable[[int, int], None] | None = None) -> Embeddings:
    """Embeddings of token-id rows, with rows longer than the context cut or chunked (see the module docstring)."""
    if long_texts not in LONG_TEXTS:
        raise OwnLLMError(f"long_texts must be one of {', '.join(LONG_TEXTS)}, not {long_texts!r}")
    window = model.config.block_size
    pieces: list[list[int]] = []
    owner: list[int] = []
    shortened = 0
    for index, row in enumerate(rows):
        row = list(row)
        if len(row) > window:
            shortened += 1
            parts = [row[:window]] if long_texts == "truncate" else [row[i:i + window]
                                                                       for i in range(0, len(row), window)]
        else:
            parts = [row]
        pieces.extend(parts)
        owner.extend([index] * len(parts))
    if shortened and warn:
        what = "cut to their first" if long_texts == "truncate" else "split into pieces of"
        warnings.warn(f"{shortened} text(s) longer than the context window were {what} {window} tokens",
                      stacklevel=2)
    pooled = embed_ids(model, pieces, pooling, batch_size, progress)
    if len(pieces) != len(rows):  # chunked: average each text's pieces, weighted by their lengths
        weights = torch.tensor([len(p) for p in pieces], dtype=torch.float32)
        summed = torch.zeros(len(rows), pooled.shape[1]).index_add_(0, torch.tensor(owner), pooled * weights[:, None])
        totals = torch.zeros(len(rows)).index_add_(0, torch.tensor(owner), weights)
        pooled = summed / totals[:, None]
    vectors = normalize_rows(pooled) if normalize else pooled
    counts = [min(len(r), window) if long_texts == "truncate" else len(r) for r in rows]
    return Embeddings(vectors=vectors, token_counts=counts, shortened=shortened)


def embed_texts(run: "LoadedRun", texts: Sequence[str], *, pooling: str | None = None, normalize: bool = True,
                long_texts: str = "truncate", batch_size: int = 16, warn: bool = True,
                progress: Callable[[int, int], None] | None = None, role: str = "document") -> Embeddings:
    """Embeddings of texts with a loaded run (`ownllm.load(path)`), pooled as `pooling` or the run's own
    (`default_pooling`), each text after the run's prefix for its `role` (`embedding_prefix`); see the module
    docstring."""
    prefix = embedding_prefix(run.run_config, role)
    suffix = list(run.run_config.get("embedding_suffix") or [])  # Qwen3-Embedding's end-of-text, read on import
    rows = [row + suffix for row in encode_for_embedding(run.tokenizer, [prefix + text for text in texts])]
    return embed_token_rows(run.model, rows, pooling=pooling or default_pooling(run), normalize=normalize,
                            long_texts=long_texts, batch_size=batch_size, warn=warn, progress=progress)



# ---- files: `ownllm embed` ------------------------------------------------------------------------------------------

@dataclass
class EmbedFileReport:
    texts: int  # vectors written
    dim: int
    pooling: str


def read_texts(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file ('-': stdin) that holds a text; blank lines are skipped
    and counted (`ownllm.data.records`)."""
    from ownllm.tokenizer import read_text_file

    text = sys.stdin.read() if str(path) == "-" else read_text_file(path)
    lines = [(Location(Path(path), number), line) for number, line in enumerate(text.splitlines(), start=1)]
    return keep_informative(path, lines, "texts", lambda where, line: (where.number, line),
                            why_empty=lambda item: None if item[1].strip() else "blank")


def embed_file(model: "str | Path | LoadedRun", input: str | Path, output: str | Path, *, force: bool = False,
               pooling: str | None = None, normalize: bool = True, long_texts: str = "truncate",
               batch_size: int = 16, device: str = "auto",
               progress: Callable[[int, int], None] | None = None, role: str = "document") -> EmbedFileReport:
    """Embed the texts of `input` (one per line) into the JSON Lines file `output` ({"line": N, "embedding": [...]}
    per text, in order). The output is checked before the model loads; `progress(done, total)` after each batch
    (rows embedded: a text split into pieces counts each piece)."""
    from ownllm.device import pick_device
    from ownllm.runs import LoadedRun, load_run

    model_path = model.path if isinstance(model, LoadedRun) else model
    check_output(output, "file", inputs=[input, model_path], force=force, flag="--output")
    embedding_prefix({}, role)  # a wrong role fails before the model loads
    if pooling is not None:
        check_pooling(pooling)
    texts = read_texts(input)
    run = model if isinstance(model, LoadedRun) else load_run(model, device=pick_device(device))
    pooling = pooling or default_pooling(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vectors = embed_texts(run, [text for _, text in texts], pooling=pooling, normalize=normalize,
                              long_texts=long_texts, batch_size=batch_size, progress=progress, role=role).vectors
    for warning in caught:
        warn(str(warning.message))
    with atomic_file(output) as handle:
        for (number, _), vector in zip(texts, vectors.tolist()):
            handle.write(json.dumps({"line": number, "embedding": vector}) + "\n")
    return EmbedFileReport(texts=len(texts), dim=int(vectors.shape[1]), pooling=pooling)
