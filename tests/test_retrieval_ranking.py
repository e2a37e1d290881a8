"""Fusion that never loses (weights calibrated on the index), relevance and its threshold, answers that cite or
say the documents do not say, and `ask --questions --json`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedding_helpers import assert_one_line_error, tiny  # noqa: F401  (tiny is a fixture)
from test_retrieval import write_docs

VOCAB = [f"w{i}" for i in range(400)]


def random_collection(seed: int, chunks: int = 60, words: int = 40, dim: int = 16):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(VOCAB, size=words)) for _ in range(chunks)]
    vectors = rng.normal(size=(chunks, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return rng, texts, vectors.astype(np.float32)


def unit(rng, dim):
    v = rng.normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_bm25_right_and_embeddings_random_fused_top1_is_right():
    from ownllm.ranking import BM25, calibrate, fuse

    rng, texts, vectors = random_collection(0)
    bm25 = BM25(texts)
    calibration = calibrate(bm25, vectors, lambda qs: np.stack([unit(rng, 16) for _ in qs]), texts)
    assert calibration.weights[1] < 0.1 and calibration.mrr["bm25"] > 0.9 > 0.3 > calibration.mrr["embeddings"]
    equal_wrong = 0
    for target in range(len(texts)):  # real questions: 5 of the target's words; the embedder is random
        query = " ".join(texts[target].split()[10:15])
        lexical, dense = bm25.scores(query), vectors @ unit(rng, 16)
        assert lexical.argmax() == target  # the constructed case: BM25 right ...
        assert fuse([lexical, dense], calibration.weights).argmax() == target  # ... so the fusion is right
        equal_wrong += fuse([lexical, dense]).argmax() != target
    assert equal_wrong > 0  # equal-weight fusion does lose here: the calibration is what keeps top-1 right


def test_embeddings_right_and_bm25_blind_fused_top1_is_right():
    from ownllm.ranking import BM25, calibrate, fuse

    rng, texts, vectors = random_collection(1)
    bm25 = BM25(texts)

    def oracle(queries):  # an embedder that is right: the vector of the chunk holding most of the query's words
        return np.stack([vectors[int(np.argmax([len(set(q.split()) & set(t.split())) for t in texts]))]
                         for q in queries])

    calibration = calibrate(bm25, vectors, oracle, texts)
    assert calibration.weights[1] > 0
    for target in range(len(texts)):  # real questions are paraphrases: no word shared with any chunk
        lexical = bm25.scores(f"paraphrase number {target}")
        dense = vectors @ (vectors[target] + 0.05 * unit(rng, 16))
        assert not lexical.any()
        assert fuse([lexical, dense], calibration.weights).argmax() == target


NOTES = {
    "permit.md": "The parking permit for Elm Street expires on 14 March 2027. Renew it at the town hall.",
    "wifi.txt": "The guest wifi password is sunflower42 and the router sits in the hallway cupboard.",
    "boiler.md": "The boiler was serviced by Anna Berg in October; the next service is due in October next year.",
    "vet.txt": "Biscuit the cat sees the vet, Dr Okafor, every spring for vaccinations.",
}


@pytest.fixture(scope="module")
def notes_index(tiny, tmp_path_factory):  # noqa: F811
    from ownllm.retrieval import build_index

    folder = tmp_path_factory.mktemp("notes")
    build_index(write_docs(folder / "docs", NOTES), tiny, folder / "notes.index", chunk_size=40, overlap=5)
    return folder / "notes.index"


def test_relevance_threshold_is_calibrated_and_drops_what_the_documents_do_not_cover(tiny, notes_index):  # noqa: F811
    import ownllm
    from ownllm.retrieval import open_index, search

    index, run = open_index(notes_index), ownllm.load(tiny)
    calibration = index.calibration
    assert calibration is not None and calibration.queries == 4 and 0 < calibration.min_relevance < 1
    stored = json.loads(dict(__import__("sqlite3").connect(notes_index).execute(
        "SELECT key, value FROM meta"))["calibration"])
    assert stored["min_relevance"] == calibration.min_relevance
    hits = search(index, run, "What is the guest wifi password?", k=4)
    assert hits and hits[0].chunk.path == "wifi.txt" and hits[0].relevance >= calibration.min_relevance
    assert all(h.relevance >= calibration.min_relevance for h in hits)
    assert search(index, run, "Who won the football championship in Brazil?", k=4) == []
    every = search(index, run, "Who won the football championship in Brazil?", k=4, min_relevance=0)
    assert len(every) == 4 and max(h.relevance for h in every) < calibration.min_relevance


def test_answers_cite_and_unanswerable_questions_are_refused(tiny, notes_index, capsys):  # noqa: F811
    import ownllm
    from ownllm.cli import main
    from ownllm.retrieval import NO_ANSWER, answer, build_question_prompt, open_index, question_messages, search

    index, run = open_index(notes_index), ownllm.load(tiny)
    hits = search(index, run, "When does the parking permit expire?", k=2)
    prompt = build_question_prompt("When does the parking permit expire?", hits)
    assert "[1] (permit.md:1-1)\nThe parking permit" in prompt and NO_ANSWER in prompt
    asked = question_messages("When does the parking permit expire?", hits)  # a worked example first: it cites
    assert [m.role for m in asked] == ["user", "assistant", "user"]
    assert asked[1].content == "40 minutes, at 220 degrees [1]." and asked[-1].content == prompt
    assert answer(run, index, "Who won the football championship in Brazil?") == (NO_ANSWER, [])
    code = main(["ask", str(tiny), "--index", str(notes_index), "Who won the football championship in Brazil?"])
    assert code == 0
    assert capsys.readouterr().out == f"{NO_ANSWER}\n\nsources: none relevant enough (--min-relevance)\n"


def test_sources_that_fit_keep_the_best_sources_the_context_holds():
    from ownllm.errors import OwnLLMError
    from ownllm.retrieval import Chunk, Hit, sources_that_fit

    hits = [Hit(Chunk("a.txt", 1, 1, "x"), 1.0) for _ in range(4)]
    encode = lambda kept: [0] * (10 + 30 * len(kept))  # noqa: E731
    prompt, kept = sources_that_fit(encode, hits, block_size=128, max_new_tokens=40)  # room 88: two sources
    assert len(kept) == 2 and len(prompt) == 70
    with pytest.raises(OwnLLMError, match="best source take 40 tokens"):
        sources_that_fit(encode, hits, block_size=64, max_new_tokens=40)


def test_ask_questions_json_one_line_each_in_order_model_loaded_once(tiny, notes_index, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    import ownllm.runs
    from ownllm.cli import main
    from ownllm.retrieval import NO_ANSWER

    questions = tmp_path / "q.jsonl"
    asked = ["What is the guest wifi password?", "Who won the football championship in Brazil?",
             "Who serviced the boiler?"]
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in asked) + "\n", encoding="utf-8")
    loads = []
    real_load = ownllm.runs.load_run
    monkeypatch.setattr(ownllm.runs, "load_run", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    base = ["ask", str(tiny), "--index", str(notes_index), "--questions", str(questions), "--json"]
    assert main([*base, "--sources-only"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["question"] for r in lines] == asked and all("answer" not in r for r in lines)
    first = lines[0]["sources"][0]
    assert first["file"] == "wifi.txt" and first["lines"] == [1, 1] and "sunflower42" in first["text"]
    assert set(first) == {"file", "lines", "score", "relevance", "text"} and lines[1]["sources"] == []
    assert lines[2]["sources"][0]["file"] == "boiler.md"
    assert main([*base, "--max-new-tokens", "4"]) == 0
    answered = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["question"] for r in answered] == asked and answered[1]["answer"] == NO_ANSWER
    assert all(isinstance(r["answer"], str) for r in answered)
    assert [r["sources"] for r in answered] == [r["sources"] for r in lines]
    assert len(loads) == 2  # once per command, for every question
    questions.write_text('{"question": "fine"}\n{"query": "wrong field"}\n', encoding="utf-8")
    assert_one_line_error(main(base), capsys.readouterr().err, f"{questions}:2", '"question"')


def test_ask_help_says_what_the_default_ranking_does_and_when_to_pick_another(capsys):
    from ownllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "`hybrid` (default)" in shown and "calibrated on the index itself" in shown
    assert "An untrained embedder gets weight 0" in shown and "Pick `bm25`" in shown
    assert "--min-relevance" in shown and "The documents do not say." in shown


def test_worked_examples_go_in_only_when_they_cost_no_source():
    from ownllm.retrieval import EXAMPLES, Chunk, Hit, fit_question

    hits = [Hit(Chunk("a.txt", 1, 1, "x"), 1.0) for _ in range(3)]
    encode = lambda messages: [0] * (20 * len(messages) + 30 * messages[-1].content.count("a.txt"))  # noqa: E731
    prompt, kept = fit_question(encode, "q", hits, block_size=400, max_new_tokens=100)  # room 300: all + examples
    assert len(kept) == 3 and len(prompt) == 20 * (len(EXAMPLES) + 1) + 90
    prompt, kept = fit_question(encode, "q", hits, block_size=200, max_new_tokens=100)  # room 100: 2 sources, no
    assert len(kept) == 2 and len(prompt) == 80  # examples (they would have cost a source)
