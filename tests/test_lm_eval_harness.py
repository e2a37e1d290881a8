"""lm-evaluation-harness with `--model ownllm` gives what `ownllm evaluate --tasks` gives on the same items.

Slow (lm_eval alone takes ~15 s to import and pulls datasets, pandas, scikit-learn): run with
`pytest -m slow tests/test_lm_eval_harness.py` after `pip install 'ownllm[lm-eval]'`.
"""

from __future__ import annotations

import json

import pytest
import torch

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


def test_lm_eval_with_the_ownllm_model_matches_ownllm_evaluate(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="pip install 'ownllm[lm-eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import ownllm.benchmarks.harness  # noqa: F401 - registers the `ownllm` model
    from lm_eval.tasks import TaskManager

    text = "abcdefghijklmnopqrstuvwxyz ?:\n"
    tokenizer = char_tokenizer_from_text(text)
    torch.manual_seed(3)
    model = GPT(model_config_from_preset("tiny", vocab_size=tokenizer.vocab_size, block_size=64)).eval()
    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, model.config, task="lm")
    save_weights(model, run / WEIGHTS_FILE)
    tokenizer.save(run / "tokenizer")

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
    assert harness_logprobs == [pytest.approx(row, abs=1e-5) for row in ours.logprobs]
