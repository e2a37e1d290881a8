"""Preference tuning (DPO): the loss and rewards against the formula (also with the chosen answers' NLL added, RPO),
answer log-probs with the prompt masked, reading the book's and trl's formats, adapters off = the base model, and tiny
runs end to end (LoRA and full, the NLL term keeping the chosen answers likelier, the CLI, an exact resume, bad
data)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune_helpers import assert_same_run, metrics_rows, preference_records, write_json
from ownllm.cli import main
from ownllm.config import ModelConfig
from ownllm.chat_templates import get_template
from ownllm.data.instructions import IGNORE
from ownllm.data.preferences import PreferenceBatches, collate_pairs, read_preferences
from ownllm.errors import OwnLLMError
from ownllm.finetune import finetune_prefer
from ownllm.finetune.dpo import dpo_losses, pair_logps, pair_stats
from ownllm.lora import LoRAConfig, adapters_disabled, apply_lora
from ownllm.model import GPT
from ownllm.tokenizer import char_tokenizer_from_text

pytestmark = pytest.mark.usefixtures("one_thread")

POLICY = [[-12.5, -15.0], [-8.0, -7.5], [-20.25, -19.0]]
REFERENCE = [[-13.0, -14.0], [-8.5, -7.0], [-20.0, -21.0]]
COUNTS = [[5, 7], [3, 4], [10, 9]]


def test_dpo_loss_and_rewards_equal_the_formula():
    policy, reference, counts = torch.tensor(POLICY), torch.tensor(REFERENCE), torch.tensor(COUNTS)
    for beta in (0.1, 0.5):
        losses, chosen, rejected = dpo_losses(policy, reference, counts, beta, "sigmoid")
        for i, ((pc, pr), (rc, rr), (nc, nr)) in enumerate(zip(POLICY, REFERENCE, COUNTS)):
            z = beta * ((pc - rc) - (pr - rr))
            assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-6)
            assert chosen[i].item() == pytest.approx(beta * (pc - rc), rel=1e-6)
            assert rejected[i].item() == pytest.approx(beta * (pr - rr), rel=1e-6)
        ipo, _, _ = dpo_losses(policy, reference, counts, beta, "ipo")
        for i, ((pc, pr), (rc, rr), (nc, nr)) in enumerate(zip(POLICY, REFERENCE, COUNTS)):
            assert ipo[i].item() == pytest.approx(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2, rel=1e-6)
    losses, chosen, rejected = dpo_losses(policy, reference, counts, 0.1, "sigmoid")
    stats = pair_stats(losses, chosen, rejected, policy, counts)
    margins = [0.1 * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(POLICY, REFERENCE)]
    assert stats["reward_margin"] == pytest.approx(sum(margins) / 3, rel=1e-6)
    assert stats["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)  # 2 of 3
    assert stats["loss"] == pytest.approx(losses.mean().item())
    assert stats["nll_chosen"] == pytest.approx((12.5 + 8.0 + 20.25) / (5 + 3 + 10), rel=1e-6)
    # at the start the policy is the reference: loss log 2, rewards 0
    start = dpo_losses(reference, reference, counts, 0.1, "sigmoid")
    assert torch.allclose(start[0], torch.full((3,), math.log(2))) and not start[1].any()


def test_the_sft_weight_adds_the_chosen_answers_nll_per_token_and_0_is_the_plain_loss():
    policy, reference, counts = torch.tensor(POLICY, requires_grad=True), torch.tensor(REFERENCE), torch.tensor(COUNTS)
    nll = -(POLICY[0][0] + POLICY[1][0] + POLICY[2][0]) / (COUNTS[0][0] + COUNTS[1][0] + COUNTS[2][0])  # pooled tokens
    for kind in ("sigmoid", "ipo"):
        plain = dpo_losses(policy, reference, counts, 0.1, kind)
        off = dpo_losses(policy, reference, counts, 0.1, kind, sft_weight=0.0)
        assert all(torch.equal(a, b) for a, b in zip(plain, off))
        for alpha in (0.5, 2.0):
            losses, chosen, rejected = dpo_losses(policy, reference, counts, 0.1, kind, sft_weight=alpha)
            assert losses.tolist() == pytest.approx([x + alpha * nll for x in plain[0].tolist()], rel=1e-6)
            assert torch.equal(chosen, plain[1]) and torch.equal(rejected, plain[2])
    # the NLL term's gradient: -alpha / (chosen tokens) on each chosen answer's summed log-prob, none on the rejected
    with_term = torch.autograd.grad(dpo_losses(policy, reference, counts, 0.1, "sigmoid", 2.0)[0].mean(), policy)[0]
    without = torch.autograd.grad(dpo_losses(policy, reference, counts, 0.1, "sigmoid")[0].mean(), policy)[0]
    assert torch.allclose(with_term - without, torch.tensor([[-2.0 / 18, 0.0]] * 3))


def test_answer_log_probs_count_only_answer_tokens_whatever_the_padding():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt_a, prompt_b = [3, 4, 5, 6], [7, 8]
    rows = [(prompt_a + [10, 11, 12], prompt_a + [13], len(prompt_a)),
            (prompt_b + [14, 15, 16, 17, 18, 19], prompt_b + [20, 21], len(prompt_b))]
    inputs, targets, lengths, index = collate_pairs(rows, [5, 9], pad_id=0)
    assert inputs.shape == (2, 2, 7) and lengths.tolist() == [[6, 4], [7, 3]] and index.tolist() == [5, 9]
    assert (targets[0, 0] != IGNORE).sum() == 3 and (targets[0, 1] != IGNORE).sum() == 1
    with torch.no_grad():
        logps = pair_logps(model, inputs, targets)
        for i, row in enumerate(rows):
            for j in range(2):
                ids, start = row[j], row[2]
                log_probs = F.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)
                expected = sum(log_probs[t - 1, ids[t]].item() for t in range(start, len(ids)))
                assert logps[i, j].item() == pytest.approx(expected, abs=1e-4)


def test_reading_the_books_and_trls_formats(tmp_path):
    records = [
        {"instruction": "Fix it.", "input": "He go.", "output": "He goes.", "chosen": "He goes.",
         "rejected": "He goes, obviously."},
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "What."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]},
    ]
    pairs = read_preferences(write_json(tmp_path / "p.json", records))
    assert [(p.prompt[-1].content, p.prompt[-1].input, p.chosen, p.rejected) for p in pairs] == [
        ("Fix it.", "He go.", "He goes.", "He goes, obviously."), ("Hi?", "", "Hello!", "What."),
        ("Hi?", "", "Hello!", "No."), ("Q", "", "A", "B")]
    assert [m.role for m in pairs[2].prompt] == ["system", "user"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert read_preferences(jsonl) == pairs
    bad = {"instruction": "x", "chosen": "a"}
    for record, message in [(bad, "item 2: missing field 'rejected'"),
                            ({"chosen": "a", "rejected": "b"}, "item 2: missing field 'prompt'"),
                            ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
                             "item 2: the last message of 'chosen' must be the assistant's answer")]:
        with pytest.raises(OwnLLMError, match=message):
            read_preferences(write_json(tmp_path / "bad.json", [records[1], record]))


def test_too_long_pairs_are_cut_or_dropped_and_counted():
    text = "abcdefghijklmnopqrstuvwxyz .?!#:\n"
    tok = char_tokenizer_from_text(text + "Below is an instruction that describes a task. Write a response that "
                                   "appropriately completes the request.INR")
    from ownllm.data.preferences import PreferencePair
    from ownllm.chat_templates import Message
    template = get_template("alpaca")
    short = PreferencePair([Message("user", "hi")], "yes", "no")
    long_answer = PreferencePair([Message("user", "hi")], "y" * 300, "n")
    long_prompt = PreferencePair([Message("user", "h" * 400)], "yes", "no")
    batches = PreferenceBatches([short, long_answer, long_prompt], template, tok, block_size=200, batch_size=2)
    assert (len(batches), batches.truncated, batches.dropped) == (2, 1, 1)
    inputs, targets, lengths, _ = batches.batch(0)
    assert inputs.shape[-1] <= 200 and int(lengths.max()) <= 200
    with pytest.raises(OwnLLMError, match="no preference pair has room"):
        PreferenceBatches([long_prompt], template, tok, block_size=200, batch_size=2)


def test_adapters_disabled_gives_the_base_model():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, LoRAConfig(rank=2, alpha=4))
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()
        adapted = model(ids)
        with adapters_disabled(model):
            off = model(ids)
        again = model(ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(off, base) and torch.equal(again, adapted)


# ---- end to end ---------------------------------------------------------------------------------------------------

def _tiny_run(base, tmp_path, name, **options):
    data = write_json(tmp_path / "prefs.json", preference_records(32))
    common = dict(model=base, data=data, val_file=data, val_fraction=0.0, beta=0.1, show_progress=False,
                  batch_size=8, eval_interval=10, log_interval=5, precision="fp32")
    return finetune_prefer(out=tmp_path / name, **{**common, **options})


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_preference_accuracy_on_the_training_pairs_rises_above_0_9(base, tmp_path, lora):
    options = dict(lora_rank=8, lr=3e-3) if lora else dict(lr=3e-4)
    result = _tiny_run(base, tmp_path, "run", max_steps=20, **options)
    rows = [r for r in metrics_rows(tmp_path / "run") if "val_preference_accuracy" in r]
    assert rows[0]["step"] == 10 and rows[-1]["step"] == 20
    assert result.val["preference_accuracy"] > 0.9 and result.val["reward_margin"] > 0.5
    assert result.val["rewards_chosen"] > result.val["rewards_rejected"]
    assert rows[-1]["val_reward_margin"] == pytest.approx(result.val["reward_margin"], rel=1e-4)
    assert rows[-1]["val_loss"] < math.log(2) - 0.2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == "prefer" and config["template"] == "alpaca" and bool(config["lora"]) == lora
    assert (tmp_path / "run" / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    assert (tmp_path / "run" / "loss.png").is_file()


def test_the_sft_weight_keeps_the_chosen_answers_likelier_than_plain_dpo(base, tmp_path):
    plain = _tiny_run(base, tmp_path, "plain", max_steps=10, lr=3e-4)
    rpo = _tiny_run(base, tmp_path, "rpo", max_steps=10, lr=3e-4, sft_weight=1.0)
    assert rpo.val["nll_chosen"] < plain.val["nll_chosen"] - 0.1  # measured: 4.73 vs 4.92 nats per token
    assert rpo.val["rewards_chosen"] > plain.val["rewards_chosen"]
    assert rpo.val["preference_accuracy"] > 0.9  # and it still learns the preference
    assert metrics_rows(tmp_path / "rpo")[-1]["val_nll_chosen"] == pytest.approx(rpo.val["nll_chosen"], rel=1e-4)
    assert json.loads((tmp_path / "rpo" / "config.json").read_text())["options"]["sft_weight"] == 1.0


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_a_resumed_run_equals_an_uninterrupted_one(base, tmp_path, sft_weight):
    common = dict(max_steps=15, lr=3e-4, dropout=0.1, loss="ipo", sft_weight=sft_weight)
    straight = _tiny_run(base, tmp_path, "a", **common)
    _tiny_run(base, tmp_path, "b", stop_at=10, **common)
    assert (tmp_path / "b" / "reference_logps.safetensors").is_file()
    resumed = finetune_prefer(out=tmp_path / "b", resume=True, show_progress=False)
    assert resumed.train.step == straight.train.step == 15
    assert_same_run(tmp_path / "a", tmp_path / "b", "val_preference_accuracy")
    assert resumed.val == straight.val
    assert json.loads((tmp_path / "b" / "config.json").read_text())["options"]["sft_weight"] == sft_weight


def test_the_cli_runs_and_bad_data_gets_one_line_and_exit_2(base, tmp_path, capsys):
    data = write_json(tmp_path / "prefs.json", preference_records(16))
    assert main(["finetune", "prefer", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "polite"),
                 "--beta", "0.2", "--lora-rank", "4", "--max-steps", "2", "--batch-size", "4", "--val-fraction",
                 "0.25", "--precision", "fp32"]) == 0
    assert "val (4 records): preference accuracy" in capsys.readouterr().out
    bad = write_json(tmp_path / "bad.json", [*preference_records(3), {"instruction": "x", "chosen": "y"}])
    assert main(["finetune", "prefer", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ownllm: error: {bad} item 4: missing field 'rejected' (a pair needs a prompt or instruction, "
                   "chosen and rejected)"]
    assert not (tmp_path / "r").exists()


def test_a_negative_sft_weight_gets_one_line_and_exit_2(base, tmp_path, capsys):
    data = write_json(tmp_path / "prefs.json", preference_records(4))
    with pytest.raises(OwnLLMError, match="--sft-weight must be 0 or more"):
        finetune_prefer(out=tmp_path / "api", model=base, data=data, sft_weight=-0.5)
    assert main(["finetune", "prefer", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--sft-weight", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["ownllm: error: --sft-weight must be 0 or more, not -1.0"]
    assert not (tmp_path / "r").exists() and not (tmp_path / "api").exists()


def test_prefer_on_a_lora_instruct_run_equals_prefer_on_its_merged_copy(base, tmp_path):
    from finetune_helpers import instruction_records
    from ownllm.finetune import finetune_instruct, merge_lora_run
    from ownllm.runs import load_run

    instructions = write_json(tmp_path / "instructions.json", instruction_records(16))
    finetune_instruct(out=tmp_path / "lora", model=base, data=instructions, lora_rank=4, max_steps=3, lr=3e-3,
                      val_fraction=0.0, test_fraction=0.0, show_progress=False, precision="fp32")
    merge_lora_run(load_run(tmp_path / "lora"), tmp_path / "merged")
    first_losses = {}
    for name in ("lora", "merged"):
        _tiny_run(tmp_path / name, tmp_path, f"prefer-{name}", max_steps=2, lr=3e-4, sft_weight=1.0, log_interval=1)
        first_losses[name] = metrics_rows(tmp_path / f"prefer-{name}")[0]["train_loss"]
    assert first_losses["lora"] == pytest.approx(first_losses["merged"], rel=1e-5)
    assert first_losses["lora"] > math.log(2) + 0.5  # the chosen answers' NLL counts: the base's weights matter


def test_pairs_that_carry_nothing_are_skipped_and_counted_and_a_file_of_only_those_is_refused(base, tmp_path, capsys):
    """The book's preference file has pairs whose chosen and rejected answers are equal: no preference, no gradient.
    They (and empty or repeated pairs) are left out, counted in one line; only a file with nothing left is refused."""
    records = preference_records(12)
    equal = [{"instruction": "Name a fruit.", "input": "", "chosen": "A fig.", "rejected": "A fig."},
             {"prompt": "Say hi.", "chosen": "Hi!", "rejected": " Hi!\n"}]
    data = write_json(tmp_path / "prefs.json", [*records[:5], equal[0], *records[5:], equal[1], {}, records[0]])
    argv = ["finetune", "prefer", "--model", str(base), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--val-fraction", "0", "--precision", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("ownllm:")] == [
        f"ownllm: warning: {data}: skipped 4 of 16 pairs that carry nothing: 2 with chosen = rejected (items 6, 14); "
        "1 empty (item 15); 1 duplicate (item 16)"]
    assert "finished at step 1" in captured.out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_pairs"] == 12

    only_equal = write_json(tmp_path / "equal.json", equal)
    assert main([*argv, "--data", str(only_equal), "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ownllm: error: {only_equal}: no pairs left: all 2 carry nothing: 2 with chosen = rejected (items 1, 2)"]
    assert not (tmp_path / "none").exists()
