"""The GPT: one model class for GPT-2 and Llama-style architectures, decoding through a KV cache (ownllm.kvcache).

    model = GPT(model_config_from_preset("mini"))
    logits = model(ids)                        # ids: LongTensor [batch, time] -> [batch, time, vocab]
    cache = model.new_cache(batch_size=1, max_len=256)
    logits = model(prompt_ids, cache=cache)    # prefill; then feed one token at a time with the same cache

Which flavour a model is comes from `ModelConfig` fields (`norm`, `mlp`, `position`, `n_kv_head`, ...), never from
a subclass; so do the speedrun options (`mlp="relu2"`, `qk_norm`, `zero_init_proj`, `logit_softcap`) and the open
models' (docs/open-models.md): Qwen3's q/k norms with a gain (`qk_norm_gain`), RoPE scaling (`rope_scaling`,
ownllm.rope), SmolLM3's layers without RoPE (`nope_layers`), and Gemma 3's GeGLU (`mlp="geglu"`), norms on the
attention and MLP outputs (`sandwich_norm`), (1 + weight) gains (`norm_offset`), embeddings times sqrt(d)
(`scale_embeddings`), `query_pre_attn_scalar`, and local layers (`local_layers`) that see the last `sliding_window`
positions and turn by their own RoPE base (`local_rope_theta`). Attention goes through
`F.scaled_dot_product_attention`. Batches of prompts with different lengths are left-padded by the caller, who
passes `key_valid` (False at padding) and per-row `positions`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ownllm.config import ModelConfig
from ownllm.errors import OwnLLMError
from ownllm.kvcache import Cache, KVCache
from ownllm.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): x / rms(x) * (offset + weight), computed in float32. Gemma's offset is 1 (its
    weights are stored as the gain minus one); the weight starts where the gain is 1."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        gain = self.weight.float() + self.offset if self.offset else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), gain, self.eps).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.n_embd, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(dim or config.n_embd, eps=config.norm_eps, bias=config.bias)


def causal_mask(time: int, window: int, device: torch.device) -> Tensor:
    """Boolean [1, 1, time, time]: query i sees keys i - window < j <= i (a sliding window, no cache)."""
    pos = torch.arange(time, device=device)
    return ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)).view(1, 1, time, time)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.use_qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        if config.qk_norm_gain:  # a learned gain per dimension, shared by the heads (Qwen3, Gemma 3)
            self.q_norm = make_norm(config, self.head_size)
            self.k_norm = make_norm(config, self.head_size)
        scalar = config.query_pre_attn_scalar  # None: SDPA's own 1/sqrt(head_size)
        self.scale = scalar ** -0.5 if scalar else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: Cache | None, layer: int) -> Tensor:
        batch, time, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_size, self.n_kv_head * self.head_size, self.n_kv_head * self.head_size], dim=-1)
        q = q.view(batch, time, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(batch, time, self.n_kv_head, self.head_size).transpose(1, 2)
        v = v.view(batch, time, self.n_kv_head, self.head_size).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm:  # unit RMS per head: attention logits stay bounded whatever the weights grow to
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attend = getattr(cache, "attend", None)  # the compiled decode step attends without writing the cache
        if attend is not None:
            y = attend(layer, q, k, v, mask, self.scale)
        else:
            if cache is not None:
                k, v = cache.store(layer, k, v)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and time > 1, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(batch, time, self.n_head * self.head_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_size
        gated = self.kind in ("swiglu", "geglu")
        self.fc = nn.Linear(config.n_embd, 2 * hidden if gated else hidden, bias=config.use_mlp_bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.use_mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        if self.kind == "geglu":  # Gemma: the gate through GELU (tanh approximation)
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.gelu(gate, approximate="tanh") * up)
        if self.kind == "relu2":
            return self.proj(F.relu(h).square())
        return self.proj(F.gelu(h, approximate="tanh"))


class SoftCappedLinear(nn.Linear):
    """The LM head with a logit soft-cap: cap * tanh(logits / cap) keeps every logit within (-cap, cap)."""

    def __init__(self, in_features: int, out_features: int, cap: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        return self.cap * torch.tanh(logits / self.cap)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); with `sandwich_norm` (Gemma) the attention and
    MLP outputs pass through their own norms (`post_attn_norm`, `post_mlp_norm`) before they are added."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        if config.sandwich_norm:
            self.post_attn_norm = make_norm(config)
            self.post_mlp_norm = make_norm(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: Cache | None, layer: int) -> Tensor:
        h = self.attn(self.norm1(x), rope, mask, cache, layer)
        x = x + self.dropout(self.post_attn_norm(h) if hasattr(self, "post_attn_norm") else h)
        h = self.mlp(self.norm2(x))
        return x + self.dropout(self.post_mlp_norm(h) if hasattr(self, "post_mlp_norm") else h)


class GPT(nn.Module):
    """Decoder-only transformer. `forward(ids) -> logits`; `hidden_states(ids)` for heads other than the LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        if config.logit_softcap:
            self.lm_head = SoftCappedLinear(config.n_embd, config.vocab_size, config.logit_softcap)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.make_rope_tables()
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale the residual projections
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if config.zero_init_proj:  # modded-nanogpt: every block starts as the identity
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def make_rope_tables(self) -> None:
        """(Re)compute the RoPE tables, buffers rather than weights (a model built on the meta device needs them
        made): `rope_cos` / `rope_sin` with the config's scaling, and `local_rope_cos` / `local_rope_sin` for the
        local layers where they have their own base (Gemma 3)."""
        config = self.config
        if config.position != "rope":
            return
        tables = {"rope": rope_tables(config.head_size, config.block_size, config.rope_theta, config.rope_scaling)}
        if config.local_rope_theta is not None:
            tables["local_rope"] = rope_tables(config.head_size, config.block_size, config.local_rope_theta)
        for name, (cos, sin) in tables.items():
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on the model's device for up to `max_len` (default block_size) positions."""
        param = self.tok_emb.weight
        return KVCache(self.config, batch_size, min(max_len or self.config.block_size, self.config.block_size),
                       param.device, dtype or param.dtype)

    def hidden_states(self, ids: Tensor, *, cache: Cache | None = None, positions: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [batch, time, n_embd].

        With a cache, `ids` continue the cached sequence and are appended to it. `positions` [batch, time] gives
        each token's position (default: its index in the sequence); left-padded batches pass it together with
        `cache.key_valid` marking the padding.
        """
        batch, time = ids.shape
        start = cache.length if cache is not None else 0
        if start + time > self.config.block_size or (cache is not None and start + time > cache.max_len):
            limit = self.config.block_size if cache is None else min(cache.max_len, self.config.block_size)
            raise ValueError(f"sequence of {start + time} tokens is longer than the context window ({limit})")
        if positions is None:
            positions = torch.arange(start, start + time, device=ids.device).expand(batch, time)
        x = self.tok_emb(ids)
        if self.config.scale_embeddings:  # Gemma: sqrt(n_embd), rounded to the weights' dtype as transformers does
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.dropout(x)
        ropes, masks = self._layer_inputs(positions, time, cache, ids.device)
        local_layers, nope_layers = set(self.config.local_layers), set(self.config.nope_layers)
        for layer, block in enumerate(self.blocks):
            local = layer in local_layers
            rope = None if layer in nope_layers else ropes[local]
            x = block(x, rope, masks[local], cache, layer)
        if cache is not None:
            cache.advance(time)
        return self.norm(x)

    def _layer_inputs(self, positions: Tensor, time: int, cache: Cache | None,
                      device: torch.device) -> tuple[dict[bool, tuple[Tensor, Tensor] | None], dict[bool, Tensor | None]]:
        """The RoPE cos/sin and the attention mask of global (False) and local (True) layers: local layers see only
        the last `sliding_window` positions and turn by `local_rope_theta` where the config sets one."""
        config = self.config
        ropes: dict[bool, tuple[Tensor, Tensor] | None] = {False: None, True: None}
        if config.position == "rope":
            ropes[False] = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
            ropes[True] = ropes[False]
            if config.local_rope_theta is not None:
                ropes[True] = (self.local_rope_cos[positions].unsqueeze(1), self.local_rope_sin[positions].unsqueeze(1))
        masks = {False: cache.attention_mask(time, device) if cache is not None else None, True: None}
        if config.local_layers:
            window = config.sliding_window
            masks[True] = (cache.attention_mask(time, device, window=window) if cache is not None
                           else causal_mask(time, window, device))
        return ropes, masks

    def forward(self, ids: Tensor, *, cache: Cache | None = None, positions: Tensor | None = None,
                last_only: bool = False, last_index: Tensor | None = None) -> Tensor:
        """Next-token logits [batch, time, vocab] for every position of `ids` [batch, time]; with `last_only`, for
        the last position only ([batch, 1, vocab]: what decoding needs after a long prompt); with `last_index`
        [batch], for each row's own last position ([batch, 1, vocab]: right-padded prompts)."""
        hidden = self.hidden_states(ids, cache=cache, positions=positions)
        if last_index is not None:
            return self.lm_head(hidden[torch.arange(ids.shape[0], device=hidden.device), last_index].unsqueeze(1))
        return self.lm_head(hidden[:, -1:] if last_only else hidden)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied weights counted once); optionally without the embedding tables."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
        return total


POOLINGS = ("mean", "last", "weighted-mean")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise OwnLLMError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    return pooling


def pool(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """One vector per row [batch, n_embd] from right-padded hidden states [batch, time, n_embd] with `lengths` real
    tokens per row (padding is never read), in the hidden states' dtype. `last`: the last real token (what a causal
    model has read the whole text at); `mean`: the average over the real tokens; `weighted-mean` (SGPT's position
    weighting): token i of n counts i / (1+..+n), so later tokens, which have seen more of the text, weigh more."""
    batch, time = hidden.shape[:2]
    if pooling == "last":
        return hidden[torch.arange(batch, device=hidden.device), lengths - 1]
    position = torch.arange(1, time + 1, device=hidden.device, dtype=torch.float32)[None, :]
    real = (position <= lengths[:, None]).float()
    weights = real * position if pooling == "weighted-mean" else real
    weights = weights / weights.sum(dim=1, keepdim=True)
    return (hidden * weights[..., None].to(hidden.dtype)).sum(dim=1)


class GPTClassifier(GPT):
    """A classification head (`score`, as in Hugging Face's *ForSequenceClassification) on `GPT.hidden_states`:
    class logits [batch, labels] from ids [batch, time] and lengths [batch], pooled by `pool` (`last`, the
    default, reads each row's last real token: right-padded rows, padding is never read)."""

    def __init__(self, config: ModelConfig, num_labels: int, pooling: str = "last") -> None:
        super().__init__(config)
        self.pooling = check_pooling(pooling)
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    def forward(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Class logits; `lengths` counts each right-padded row's real tokens (default: all of them)."""
        hidden = self.hidden_states(ids)
        if lengths is None:
            lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        return self.score(pool(hidden, lengths.to(ids.device), self.pooling))


def flops_per_token(model: GPT, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight used in a matrix product, plus the attention
    scores (PaLM, appendix B). Position embeddings and an untied token embedding are lookups, not products."""
    config = model.config
    seq_len = seq_len or config.block_size
    weights = model.num_params()
    if model.pos_emb is not None:
        weights -= model.pos_emb.weight.numel()
    if not config.tie_embeddings:
        weights -= model.tok_emb.weight.numel()
    attention = 12 * config.n_layer * config.n_head * config.head_size * seq_len
    return 6.0 * weights + attention
