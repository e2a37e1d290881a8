"""What every reader returns, and how an imported model becomes an ownllm run directory.

    model = read_gguf("model.gguf")           # a ForeignModel (ownllm.interop.readers.gguf, .hf alike)
    model.config, model.state, model.tokenizer, model.run_config
    save_as_run(model, Path("runs/smol"))      # model.safetensors, config.json, tokenizer/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ownllm.checkpoint import TOKENIZER_DIR, WEIGHTS_FILE, write_run_config
from ownllm.config import ModelConfig
from ownllm.outputs import replaced_dir, save_safetensors
from ownllm.tokenizer import Tokenizer


@dataclass
class ForeignModel:
    """A model read from another format, in ownllm's terms: its config, its float32 weights under ownllm's parameter
    names (no `lm_head.weight` when the embeddings are tied), its tokenizer, the format's name and the run config's
    sections saying where it came from (`source`, and `template`, `embedding_pooling` where the file has them)."""

    config: ModelConfig
    state: dict[str, Tensor]
    tokenizer: Tokenizer
    format: str  # "hf" or "gguf"
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def run_config(self) -> dict[str, Any]:
        """What a loaded model's `run_config` says: the format, the model config and the sections."""
        return {"format": self.format, "model": self.config.to_dict(), **self.sections}


def save_as_run(model: ForeignModel, out: Path) -> Path:
    """Write `model` as an ownllm run directory at `out` (already checked by `ownllm.outputs.check_output`); the
    directory appears whole or not at all."""
    with replaced_dir(out) as staging:
        save_safetensors({name: tensor.contiguous() for name, tensor in model.state.items()}, staging / WEIGHTS_FILE)
        model.tokenizer.save(staging / TOKENIZER_DIR)
        write_run_config(staging, model.config, **model.sections)
    return out
