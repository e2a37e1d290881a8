"""Training on several processes (issue 6): real torchrun jobs of 2 processes with gloo on the CPU.

2 processes with the global batch 2B train exactly like 1 process with 2B (DDP and FSDP), checkpoints move between
1 and 2 processes, only rank 0 writes (tests/dist_launch.py fails the job otherwise), and a rank that fails or hangs
ends the job with one clear line. The torchrun launches cost seconds each, so one module fixture makes the runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_helpers import instruction_records, single_thread, write_json
from ownllm import distributed
from ownllm.errors import OwnLLMError
from ownllm.finetune import finetune_instruct
from ownllm.pretrain import pretrain

HELPER = Path(__file__).with_name("dist_launch.py")
TRAIN = dict(batch_size=4, grad_accum=2, max_steps=8, eval_interval=4, eval_steps=2, log_interval=1,
             precision="fp32", warmup_steps=2, lr=3e-3)
MODEL = dict(dropout=0.0)


def flags(**values) -> list[str]:
    return [part for key, value in values.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HELPER),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def pretrain_2(data: Path, out: Path, *extra: str, **extra_env: str) -> subprocess.CompletedProcess:
    return torchrun("pretrain", "--data", str(data), "--out", str(out), "--model", "tiny", "--tokenizer", "char",
                    "--dropout", "0", *flags(**TRAIN), *extra, **extra_env)


def pretrain_1(data: Path, out: Path, **extra) -> None:
    with single_thread():
        pretrain(out=out, data=data, preset="tiny", tokenizer="char", model_overrides=MODEL, show_progress=False,
                 **{**TRAIN, **extra})


def resume_1(out: Path) -> None:
    with single_thread():
        pretrain(out=out, resume=True, show_progress=False)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows]


def val_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["val_loss"] for row in rows if "val_loss" in row]


def assert_same_weights(a: Path, b: Path, lr: float = TRAIN["lr"]) -> None:
    """The same weights up to what the all-reduce's summation order can move them: fp32 rounding of the gradients,
    which Adam's division by sqrt(v) can amplify for a near-zero gradient to a small part of one step (`lr`). 3% of
    a step (9e-5 at lr 3e-3, where a fixed 1e-5 left no margin for another CPU's summation order); a wrong global
    batch moves most weights by about a whole step."""
    atol = 0.03 * lr
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y)
    for name in x:
        torch.testing.assert_close(x[name], y[name], atol=atol, rtol=1e-4, msg=name)


def assert_same_optimizer(a: Path, b: Path) -> None:
    x = torch.load(a / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]
    y = torch.load(b / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]
    assert x["param_groups"] == y["param_groups"] and sorted(x["state"]) == sorted(y["state"])
    for index, state in x["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, y["state"][index][key], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jugglers".split()
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)), encoding="utf-8")
    r = {name: root / name for name in ("one", "ddp", "fsdp4", "fsdp4_then_1", "one4", "one4_then_fsdp")}
    pretrain_1(text, r["one"])  # the reference: 1 process, global batch 4 x 2 micro-batches, 8 steps
    data = r["one"] / "data"
    ok(pretrain_2(text, r["ddp"]))  # raw text: rank 0 tokenizes while rank 1 waits
    ok(pretrain_2(data, r["fsdp4"], "--strategy", "fsdp", "--stop-at", "4"))
    pretrain_1(data, r["one4"], stop_at=4)
    shutil.copytree(r["fsdp4"], r["fsdp4_then_1"])
    resume_1(r["fsdp4_then_1"])  # 2 processes (FSDP) -> 1
    shutil.copytree(r["one4"], r["one4_then_fsdp"])
    ok(torchrun("pretrain", "--out", str(r["one4_then_fsdp"]), "--resume", "--strategy", "fsdp"))  # 1 -> 2 (FSDP)
    return r


def test_two_processes_with_ddp_train_exactly_like_one_with_the_same_global_batch(runs):
    assert losses(runs["ddp"]) == pytest.approx(losses(runs["one"]), rel=1e-5)
    assert val_losses(runs["ddp"]) == pytest.approx(val_losses(runs["one"]), rel=1e-5)
    assert len(losses(runs["one"])) == 8 and losses(runs["one"])[-1] < losses(runs["one"])[0]
    assert_same_weights(runs["ddp"] / "model.safetensors", runs["one"] / "model.safetensors")
    state = json.loads((runs["ddp"] / "checkpoint" / "state.json").read_text())
    assert (state["world_size"], state["strategy"]) == (2, "ddp")


def test_two_processes_with_fsdp_train_exactly_like_one(runs):
    assert losses(runs["fsdp4"]) == pytest.approx(losses(runs["one"])[:4], rel=1e-5)
    assert_same_weights(runs["fsdp4"] / "model.safetensors", runs["one4"] / "model.safetensors")
    assert_same_optimizer(runs["fsdp4"], runs["one4"])  # saved whole: the same layout as a single process's
    state = json.loads((runs["fsdp4"] / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["world_size"], state["strategy"]) == (4, 2, "fsdp")


def test_checkpoints_resume_across_a_change_of_world_size(runs):
    for resumed in ("fsdp4_then_1", "one4_then_fsdp"):
        assert losses(runs[resumed]) == pytest.approx(losses(runs["one"]), rel=1e-5), resumed
        assert_same_weights(runs[resumed] / "model.safetensors", runs["one"] / "model.safetensors")
    assert json.loads((runs["one4_then_fsdp"] / "checkpoint" / "state.json").read_text())["world_size"] == 2


def test_only_rank_0_writes_the_run(runs):
    # rank 1 ran under an audit hook that fails the job on any write under --out; rank 0 wrote the usual run
    names = {p.relative_to(runs["ddp"]).as_posix() for p in runs["ddp"].rglob("*") if p.is_file()}
    expected = {p.relative_to(runs["one"]).as_posix() for p in runs["one"].rglob("*") if p.is_file()}
    assert names == expected and "checkpoint/trainer_state.pt" in names and "data/train.bin" in names


def test_a_failing_rank_ends_the_job_with_its_message_and_the_last_good_checkpoint(runs):
    out = runs["one"].parent / "fails"
    started = time.monotonic()
    result = pretrain_2(runs["one"] / "data", out, "--checkpoint-interval", "2", OWNLLM_TEST_FAIL="1:9:raise")
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert "ownllm: error (rank 1): injected failure at micro-step 9" in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4  # micro-step 9 is in step 5
    resume_1(out)
    assert_same_weights(out / "model.safetensors", runs["one"] / "model.safetensors")


def test_a_hanging_rank_ends_the_job_at_the_timeout(runs):
    started = time.monotonic()
    result = pretrain_2(runs["one"] / "data", runs["one"].parent / "hangs", OWNLLM_TEST_FAIL="1:3:hang",
                        OWNLLM_DIST_TIMEOUT="3")
    assert result.returncode != 0 and time.monotonic() - started < 50
    assert "ownllm: error (rank 0): lost the other processes" in result.stderr
    assert "(OWNLLM_DIST_TIMEOUT)" in result.stderr


def test_lora_instruction_tuning_on_two_processes_via_nproc_equals_one_process(base, tmp_path):
    data = write_json(tmp_path / "data.json", instruction_records(42))
    common = dict(model=base, data=data, lora_rank=4, max_steps=5, batch_size=6, eval_interval=5, log_interval=1,
                  precision="fp32", dropout=0.0, test_fraction=0.1, max_new_tokens=4, lr=5e-4)
    with single_thread():
        finetune_instruct(out=tmp_path / "one", show_progress=False, **common)
    command = [sys.executable, "-m", "ownllm", "finetune", "instruct", "--out", str(tmp_path / "two"), "--nproc", "2",
               "--model", str(base), "--data", str(data), *flags(**{k: v for k, v in common.items()
                                                                    if k not in ("model", "data")})]
    ok(subprocess.run(command, capture_output=True, text=True, timeout=180, env=env()))
    # the loss is a mean over response tokens; rows split unevenly by tokens still give the full batch's mean
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert_same_weights(tmp_path / "two" / "adapter_model.safetensors", tmp_path / "one" / "adapter_model.safetensors",
                        lr=common["lr"])
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["val_loss"] == pytest.approx(
        json.loads((tmp_path / "one" / "metrics.json").read_text())["val_loss"], rel=1e-5)


# ---- pieces, in this process ----------------------------------------------------------------------------------

def test_slices_weighted_by_their_targets_average_to_the_full_batch_mean(monkeypatch):
    values = torch.arange(20.0).view(5, 4)
    targets = torch.tensor([[1, 1, 1, 1], [1, -100, -100, -100], [1, 1, -100, -100], [-100] * 4, [1, 1, 1, -100]])
    full_mean = values[targets != -100].mean()
    monkeypatch.setenv("WORLD_SIZE", "3")
    total = 0.0
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        (part_values, part_targets), scale = distributed.shard([values, targets],
                                                               lambda b: float((b[1] != -100).sum()))
        if scale:
            total += scale * part_values[part_targets != -100].mean()
    assert total / 3 == pytest.approx(float(full_mean))


def test_a_batch_smaller_than_the_world_gives_the_idle_rank_a_zero_weight_pass(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    batch = [torch.ones(1, 3)]
    monkeypatch.setenv("RANK", "0")
    part, scale = distributed.shard(batch)
    assert scale == 0.0 and part[0].shape == (1, 3)  # runs the batch for the collectives, contributes nothing
    monkeypatch.setenv("RANK", "1")
    part, scale = distributed.shard(batch)
    assert scale == 2.0 and part[0].shape == (1, 3)  # its mean, times 2, averaged over 2 processes: the batch's mean


def test_the_global_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    distributed.check_batch_size(8)
    with pytest.raises(OwnLLMError, match="--batch-size 6 is the global batch.*divisible.*4"):
        distributed.check_batch_size(6)


def test_nproc_relaunches_under_torchrun_without_itself():
    command = distributed.torchrun_command(2, ["pretrain", "--nproc", "2", "--out", "r", "--nproc=2", "--lr", "1"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ownllm",
                           "pretrain", "--out", "r", "--lr", "1"]
    with pytest.raises(OwnLLMError, match="--nproc must be at least 1"):
        distributed.launch(0, [])
    assert distributed.launch(1, ["pretrain"]) is None  # one process: run here, no torchrun


def test_strategy_is_checked():
    from ownllm.config import TrainConfig

    with pytest.raises(OwnLLMError, match="--strategy must be auto, ddp or fsdp"):
        TrainConfig(strategy="zero3")
