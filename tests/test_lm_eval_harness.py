"""lm-evaluation-harness with `--model ownllm` gives what `ownllm evaluate --tasks` gives on the same items.

Slow (lm_eval alone takes ~15 s to import and pulls datasets, pandas, scikit-learn): run with
`pytest -m slow tests/test_lm_eval_harness.py` after `pip install 'ownllm[lm-eval]'`.
"""

from __future__ import annotations

import json

import pytest
import torch

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


def tiny_run(tmp_path):
    text = "abcdefghijklmnopqrstuvwxyz ?:\n"
    tokenizer = char_tokenizer_from_text(text)
    torch.manual_seed(3)
    model = GPT(model_config_from_preset("tiny", vocab_size=tokenizer.vocab_size, block_size=64)).eval()
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
