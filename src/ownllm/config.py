"""Model and training configuration.

`ModelConfig` describes every architecture ownllm builds: the GPT-2 flavour (learned positions, LayerNorm,
GELU-tanh MLP, biases, tied embeddings) and the Llama flavour (RoPE, RMSNorm, SwiGLU, grouped-query attention,
optional qkv bias, tied or untied head) are the same class with different field values. Named presets give the
usual shapes; `model_config_from_preset("mini", n_layer=4)` overrides fields of a preset.

`TrainConfig` holds the optimiser, schedule and loop settings shared by pretraining and fine-tuning; `SpeedChoice`
what `--precision` and `--compile` resolved to for a run (ownllm.probe decides it).

A field made with `option(...)` is also a flag of the training verbs: its metadata holds the help text, the flag's
spelling, choices and help group, from which ownllm.cli.options derives the flags (the stage options of
ownllm.options are made the same way). `ModelConfig`'s recipe fields are the flags of `pretrain`; `TrainConfig`'s
fields are the training flags of every stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.rope import scaling_problem


MLP_KINDS = ("gelu", "swiglu", "geglu", "relu2")  # relu2: relu(x)^2 (Primer, modded-nanogpt); geglu: Gemma
RECIPE_GROUP = "model recipe (defaults: the --model preset's; docs/guide.md)"
TRAIN_GROUP = "training (defaults suit the --model preset)"
SCALE_GROUP = "several processes (docs/scaling.md)"


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: str | None = None,
           group: str | None = None, section: str | None = None, fields_of: type | None = None,
           at_least: float | None = None, above: float | None = None, **argparse_settings: Any) -> Any:
    """A dataclass field that is also a flag: `help`, `flag` (default --name-with-dashes), `group` (its help
    group) and argparse's `choices`, `nargs`, `metavar`, ... (the type comes from the annotation). `fields_of`: a
    dict field of values for that dataclass's fields, one flag each (the train settings). `section`: the run's
    config.json keeps the option (resolved) as that top-level section, which loading reads, instead of among the
    stage's options ("lora.rank": the key of a section). `at_least` / `above`: the range of a number, checked for
    every stage (`ownllm.options.check_ranges`)."""
    metadata = {"help": help, "flag": flag, "group": group, "section": section, "fields_of": fields_of,
                "at_least": at_least, "above": above, "argparse": argparse_settings}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class ModelConfig:
    """Shape and flavour of a GPT. Field names follow nanoGPT; Llama-style fields default to GPT-2 behaviour."""

    vocab_size: int = 50257
    block_size: int = option(1024)
    n_layer: int = option(12)
    n_head: int = option(12)
    n_embd: int = option(768)
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (multi-head attention)
    head_dim: int | None = None  # None = n_embd // n_head
    mlp_hidden: int | None = None  # None = 4 * n_embd (gelu) or the Llama rule (swiglu)
    dropout: float = option(0.0)
    bias: bool = option(True, "biases in linear layers and norms", group=RECIPE_GROUP)  # and LayerNorm (GPT-2)
    qkv_bias: bool | None = None  # bias on q/k/v projections only (Qwen2); None = same as `bias`
    mlp_bias: bool | None = None  # bias on the MLP's linear layers (HF Llama `mlp_bias`); None = same as `bias`
    norm: str = option("layernorm", "normalisation layers", group=RECIPE_GROUP, choices=["layernorm", "rmsnorm"])
    norm_eps: float = 1e-5
    mlp: str = option("gelu", "MLP activation (relu2: relu(x)^2)", group=RECIPE_GROUP,  # gelu: tanh approximation
                      choices=list(MLP_KINDS))
    position: str = option("learned", "learned position embeddings or rotary (RoPE)", group=RECIPE_GROUP,
                           choices=["learned", "rope"])
    rope_theta: float = 10000.0
    tie_embeddings: bool = option(True, "share the token embedding with the LM head (--no-tie-embeddings: untied "
                                  "head)", group=RECIPE_GROUP)
    # speedrun recipe options (modded-nanogpt, nanochat); the defaults keep the GPT-2 / Llama behaviour
    qk_norm: bool = option(False, "RMSNorm on each head's queries and keys", group=RECIPE_GROUP)  # no gain
    zero_init_proj: bool = option(False, "start attention and MLP output projections at zero",  # blocks = identity
                                  group=RECIPE_GROUP)
    logit_softcap: float | None = option(None, "cap logits smoothly to (-C, C) with C*tanh(logits/C)",  # Gemma 2
                                         group=RECIPE_GROUP)
    # the open models' options (docs/open-models.md); each off by default
    qk_norm_gain: bool = False  # with qk_norm: the q/k RMSNorms have a learned gain per dimension (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): Gemma's (1 + weight)
    sandwich_norm: bool = False  # norms on the attention and MLP outputs too, before the residual add (Gemma 2/3)
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by this ** -0.5; None = head_size
    rope_scaling: dict[str, Any] | None = None  # Hugging Face's rope_scaling keys: rope_type linear/llama3/yarn
    nope_layers: tuple[int, ...] = ()  # layers without positional encoding (SmolLM3: every fourth)
    sliding_window: int | None = None  # the local layers' attention sees the last `sliding_window` positions
    local_layers: tuple[int, ...] = ()  # which layers are local (sliding window; Gemma 3: five of every six)
    local_rope_theta: float | None = None  # the local layers' own RoPE base, unscaled (Gemma 3); None = rope_theta

    def __post_init__(self) -> None:
        self.nope_layers = tuple(self.nope_layers)  # a JSON list when read back from config.json
        self.local_layers = tuple(self.local_layers)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # Llama: 2/3 of 4*d, rounded up to a multiple of 64
            hidden = int(2 * 4 * self.n_embd / 3)
            return 64 * ((hidden + 63) // 64)
        return 4 * self.n_embd

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def use_mlp_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    def validate(self) -> None:
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', not {self.norm!r}"),
            (self.mlp in MLP_KINDS, f"mlp must be one of {', '.join(MLP_KINDS)}, not {self.mlp!r}"),
            (self.position in ("learned", "rope"), f"position must be 'learned' or 'rope', not {self.position!r}"),
            (min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) > 0,
             "vocab_size, block_size, n_layer, n_head and n_embd must be positive"),
            (self.head_dim is not None or self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (self.n_head % self.kv_heads == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), not {self.dropout}"),
            (self.position != "rope" or self.head_size % 2 == 0, "RoPE needs an even head size"),
            (self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap must be positive (or None)"),
            (not self.qk_norm_gain or self.qk_norm, "qk_norm_gain needs qk_norm"),
            (self.norm_offset == 0 or self.norm == "rmsnorm", "norm_offset applies to rmsnorm only"),
            (self.query_pre_attn_scalar is None or self.query_pre_attn_scalar > 0,
             "query_pre_attn_scalar must be positive (or None)"),
            (all(0 <= i < self.n_layer for i in (*self.nope_layers, *self.local_layers)),
             f"nope_layers and local_layers must be layer numbers 0..{self.n_layer - 1}"),
            (not self.local_layers or (self.sliding_window or 0) > 0, "local_layers need a positive sliding_window"),
            (self.position == "rope" or not (self.nope_layers or self.rope_scaling or self.local_rope_theta),
             "nope_layers, rope_scaling and local_rope_theta need position='rope'"),
            (scaling_problem(self.rope_scaling) is None, scaling_problem(self.rope_scaling)),
        ]
        for ok, message in checks:
            if not ok:
                raise OwnLLMError(f"invalid model config: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OwnLLMError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)


_GPT2 = dict(bias=True, norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True, vocab_size=50257)

PRESETS: dict[str, dict[str, Any]] = {
    # a few thousand parameters for tests
    "tiny": dict(_GPT2, n_layer=2, n_head=2, n_embd=32, block_size=64),
    # the same, Llama flavour, with grouped-query attention and an untied head (tests)
    "tiny-llama": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, bias=False, norm="rmsnorm",
                       mlp="swiglu", position="rope", tie_embeddings=False),
    # ~10M parameters with an 8k vocabulary: trains on a laptop CPU in minutes
    "mini": dict(_GPT2, n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8000),
    # a Llama-style model of the same size
    "mini-llama": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, vocab_size=8000, bias=False,
                       norm="rmsnorm", mlp="swiglu", position="rope", tie_embeddings=True),
    # nanoGPT's char-level "baby GPT" for Shakespeare on a CPU
    "baby": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    # the CPU speedrun recipe (docs/guide.md): RoPE, RMSNorm, ReLU^2, QK-norm, zero-initialised projections,
    # an untied head with a logit soft-cap, no biases; trained with Muon (TRAIN_PRESETS). Char Shakespeare size.
    "speedrun": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False, norm="rmsnorm",
                     mlp="relu2", position="rope", qk_norm=True, zero_init_proj=True, tie_embeddings=False,
                     logit_softcap=15.0),
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}


def model_config_from_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied (None values are ignored)."""
    if name not in PRESETS:
        raise OwnLLMError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(values)


# Training defaults that suit each preset (anything not named falls back to TrainConfig's defaults).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=8, lr=3e-3, warmup_steps=10, max_steps=200, eval_interval=50, eval_steps=4),
    "tiny-llama": dict(batch_size=8, lr=3e-3, warmup_steps=10, max_steps=200, eval_interval=50, eval_steps=4),
    "mini": dict(batch_size=16, lr=1e-3, warmup_steps=100, max_steps=2000, eval_interval=200, eval_steps=20),
    "mini-llama": dict(batch_size=16, lr=1e-3, warmup_steps=100, max_steps=2000, eval_interval=200, eval_steps=20),
    # nanoGPT's CPU Shakespeare recipe
    "baby": dict(batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000, beta2=0.99,
                 weight_decay=0.1, eval_interval=250, eval_steps=20),
    # reaches nanoGPT baby's val loss (1.886) in a third of its wall time and ends below it by >10% (same batch and
    # context as baby: 12 x 64 measured faster to the target than 16 x 128; docs/benchmarks.md)
    "speedrun": dict(batch_size=12, lr=4e-3, min_lr=4e-4, warmup_steps=30, max_steps=1500, beta2=0.99,
                     weight_decay=0.0, eval_interval=100, eval_steps=20, optimizer="muon", muon_lr=0.03,
                     compile="auto"),
    "gpt2": dict(batch_size=8, grad_accum=4, lr=6e-4, min_lr=6e-5, warmup_steps=200, max_steps=5000,
                 eval_interval=250, eval_steps=20),
}
for _name in ("gpt2-medium", "gpt2-large", "gpt2-xl"):
    TRAIN_PRESETS[_name] = dict(TRAIN_PRESETS["gpt2"], batch_size=4, grad_accum=8, lr=3e-4, min_lr=3e-5)


def train_config_for(preset: str, **overrides: Any) -> "TrainConfig":
    """TrainConfig with the preset's defaults and `overrides` (None values ignored) applied."""
    values = dict(TRAIN_PRESETS.get(preset, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


@dataclass
class TrainConfig:
    """Settings of the one training loop. Defaults suit the `mini` preset on a CPU."""

    batch_size: int = option(16, "sequences per micro-batch", at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", at_least=1)
    lr: float = option(1e-3, "peak learning rate", above=0)
    min_lr: float | None = option(None, "learning rate at the end of the cosine decay (default lr/10)",
                                  at_least=0)
    warmup_steps: int = option(100, "linear warmup steps", at_least=0)
    max_steps: int = option(2000, "optimizer steps of the whole schedule", at_least=1)
    weight_decay: float = option(0.1, "AdamW weight decay on weight matrices", at_least=0)
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", at_least=0)
    eval_interval: int = option(200, "evaluate on validation data every N steps (0 = never)", at_least=0)
    eval_steps: int = option(20, "validation batches per evaluation", at_least=0)
    log_interval: int = option(10, "write a metrics.jsonl row every N steps", at_least=1)
    checkpoint_interval: int = option(0, "also checkpoint every N steps (checkpoints are written at each "
                                         "evaluation)", at_least=0)
    stop_at: int | None = option(None, "end this invocation after step K with a checkpoint; the schedule still "
                                       "follows --max-steps", at_least=1)
    max_minutes: float | None = option(None, "stop with a checkpoint after this many minutes", above=0)
    precision: str = option("auto", "bf16 autocast or fp32; auto: the faster on this machine, measured "
                                    "(ownllm.probe)", choices=["auto", "bf16", "fp32"])
    compile: bool | str = option(False, "torch.compile the model; auto: when a measurement says it pays over the "
                                        "run", nargs="?", const="on", choices=["on", "off", "auto"])
    optimizer: str = option("adamw", "AdamW, or Muon on the hidden matrices with AdamW on embeddings, head, gains "
                                     "and biases (ownllm.optim)", choices=["adamw", "muon"])
    muon_lr: float = option(0.02, "with --optimizer muon: Muon's peak learning rate (AdamW keeps --lr)", above=0)
    muon_momentum: float = option(0.95, "with --optimizer muon: Muon's momentum")
    seed: int = option(1337, "random seed (model init, batches, dropout)")
    strategy: str = option("auto", "under torchrun: DDP (auto) or FSDP; --batch-size stays the global batch",
                           group=SCALE_GROUP, choices=["auto", "ddp", "fsdp"])
    # pretraining only (ownllm.options.PretrainOptions shows these two flags)
    eval_tasks: str = option("", "benchmarks scored at each evaluation, e.g. hellaswag,arc_easy "
                                 "(accuracy into metrics.jsonl and loss.png; docs/evaluation.md)")
    eval_limit: int = option(200, "items per benchmark at each evaluation (default 200)", at_least=1)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise OwnLLMError(f"--precision must be auto, bf16 or fp32, not {self.precision!r}")
        self.compile = {"on": True, "off": False}.get(self.compile, self.compile)  # the CLI's spelling
        if self.compile not in (True, False, "auto"):
            raise OwnLLMError(f"--compile must be on, off or auto, not {self.compile!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise OwnLLMError(f"--optimizer must be adamw or muon, not {self.optimizer!r}")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise OwnLLMError("--muon-lr must be positive and --muon-momentum in [0, 1)")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise OwnLLMError(f"--strategy must be auto, ddp or fsdp, not {self.strategy!r}")
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise OwnLLMError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise OwnLLMError("--lr must be positive")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.checkpoint_interval < 0:
            raise OwnLLMError("--warmup-steps, --eval-interval and --checkpoint-interval must not be negative")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SpeedChoice:
    """What --precision and --compile resolved to for a run (ownllm.probe.decide_speed), what was asked, why (one
    line for the user) and the step times it was decided from (ms)."""

    precision: str
    compile: bool
    reason: str
    step_ms: dict[str, float] = field(default_factory=dict)
    asked: dict[str, Any] = field(default_factory=dict)  # {"precision": ..., "compile": ...} as given

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpeedChoice":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
