"""Answers grounded in the documents, measured on a small hidden-answer set: facts written into notes, questions
whose answer is in exactly one note, and questions the notes do not cover.

    PYTHONPATH=src nice -n 10 python bench/grounded_answers.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--threads 2]

The notes are written to a temporary folder, indexed with the model as embedder (`ownllm.retrieval.build_index`,
default chunking), and every question goes through `ownllm.retrieval.answer` with the defaults of `ownllm ask`
(k 4, the index's calibrated ranking and relevance threshold, greedy, 256 tokens). Scored: an answerable
question is **right** when the answer holds the expected word, **cited** when it also cites [n] for the source
that holds the fact; an unanswerable one is a **correct refusal** when the answer is "The documents do not say."
(or says the documents do not hold it). Prints one line per question and the shares.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

NOTES = {
    "car.md": "The car's next inspection is due on 9 May 2027. The garage on Mill Lane does it for 85 euros.",
    "wifi.txt": "The guest wifi network is called Lighthouse and its password is sunflower42.",
    "boiler.md": "Anna Berg serviced the boiler in October. She charges 120 euros and can be reached on 0612 555 019.",
    "cat.txt": "Biscuit, the cat, is vaccinated every spring by Dr Okafor at the Elm Street clinic.",
    "insurance.md": "The home insurance policy number is HX-4471. It renews automatically every 1 March.",
    "garden.txt": "The apple tree was planted in 2019. Prune it in late winter, before the buds open.",
    "passport.md": "Mia's passport expires in August 2029; renewing it takes about six weeks.",
    "recipes.md": "Grandma's bread: 500 g flour, 10 g salt, 7 g yeast, 350 ml water. Bake 35 minutes at 200 degrees.",
}
ANSWERABLE = [
    ("When is the car's next inspection due?", "9 May 2027", "car.md"),
    ("What is the guest wifi password?", "sunflower42", "wifi.txt"),
    ("Who serviced the boiler?", "Anna", "boiler.md"),
    ("Which vet vaccinates Biscuit the cat?", "Okafor", "cat.txt"),
    ("What is the home insurance policy number?", "HX-4471", "insurance.md"),
    ("How long does grandma's bread bake?", "35 minutes", "recipes.md"),
]
UNANSWERABLE = [
    "What is the capital of Mongolia?",
    "How many goals did the football team score last Sunday?",
    "What time does the swimming pool open?",
    "Who is the landlord of the flat?",
]
REFUSAL = re.compile(r"documents do not say|do not (say|mention|contain)|not (mentioned|stated)", re.IGNORECASE)


def cited(answer: str, hits: list, source: str) -> bool:
    numbers = {int(n) for n in re.findall(r"\[(\d+)\]", answer)}
    return any(0 < n <= len(hits) and hits[n - 1].chunk.path == source for n in numbers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the answering model (also the embedder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ownllm
    from ownllm.retrieval import answer, build_index, open_index

    run = ownllm.load(args.model)
    with tempfile.TemporaryDirectory() as folder:
        for name, text in NOTES.items():
            (Path(folder) / "notes" / name).parent.mkdir(exist_ok=True)
            (Path(folder) / "notes" / name).write_text(text, encoding="utf-8")
        build_index(Path(folder) / "notes", run, Path(folder) / "notes.index")
        index = open_index(Path(folder) / "notes.index")
    print(f"calibration: weights {index.calibration.weights}, min relevance {index.calibration.min_relevance}")
    right = with_citation = refused = 0
    start = time.perf_counter()
    for question, expected, source in ANSWERABLE:
        text, hits = answer(run, index, question)
        ok = expected.lower() in text.lower()
        right += ok
        with_citation += ok and cited(text, hits, source)
        print(f"{'right' if ok else 'WRONG'}{' cited' if cited(text, hits, source) else ''}: {question} -> "
              f"{text.strip()!r} [{', '.join(h.chunk.path for h in hits)}]")
    for question in UNANSWERABLE:
        text, hits = answer(run, index, question)
        ok = bool(REFUSAL.search(text))
        refused += ok
        print(f"{'refused' if ok else 'INVENTED'}: {question} -> {text.strip()!r} "
              f"[{', '.join(h.chunk.path for h in hits)}]")
    print(f"right {right}/{len(ANSWERABLE)}, right and cited {with_citation}/{len(ANSWERABLE)}, correct refusals "
          f"{refused}/{len(UNANSWERABLE)}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
