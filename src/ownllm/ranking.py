"""Ranking chunks for a question: BM25, rank fusion weighted by what each ranking is worth on this index, and a
relevance score with a threshold calibrated on the index.

    bm25 = BM25(texts)
    calibration = calibrate(bm25, vectors, embed_queries)      # once per index (ownllm.retrieval stores it)
    fused = fuse([bm25.scores(q), vectors @ v], calibration.weights)

Why calibrate: equal-weight reciprocal rank fusion with a weak ranking pulls a strong one down (SciQ: BM25 finds
the paragraph in its top 5 for 98.0% of questions, equal-weight fusion with a base model's embeddings for 84.8%).
So the fusion weight of the embeddings is chosen on the index itself, with no labels: pseudo-queries are drawn from
the chunks (a random window of a chunk's words, half of its content words kept, shuffled), each must find its
chunk, and the weight among `WEIGHT_GRID` whose fused ranking finds them best (mean reciprocal rank) is kept. The
grid holds 0 and 1, so on these queries the fusion is never worse than the better ranking alone (ties go to the
share nearest 0.5); a random or untrained embedder gets weight 0 (the fusion is then BM25), as does one whose
pseudo-queries are no nearer their own chunk than a random one; a good embedder gets a share.

Relevance (0..1) of a chunk to a question: the IDF-weighted share of the question's content words that the chunk
holds (BM25's IDF; a word the index never saw weighs most; words compared by a light stem, `stem`), blended with
the embedding similarity rescaled on the index (0 = what a pseudo-query scores against an unrelated chunk, 1 =
against its own), in the fusion's weights.
The threshold (`Calibration.min_relevance`) is half of what the pseudo-queries' own chunks score for 9 out of 10
of them (their 10th percentile): a question whose best chunk scores below it is not answered from the documents.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
WEIGHT_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # embeddings' share
CALIBRATION_QUERIES = 200
STOPWORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its may me my no not of on or our shall should so than that the their them then there these they this
to was we were what when where which who whom why will with would you your""".split())


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def content_words(text: str) -> list[str]:
    return [w for w in words_of(text) if w not in STOPWORDS]


def stem(word: str) -> str:
    """A light English stem for the relevance score: "ends", "ended" and "end" match, as do "renewed" / "renew"
    and "expires" / "expire" (BM25 itself matches whole words)."""
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


class BM25:
    """Okapi BM25 over a fixed list of texts (k1 1.5, b 0.75): `scores(query)` -> one score per text. Each word's
    postings (texts holding it, and how often) become numpy arrays the first time a query asks for the word."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.counts = [Counter(words_of(t)) for t in texts]
        self.lengths = np.array([sum(c.values()) for c in self.counts], dtype=np.float64)
        self.average = float(self.lengths.mean()) if len(texts) else 0.0
        self.norm = self.k1 * (1.0 - self.b + self.b * self.lengths / max(self.average, 1e-9))
        self.postings: dict[str, list[int]] = {}
        for index, counts in enumerate(self.counts):
            for word in counts:
                self.postings.setdefault(word, []).append(index)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def idf(self, word: str) -> float:
        n, df = len(self.counts), len(self.postings.get(word, ()))
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def _posting_arrays(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        if word not in self._arrays:
            docs = self.postings[word]
            self._arrays[word] = (np.array(docs, dtype=np.int64),
                                  np.array([self.counts[d][word] for d in docs], dtype=np.float64))
        return self._arrays[word]

    def scores(self, query: str) -> np.ndarray:
        scores = np.zeros(len(self.counts))
        for word in set(words_of(query)):
            if word not in self.postings:
                continue
            docs, tf = self._posting_arrays(word)
            scores[docs] += self.idf(word) * tf * (self.k1 + 1.0) / (tf + self.norm[docs])
        return scores

    def coverage(self, query: str, items: Sequence[int]) -> np.ndarray:
        """The IDF-weighted share (0..1) of the query's content words that each text of `items` holds (compared by
        `stem`; a word the index never saw weighs most)."""
        words = set(content_words(query)) or set(words_of(query))
        if not words:
            return np.zeros(len(items))
        weights = {stem(w): self.idf(w) for w in words}
        total = sum(weights.values())
        shares = []
        for item in items:
            held = {stem(w) for w in self.counts[item]}
            shares.append(sum(weight for root, weight in weights.items() if root in held) / total)
        return np.array(shares)


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of each item by descending score; equal scores share the best of their ranks, so a ranking
    that cannot tell items apart (a question sharing no word with any chunk: BM25 all 0) adds nothing to a fusion."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.maximum.accumulate(np.where(first, np.arange(len(scores)), 0))
    return ranks


def fuse(score_lists: Sequence[np.ndarray], weights: Sequence[float] | None = None, k: int = RRF_K) -> np.ndarray:
    """Weighted reciprocal rank fusion: sum of weight / (k + rank + 1) over the rankings (equal weights if none);
    a ranking of weight 0 is left out, so it cannot even break ties."""
    weights = list(weights) if weights is not None else [1.0] * len(score_lists)
    fused = np.zeros(len(score_lists[0]))
    for weight, scores in zip(weights, score_lists):
        if weight > 0:
            fused += weight / (k + ranks_of(scores) + 1.0)
    return fused


# ---- calibration on the index ------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """What an index's own pseudo-queries say: the fusion weights (BM25, embeddings), the embedding similarity of
    an unrelated and of the right chunk, the relevance threshold, and each ranking's mean reciprocal rank."""

    weights: tuple[float, float]
    unrelated_similarity: float
    related_similarity: float
    min_relevance: float
    min_lexical_relevance: float  # the threshold where no embedding is compared (`--mode bm25`)
    queries: int
    mrr: dict[str, float]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        return cls(**{**data, "weights": tuple(data["weights"])})


def pseudo_queries(bm25: BM25, texts: Sequence[str], count: int = CALIBRATION_QUERIES,
                   seed: int = 0) -> list[tuple[str, list[int]]]:
    """(query, the chunks holding all its words) for up to `count` chunks: a 24-word window of the chunk, half of
    its content words kept (at least 3), shuffled."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(texts))[:count]
    queries = []
    for item in picked:
        words = words_of(texts[item])
        start = int(rng.integers(0, max(1, len(words) - 24)))
        window = [w for w in words[start:start + 24] if w not in STOPWORDS]
        if len(window) < 3:
            continue
        kept = list(rng.permutation(window)[:max(3, len(window) // 2)])
        holders = set(bm25.postings[kept[0]])
        for word in kept[1:]:
            holders &= set(bm25.postings[word])
        queries.append((" ".join(kept), sorted(holders)))
    return queries


def _reciprocal_rank(scores: np.ndarray, targets: list[int]) -> float:
    best = scores[targets].max()
    return 1.0 / (1.0 + float((scores > best).sum()))


def calibrate(bm25: BM25, vectors: np.ndarray, embed_queries: Callable[[list[str]], np.ndarray],
              texts: Sequence[str]) -> Calibration:
    """The index's fusion weights and relevance threshold, from pseudo-queries (see the module docstring)."""
    queries = pseudo_queries(bm25, texts)
    if not queries:  # too few words to draw queries from: equal weights, no threshold
        return Calibration((0.5, 0.5), 0.0, 1.0, 0.0, 0.0, 0, {})
    query_vectors = embed_queries([q for q, _ in queries])
    lexical = [bm25.scores(q) for q, _ in queries]
    dense = [vectors @ v for v in query_vectors]
    mrr = {}
    for weight in WEIGHT_GRID:
        mrr[weight] = float(np.mean([_reciprocal_rank(fuse([lex, den], (1.0 - weight, weight)), targets)
                                     for lex, den, (_, targets) in zip(lexical, dense, queries)]))
    best = max(mrr.values())
    weight = min((w for w in WEIGHT_GRID if mrr[w] >= best - 1e-9), key=lambda w: abs(w - 0.5))
    rng = np.random.default_rng(1)
    own = np.array([den[targets].max() for den, (_, targets) in zip(dense, queries)])
    other = np.array([den[int(rng.integers(len(den)))] for den in dense])
    if np.median(own) <= np.median(other):  # the embeddings do not tell a chunk from a random one: no weight
        weight = 0.0
    calibration = Calibration((1.0 - weight, weight), float(np.median(other)), float(np.median(own)), 0.0,
                              0.0, len(queries), {"bm25": mrr[0.0], "embeddings": mrr[1.0], "fused": mrr[weight]})
    own_relevance = [relevance(bm25, calibration, q, [targets[0]], den[[targets[0]]])[0]
                     for den, (q, targets) in zip(dense, queries)]
    lexical_relevance = [bm25.coverage(q, [targets[0]])[0] for q, targets in queries]
    calibration.min_relevance = round(0.5 * float(np.percentile(own_relevance, 10)), 4)
    calibration.min_lexical_relevance = round(0.5 * float(np.percentile(lexical_relevance, 10)), 4)
    return calibration


def relevance(bm25: BM25, calibration: Calibration, query: str, items: Sequence[int],
              similarities: np.ndarray | None) -> np.ndarray:
    """Relevance (0..1) of the texts `items` to `query` (see the module docstring); `similarities` are their
    embedding cosines (None: lexical only)."""
    lexical = bm25.coverage(query, items)
    weight = calibration.weights[1] if similarities is not None else 0.0
    if weight == 0.0:
        return lexical
    span = calibration.related_similarity - calibration.unrelated_similarity
    dense = np.clip((np.asarray(similarities) - calibration.unrelated_similarity) / span, 0.0, 1.0) \
        if span > 1e-6 else np.zeros(len(items))
    return (1.0 - weight) * lexical + weight * dense
