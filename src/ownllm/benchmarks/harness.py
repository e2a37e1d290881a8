"""lm-evaluation-harness on any run ownllm can load, without exporting it: the `ownllm` model for `lm_eval`.

    python -m ownllm.benchmarks.harness --model ownllm --model_args path=runs/smol --tasks hellaswag
        # lm_eval's own command line, with the `ownllm` model registered first (any lm_eval flag works)

    import lm_eval, ownllm.benchmarks.harness          # importing the module registers the model
    lm_eval.simple_evaluate(model="ownllm", model_args="path=runs/smol", tasks=["hellaswag"])

Needs the optional extra: `pip install 'ownllm[lm-eval]'`. model_args: `path` (a run directory, a Hugging Face
model directory: whatever `ownllm.load` reads), `device` (default auto), `quantize` (none, int8, bf16),
`precision` (fp32, bf16 autocast), `max_gen_toks` (default 256), `batching` (packed, padded: how documents share
forward passes, ownllm.benchmarks.batching; default packed on a CPU, padded on a GPU), `generation_batch` (prompts
decoded together, default 16). `lm_eval --model ownllm` alone does not know the model: lm_eval has no plugin
entry point for models, hence the `python -m` wrapper.

`loglikelihood` scores each document's requests together, many documents per forward pass (the batched scorer of
`ownllm evaluate --tasks`, ownllm.benchmarks.batching); `loglikelihood_rolling` scores a text in disjoint windows of
the context length, the first conditioned on BOS (or end-of-text); `generate_until` decodes greedily (or samples
when the task asks for `do_sample`) until one of the task's stop strings, `generation_batch` requests of the same
settings at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ownllm.benchmarks.batching import score_items
from ownllm.benchmarks.scoring import encode_pair, score_choices_greedy
from ownllm.errors import OwnLLMError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - depends on the environment
    raise OwnLLMError("the lm-evaluation-harness model needs lm_eval: `pip install 'ownllm[lm-eval]'`") from None


@register_model("ownllm")
class OwnLLMHarnessModel(LM):
    """lm_eval's LM interface over an ownllm model and tokenizer."""

    def __init__(self, path: str, device: str | None = None, quantize: str = "none", precision: str = "fp32",
                 max_gen_toks: int | str = 256, batch_size: Any = None, max_batch_size: Any = None,
                 batching: str | None = None, generation_batch: int | str = 16, **_: Any) -> None:
        super().__init__()
        from ownllm.runs import load_run

        run = load_run(path, device or "auto", quantize=quantize)
        self.model, self.tokenizer = run.model.eval(), run.tokenizer
        self.precision = precision
        self.batching = batching or ("padded" if self.model.tok_emb.weight.device.type == "cuda" else "packed")
        self.max_gen_toks = int(max_gen_toks)
        self.generation_batch = int(generation_batch)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is conditioned on: BOS, else end-of-text (as the harness's HF model)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eot_id

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        groups: dict[tuple[Any, Any], list[int]] = {}
        for index, request in enumerate(requests):  # one document's choices share their prefix
            key = (request.task_name, request.doc_id) if request.doc_id is not None else ("", index)
            groups.setdefault(key, []).append(index)
        members = list(groups.values())
        items = [[encode_pair(self.tokenizer, *requests[i].args) for i in group] for group in members]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(items), desc="ownllm loglikelihood", disable=disable_tqdm, unit="doc") as bar:
            scores = score_items(self.model, items, mode=self.batching, precision=self.precision,
                                 on_items=bar.update)
        for group, item_scores in zip(members, scores):
            for index, score in zip(group, item_scores):
                results[index] = score
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        window = self.model.config.block_size
        results = []
        for request in tqdm(requests, desc="ownllm rolling", disable=disable_tqdm):
            ids = self.tokenizer.encode(request.args[0])
            windows = [make_disjoint_window(pair) for pair in get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=window, context_len=1)]
            results.append(sum(score_choices_greedy(self.model, [pair], self.precision)[0][0] for pair in windows))
        return results

    def sampling(self, settings: dict[str, Any]) -> Any:
        """A request's generation settings as ownllm's SamplingOptions (greedy unless `do_sample`)."""
        from ownllm.decoding import SamplingOptions

        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(settings.get("do_sample", False))
        return SamplingOptions(max_new_tokens=int(settings.get("max_gen_toks", self.max_gen_toks)),
                               temperature=float(settings.get("temperature", 1.0)) if sample else 0.0, stop=until)

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        from ownllm.benchmarks.generative import cut_at_stops
        from ownllm.decoding import generate

        groups: dict[tuple[Any, ...], tuple[Any, list[int]]] = {}
        for index, request in enumerate(requests):  # requests of the same settings decode together
            options = self.sampling(request.args[1])
            key = (tuple(options.stop), options.max_new_tokens, options.temperature)
            groups.setdefault(key, (options, []))[1].append(index)
        outputs = [""] * len(requests)
        with tqdm(total=len(requests), desc="ownllm generate", disable=disable_tqdm) as bar:
            for options, members in groups.values():
                for start in range(0, len(members), self.generation_batch):
                    chunk = members[start:start + self.generation_batch]
                    texts = generate(self.model, self.tokenizer, [requests[i].args[0] for i in chunk], options)
                    for index, text in zip(chunk, texts):  # the harness returns the text before the first stop
                        outputs[index] = cut_at_stops(text, options.stop)
                    bar.update(len(chunk))
        return outputs


def main() -> None:
    """lm_eval's command line with the `ownllm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
