"""ownllm: build your own language model end to end on one machine, and keep it private.

    import ownllm
    run = ownllm.load("runs/my-model")          # run.model, run.tokenizer, run.config
    print(ownllm.generate(run.model, run.tokenizer, "To be or", max_new_tokens=50)[0])

Stages, one module each: `tokenizer`, `data.text`, `model`, `training`, `pretrain`, `checkpoint` (storage),
`runs` (loading), `decoding`, `evaluation`; `options` holds what each training stage takes; the `ownllm` command
(`cli`) is a thin layer over them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "generate", "pretrain", "GPT", "ModelConfig", "TrainConfig", "OwnLLMError", "__version__"]

if TYPE_CHECKING:
    from ownllm.runs import LoadedRun


def load(path: str, device: str = "cpu", quantize: str = "auto") -> "LoadedRun":
    """Load a run directory, a Hugging Face model directory (GPT-2, Llama, Qwen2), a GGUF file or `hf:ORG/NAME`
    (downloaded through the HF cache) for inference: `.model`, `.tokenizer`, `.config` (ownllm.runs.load_run)."""
    from ownllm.runs import load_run

    return load_run(path, device=device, quantize=quantize)


def __getattr__(name: str) -> Any:  # import heavy modules (torch) only when used
    if name == "generate":
        from ownllm.decoding import generate

        return generate
    if name == "pretrain":
        from ownllm.pretrain import pretrain

        return pretrain
    if name == "GPT":
        from ownllm.model import GPT

        return GPT
    if name in ("ModelConfig", "TrainConfig"):
        from ownllm import config

        return getattr(config, name)
    if name == "OwnLLMError":
        from ownllm.errors import OwnLLMError

        return OwnLLMError
    raise AttributeError(f"module 'ownllm' has no attribute {name!r}")
