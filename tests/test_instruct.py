"""Instruction fine-tuning: templates (golden strings), the collate's -100 mask, length-aware batches, reading
Alpaca and chat files, chat over the template, and the CLI end to end (finetune instruct, chat, generate)."""

from __future__ import annotations

import io
import json

import pytest

from finetune_helpers import (assert_user_error, instruction_records, metrics_rows, run_cli,
                              write_json)
from ownllm.cli import main
from ownllm.data.batching import EpochBatches
from ownllm.chat_templates import Message, encode_prompt, get_template
from ownllm.data.instructions import IGNORE, collate, encode_conversation, read_instructions
from ownllm.errors import OwnLLMError
from ownllm.tokenizer import EOT, char_tokenizer_from_text


pytestmark = pytest.mark.usefixtures("one_thread")


ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a fruit.\n\n### Response:\nA pear.<|endoftext|>")
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is very fast."
    "\n\n### Response:\nThe car is as fast as lightning.<|endoftext|>")
CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
          "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you.<|im_end|>\n")


def test_templates_render_golden_strings():
    alpaca, chatml = get_template("alpaca"), get_template("chatml")
    assert alpaca.render([Message("user", "Name a fruit."), Message("assistant", "A pear.")]) == ALPACA_NO_INPUT
    simile = [Message("user", "Rewrite the sentence using a simile.", "The car is very fast."),
              Message("assistant", "The car is as fast as lightning.")]
    assert alpaca.render(simile) == ALPACA_INPUT
    assert alpaca.prompt(simile[:1]) == ALPACA_INPUT.split("The car is as fast as lightning.")[0]
    assert alpaca.prompt(simile[:1]).endswith("### Response:\n")
    chat = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
            Message("user", "Bye"), Message("assistant", "See you.")]
    assert chatml.render(chat) == CHATML
    assert chatml.prompt(chat[:4]) == CHATML.split("See you.")[0]
    assert chatml.prompt([Message("user", "x", "y")]) == "<|im_start|>user\nx\n\ny<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(OwnLLMError):
        get_template("vicuna")


def test_collate_masks_prompt_and_padding_but_not_the_response_and_one_end_token():
    template = get_template("alpaca")
    tok = char_tokenizer_from_text(ALPACA_INPUT.replace(EOT, "") + "Say hi.Hi!")
    short = [Message("user", "Say hi."), Message("assistant", "Hi!")]
    long = [Message("user", "Rewrite the sentence using a simile.", "The car is very fast."),
            Message("assistant", "The car is as fast as lightning.")]
    rows = [encode_conversation(c, template, tok) for c in (short, long)]
    inputs, targets, lengths = collate(rows, pad_id=tok.eot_id, block_size=1000)
    assert inputs.shape == targets.shape == (2, len(rows[1][0]) - 1)
    for row, conversation in enumerate((short, long)):
        response = tok.encode(conversation[-1].content)
        learned = [t for t in targets[row].tolist() if t != IGNORE]
        assert learned == response + [tok.eot_id]  # the response and exactly one end token
        prompt_len = len(tok.encode(template.prompt(conversation[:1])))
        assert targets[row, : prompt_len - 1].eq(IGNORE).all()  # the prompt
        assert targets[row, lengths[row]:].eq(IGNORE).all()  # the padding
        assert inputs[row, : lengths[row]].tolist() == rows[row][0][:-1]
    assert lengths.tolist() == [len(rows[0][0]) - 1, len(rows[1][0]) - 1]
    _, unmasked = encode_conversation(short, template, tok, mask_prompt=False)
    assert IGNORE not in unmasked
    # the prompt used at inference is the training prompt, token for token
    assert encode_prompt(short[:1], template, tok) == rows[0][0][: len(rows[0][0]) - len(tok.encode("Hi!")) - 1]


def test_chatml_learns_every_assistant_turn_and_its_end_marker():
    template = get_template("chatml")
    tok = char_tokenizer_from_text(CHATML)
    conversation = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
                    Message("user", "Bye"), Message("assistant", "See you.")]
    ids, labels = encode_conversation(conversation, template, tok)
    learned = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert learned == "Hello!<|im_end|>See you.<|im_end|>"
    assert template.stop == ["<|im_end|>"] and get_template("alpaca").stop == []


def test_length_aware_batches_are_a_pure_function_of_the_step():
    lengths = [1 + (i * 37) % 200 for i in range(500)]
    plan = EpochBatches(lengths, batch_size=8, seed=3)
    again = EpochBatches(lengths, batch_size=8, seed=3)
    steps = [plan.indices(s) for s in range(plan.batches_per_epoch)]
    assert sorted(i for batch in steps for i in batch) == list(range(500))  # one epoch: each example once
    n = plan.batches_per_epoch + 7  # into the second epoch, asked in reverse order
    assert [again.indices(s) for s in reversed(range(n))][::-1] == [plan.indices(s) for s in range(n)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in steps) / len(steps)
    assert spread < 30  # neighbours in length, not random (a random batch of 8 spans ~150)
    assert plan.indices(plan.batches_per_epoch) != steps[0]  # a new epoch, a new order


def test_reading_alpaca_json_jsonl_and_chat(tmp_path):
    alpaca = write_json(tmp_path / "a.json", instruction_records(3))
    conversations = read_instructions(alpaca)
    assert conversations[0] == [Message("user", "Repeat the word.", "apple"), Message("assistant", "apple apple")]
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}]}) + "\n\n"
                    + json.dumps({"instruction": "i", "output": "o"}) + "\n", encoding="utf-8")
    assert [len(c) for c in read_instructions(chat)] == [3, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n', encoding="utf-8")
    with pytest.raises(OwnLLMError, match=r"bad.jsonl:2: missing field 'output'"):
        read_instructions(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "i", "output": "o"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(OwnLLMError, match=r"broken.jsonl:2: unreadable line"):
        read_instructions(broken)
    roles = tmp_path / "roles.jsonl"
    roles.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(OwnLLMError, match=r"roles.jsonl:1: each message needs a role"):
        read_instructions(roles)


def test_chat_keeps_the_history_in_the_prompt(monkeypatch):
    from ownllm import chat, decoding
    from ownllm.config import model_config_from_preset
    from ownllm.model import GPT

    template = get_template("chatml")
    tok = char_tokenizer_from_text(CHATML + "abcdefghijklmnopqrstuvwxyz ")
    model = GPT(model_config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=512))
    prompts = []
    replies = iter(["hello there", "bye now"])

    def fake_decode(model, continuations, eot_id=None, on_text=None):  # the model "says" the next reply
        continuation = continuations[0]
        prompts.append(tok.decode(continuation.prompt))
        for token in tok.encode(next(replies) + "<|im_end|>tail"):
            on_text(0, continuation.accept(token, eot_id))
            if continuation.finish_reason:
                break
        on_text(0, continuation.text.flush())

    monkeypatch.setattr(decoding, "decode", fake_decode)
    lines = iter(["hi\n", "/reset\n", "bye\n", None])
    out = []
    conversation = chat.chat_loop(model, chat.ChatFormat(tok, template), decoding.SamplingOptions(max_new_tokens=40),
                                  lambda: next(lines), out.append, system="Be brief.")
    assert prompts[0] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                         "<|im_start|>assistant\n"
    assert "hi" not in prompts[1] and prompts[1].endswith("user\nbye<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(out) == ("hello there\n\n(conversation reset: the model no longer sees the earlier messages)\n\n"
                            "bye now\n\n")  # streamed, cut at the end marker; a blank line after each answer
    assert [m.content for m in conversation] == ["Be brief.", "bye", "bye now"]


def test_finetune_instruct_chat_and_generate_from_the_cli(base, tmp_path, capsys, monkeypatch):
    data = write_json(tmp_path / "instructions.json", instruction_records(96))
    run = tmp_path / "assistant"
    result = run_cli("finetune", "instruct", "--model", base, "--data", data, "--out", run, "--max-steps", "60",
                     "--batch-size", "8", "--lr", "3e-3", "--eval-interval", "30", "--max-new-tokens", "12",
                     "--precision", "fp32", "--val-fraction", "0.05", "--test-fraction", "0.1")
    assert result.returncode == 0, result.stderr
    assert "test (10 records) loss" in result.stdout and "ROUGE-L" in result.stdout
    assert result.stdout.splitlines()[0] == ("template: alpaca (the project's default: the model has no chat "
                                             "template of its own)")
    rows = metrics_rows(run)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "instruct" and config["template"] == "alpaca" and config["options"]["mask_prompt"] is True
    responses = json.loads((run / "responses.json").read_text())
    assert len(responses) == 10 and set(responses[0]) == {"instruction", "input", "output", "response"}
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["test_loss"] is not None and 0.0 <= summary["rouge_l_f1"] <= 1.0

    chat = run_cli("chat", run, "--max-new-tokens", "8", "--temperature", "0", stdin="Say plum.\nSay fig.\n")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.split("\n\n")[:-1]) == 2  # one streamed answer per line of input, then a blank line
    gen = run_cli("generate", run, "--instruction", "Repeat the word.", "--input", "kiwi", "--max-new-tokens", "8",
                  "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert "### Response" not in gen.stdout  # only the answer is printed

    # a base model chats too, in the format the server gives it (ChatML: the BPE tokenizer spells its markers)
    import ownllm
    from ownllm.chat import chat_format_for, chat_reply
    from ownllm.decoding import SamplingOptions

    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Say plum.\n"))
    assert main(["chat", str(base), "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]) == 0
    base_run = ownllm.load(base)
    chat_format = chat_format_for(base_run.run_config, base_run.tokenizer)
    answer = chat_reply(base_run.model, chat_format, [Message("user", "Say plum.")],
                        SamplingOptions(max_new_tokens=6, temperature=0))
    assert chat_format.name == "chatml" and capsys.readouterr().out == answer + "\n\n"


def test_bad_instruction_input_gets_one_line_and_exit_2(base, tmp_path, capsys):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"output": "z"}]), encoding="utf-8")
    assert main(["finetune", "instruct", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ownllm: error: {data} item 2: missing field 'instruction' (Alpaca records need instruction "
                   "and output)"]
    assert not (tmp_path / "r").exists()
    good = write_json(tmp_path / "good.json", instruction_records(4))
    assert_user_error(run_cli("finetune", "instruct", "--model", tmp_path / "nothing", "--data", good, "--out",
                              tmp_path / "r2"), "nothing: no such run directory")
    assert not (tmp_path / "r2").exists()


def test_a_context_too_small_for_every_prompt_names_the_block_size_that_fits():
    from ownllm.data.instructions import InstructionBatches

    conversations = [[Message("user", r["instruction"], r["input"]), Message("assistant", r["output"])]
                     for r in instruction_records(8)]
    tokenizer = char_tokenizer_from_text("".join(get_template("alpaca").render(c) for c in conversations))
    with pytest.raises(OwnLLMError, match=r"context window \(64 tokens\).*--block-size (\d+)") as error:
        InstructionBatches(conversations, get_template("alpaca"), tokenizer, block_size=64, batch_size=2)
    suggested = int(str(error.value).split("--block-size ")[1].split()[0])
    fits = InstructionBatches(conversations, get_template("alpaca"), tokenizer, block_size=suggested, batch_size=2)
    assert fits.dropped == 0 and fits.truncated <= len(conversations) // 2


def test_instruct_on_a_chatml_model_trains_in_its_own_template_and_default_system_prompt(base, tmp_path, monkeypatch,
                                                                                         capsys):
    import shutil

    import ownllm
    from ownllm.chat import chat_format_for, render_jinja
    from ownllm.finetune import finetune_instruct
    from ownllm.finetune import instruct as instruct_stage
    from ownllm.tokenizer import load_tokenizer
    from test_prompts import CHATML_JINJA, SYSTEM

    model = tmp_path / "chatml-model"  # a run whose tokenizer carries a ChatML chat template, as SmolLM2's does
    shutil.copytree(base, model)
    tok = load_tokenizer(model / "tokenizer")
    tok.chat_template = CHATML_JINJA
    tok.save(model / "tokenizer")
    seen = []

    class Spy(instruct_stage.InstructionBatches):
        def __init__(self, conversations, template, *args, **kwargs):
            seen.append((list(conversations), template))
            super().__init__(conversations, template, *args, **kwargs)

    monkeypatch.setattr(instruct_stage, "InstructionBatches", Spy)
    data = write_json(tmp_path / "instructions.json", instruction_records(8))
    finetune_instruct(out=tmp_path / "run", model=model, data=data, max_steps=1, val_fraction=0.0,
                      test_fraction=0.0, precision="fp32")
    assert capsys.readouterr().out.splitlines()[0] == f"template: chatml (the model's own); system prompt {SYSTEM!r}"
    conversations, template = seen[0]
    assert template.name == "chatml"
    user = conversations[0][1]
    own = render_jinja(CHATML_JINJA, tok, [{"role": "user", "content": user.content + (
        f"\n\n{user.input}" if user.input else "")}], add_generation_prompt=True)
    expected = tok.starting_sequence(tok.encode(own))
    trained, _ = encode_conversation(conversations[0], template, tok)
    assert trained[:len(expected)] == expected  # the prompt ids equal the model's own template rendering
    assert json.loads((tmp_path / "run" / "config.json").read_text())["template"] == "chatml"
    run = ownllm.load(tmp_path / "run")  # and the fine-tuned run chats with the same prompt
    assert chat_format_for(run.run_config, run.tokenizer).encode(conversations[0][1:2]) == expected
