"""The run directory: weights, config, tokenizer and trainer state, written atomically and read back safely.

    RUN/config.json          what the run is: model config, training settings, data, tokenizer kind (readable JSON)
    RUN/model.safetensors    the latest weights (what `generate`, `evaluate` and `ownllm.load` read)
    RUN/tokenizer/           the tokenizer files, so a run is self-contained
    RUN/checkpoint/          everything `--resume` needs: weights, optimizer, step, RNG states (replaced as a whole)
    RUN/metrics.jsonl        one JSON object per logged step
    RUN/loss.png             train and val loss curves

`RunConfig` is config.json of a run trained here, typed: the stage's options dataclass (ownllm.options), stored once
and read back into the same class, the resolved TrainConfig and the speed decision. This module is storage only: it
knows no training stage and no foreign format. Turning a path into a model is ownllm.runs (`load_run`).

Every write goes to a temporary name first and is renamed into place, so a kill at any moment leaves the last
good checkpoint readable. Weights are safetensors; the trainer state is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ownllm.config import ModelConfig, SpeedChoice, TrainConfig
from ownllm.errors import OwnLLMError
from ownllm.options import StageOptions
from ownllm.outputs import save_safetensors

RUN_FORMAT = "ownllm-run-v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FILE = "state.json"
COMPILED_PREFIX = "_orig_mod."


# ---- atomic file writes -------------------------------------------------------------------------------------------

def _fsync_and_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    _fsync_and_replace(tmp, path)


def read_json(path: Path, advice: str = "") -> Any:
    """Parse a JSON file; invalid JSON or text is an OwnLLMError naming the file (and `advice`, when given)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OwnLLMError(f"{path}: not valid JSON ({error}){advice}") from None


def weights_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for saving: tied weights stored once, no `_orig_mod.` prefix from torch.compile."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        name = name.replace(COMPILED_PREFIX, "")
        if tensor.data_ptr() in seen and name.endswith("lm_head.weight"):
            continue  # tied to the token embedding
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    return state


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save the model's weights as safetensors at `path`, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_safetensors(weights_state_dict(model), tmp, metadata=metadata)
    _fsync_and_replace(tmp, path)


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load safetensors weights into `model`; a missing, corrupt or mismatched file is an OwnLLMError."""
    if not path.is_file():
        raise OwnLLMError(f"{path}: no such weights file")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for a bad header or truncated data
        raise OwnLLMError(f"{path}: not a readable safetensors file ({error}); the checkpoint is corrupt") from None
    state = {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}
    target = getattr(model, "_orig_mod", model)
    expected = target.state_dict()
    if getattr(getattr(target, "config", None), "tie_embeddings", False) and "tok_emb.weight" in state:
        state.setdefault("lm_head.weight", state["tok_emb.weight"])
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise OwnLLMError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise OwnLLMError(f"{path}: weights do not match the model config ({detail})")
    target.load_state_dict(state, strict=strict)


# ---- run config ---------------------------------------------------------------------------------------------------

def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.json as a dict; a missing run directory or config is an OwnLLMError."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise OwnLLMError(f"{run_dir}: no such run directory")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise OwnLLMError(f"{run_dir}: not an ownllm run (no {CONFIG_FILE})")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or "model" not in data:
        raise OwnLLMError(f"{path}: not an ownllm run config (expected \"format\": \"{RUN_FORMAT}\")")
    return data


def write_run_config(run_dir: Path, model_config: ModelConfig, **sections: Any) -> None:
    write_json_atomic(Path(run_dir) / CONFIG_FILE, {"format": RUN_FORMAT, "model": model_config.to_dict(), **sections})


@dataclass
class RunConfig:
    """config.json of a run trained here: what the run is (`model`, `task`, and the `sections` loading reads: the
    base model, LoRA, labels, template, ...) and how it trains (the stage's `options`, `train`, `speed`)."""

    model: ModelConfig
    task: str
    options: StageOptions
    train: TrainConfig
    sections: dict[str, Any] = field(default_factory=dict)
    speed: SpeedChoice | None = None

    OWN_KEYS = ("format", "model", "task", "train", "speed", "options")

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "model": self.model.to_dict(), "task": self.task, **self.sections,
                "train": self.train.to_dict(), "speed": self.speed.to_dict() if self.speed else None,
                "options": self.options.stored()}

    def write(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / CONFIG_FILE, self.to_dict())

    @classmethod
    def read(cls, run_dir: Path, now: StageOptions, task: str) -> "RunConfig":
        """The `task` run in `run_dir` (a run of another task is refused), its options read back into `now`'s class,
        with `now`'s options of this invocation (the device, the train settings given now, ...)."""
        data = read_run_config(run_dir)
        if data.get("task", "lm") != task or "train" not in data:
            made = f"a {data.get('task', 'lm')!r} run" if "train" in data else "not a run trained by ownllm"
            raise OwnLLMError(f"{run_dir}: {made}, not a {task!r} run to resume; resume it with the verb that made it, "
                              "or start a new run with another --out")
        sections = {k: v for k, v in data.items() if k not in cls.OWN_KEYS}
        options = type(now).from_run(data.get("options") or {}, {**sections, "model": data["model"]}, now)
        speed = SpeedChoice.from_dict(data["speed"]) if isinstance(data.get("speed"), dict) else None
        return cls(ModelConfig.from_dict(data["model"]), data.get("task", "lm"), options,
                   TrainConfig.from_dict(data.get("train") or {}), sections, speed)


# ---- trainer checkpoints ------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, model: nn.Module, trainer_state: dict[str, Any], info: dict[str, Any],
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write RUN/checkpoint/ as a whole (weights, trainer state, info) and publish the weights as RUN/model.safetensors.

    The new checkpoint is built in `checkpoint.tmp/` and swapped in with renames; `load_checkpoint` falls back to
    `checkpoint.old/` if a kill landed between the two renames. `weights` (e.g. only LoRA adapters and a head)
    replaces the model's full state; such a partial state is kept in the checkpoint and not published.
    """
    run_dir = Path(run_dir)
    final, tmp, old = (run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.tmp", run_dir / f"{CHECKPOINT_DIR}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata = {"step": str(info.get("step", 0))}
    if weights is None:
        save_weights(model, tmp / WEIGHTS_FILE, metadata=metadata)
    else:
        save_safetensors(weights, tmp / WEIGHTS_FILE, metadata=metadata)
    torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
    write_json_atomic(tmp / STATE_FILE, info)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    if weights is None:
        _publish_weights(final / WEIGHTS_FILE, run_dir / WEIGHTS_FILE)


def _publish_weights(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)  # no second copy on disk where the file system allows it
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The directory holding the last complete checkpoint of a run, or None."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        candidate = Path(run_dir) / name
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_checkpoint(run_dir: Path, model: nn.Module, strict: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the last checkpoint's weights into `model`; return (trainer_state, info). `strict=False` accepts a
    checkpoint of some of the tensors (a run that saves only what trains); every tensor in it must fit the model."""
    directory = checkpoint_dir(run_dir)
    if directory is None:
        raise OwnLLMError(f"{run_dir}: no checkpoint to resume from (the run stopped before its first one); run the "
                          "same command without --resume to start it over")
    load_weights(model, directory / WEIGHTS_FILE, strict=strict)
    try:
        trainer_state = torch.load(directory / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a corrupt or foreign file
        raise OwnLLMError(f"{directory / TRAINER_STATE_FILE}: unreadable trainer state ({error})") from None
    info = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    return trainer_state, info
