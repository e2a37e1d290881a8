"""Faster CPU inference by keeping weights in fewer bits: weight-only `int8` / `int4`, or `bf16`.

    from ownllm.quantize import quantize_model
    model = quantize_model(run.model, "int4")     # for generation, chat, serving and evaluation; not for training
    run = load_run("runs/my-model", quantize="int8")   # the same at load time (ownllm.runs)

Decoding one token reads every weight once, so at batch 1 it is bound by memory bandwidth: int8 weights are a
quarter of fp32's bytes, int4 an eighth. Only the weights are quantized; activations stay floating point:
- `int8`: every linear layer (attention, MLP, the LM head) keeps int8 weights with one scale per output channel
  and multiplies with PyTorch's weight-only kernel `aten._weight_int8pack_mm`.
- `int4`: 4-bit weights with a scale and an offset per group of 32 input columns (llama.cpp's Q4_1 layout, so a
  GGUF's Q4_0/Q4_1/Q4_K blocks become such a layer without rounding again), packed for
  `aten._weight_int4pack_mm_for_cpu`.
  A layer the int4 kernel cannot take (outputs not a multiple of 16, inputs not of 32) gets int8.
- the token embedding of an int8/int4 model keeps int8 rows (one scale per row); a lookup reads one row.

Both kernels are fast on a CPU only with bfloat16 inputs (with float32 inputs PyTorch 2.13 runs a slow generic
loop, 10-30x slower: docs/benchmarks.md), so a quantized layer rounds its input to bfloat16 and returns its output
in the input's dtype; the residual stream, norms, attention and the KV cache stay float32. The cost in answers is
measured (teacher-forced top-1 agreement with fp32, perplexity) by bench/quantize_quality.py. `bf16` casts the whole
model to bfloat16. `auto` (the default) is `none` except for a GGUF file, whose quantized blocks stay quantized
(ownllm.runs). The old `torch.ao` dynamic int8 (activations quantized too) is gone: it changed greedy answers from
the first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ownllm.errors import OwnLLMError

QUANTIZE_MODES = ("auto", "none", "bf16", "int8", "int4")
INT4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16  # the input dtype both weight-only kernels are fast with on a CPU


@dataclass
class GroupQuantized:
    """A [rows, cols] matrix as integers with a scale (and offset) per group of `group` columns of a row:
    `w = values * scale + offset` (no offset: symmetric). `values` int8 (-127..127) or uint8 (0..15 for 4 bits)."""

    values: Tensor
    scales: Tensor  # float32 [rows, cols // group]
    offsets: Tensor | None = None
    bits: int = 8

    @property
    def group(self) -> int:
        return self.values.shape[1] // self.scales.shape[1]

    def dequantize(self) -> Tensor:
        rows, cols = self.values.shape
        grouped = self.values.float().view(rows, -1, self.group) * self.scales[..., None]
        if self.offsets is not None:
            grouped = grouped + self.offsets[..., None]
        return grouped.view(rows, cols)

    def requantized(self, quantize: Callable[[Tensor], GroupQuantized], rows: int = 4096) -> GroupQuantized:
        """The matrix quantized again by `quantize` (`quantize_int8`, `quantize_int4`), dequantized `rows` rows at a
        time (never all float32)."""
        parts = [quantize(self.select_rows(slice(start, start + rows)).dequantize())
                 for start in range(0, self.values.shape[0], rows)]
        offsets = None if parts[0].offsets is None else torch.cat([p.offsets for p in parts])
        return GroupQuantized(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]), offsets,
                              parts[0].bits)

    def select_rows(self, index: Tensor | slice) -> GroupQuantized:
        """The same matrix with its rows reordered or sliced (`index` as in `tensor[index]`)."""
        return GroupQuantized(self.values[index], self.scales[index],
                              None if self.offsets is None else self.offsets[index], self.bits)


def quantize_int8(weight: Tensor) -> GroupQuantized:
    """Symmetric int8 with one scale per row (per output channel of a linear layer)."""
    weight = weight.detach().float()
    scales = _kernel_exact((weight.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12))
    values = torch.round(weight / scales).clamp(-127, 127).to(torch.int8)
    return GroupQuantized(values, scales, None, 8)


def quantize_int4(weight: Tensor, group: int = INT4_GROUP) -> GroupQuantized:
    """4-bit values 0..15 with a scale and an offset (the minimum) per group of `group` columns (min-max)."""
    rows, cols = weight.shape
    grouped = weight.detach().float().reshape(rows, cols // group, group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scales = _kernel_exact(((high - low) / 15).clamp_min(1e-12))
    offsets = _kernel_exact(low + 8 * scales) - 8 * scales  # the kernel's zero point, offset + 8 * scale, exact
    values = torch.round((grouped - offsets[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return GroupQuantized(values.view(rows, cols), scales, offsets, 4)


def _kernel_exact(values: Tensor) -> Tensor:
    """float32 values the kernels' bfloat16 scales hold exactly (so `dequantize` gives the weights they use)."""
    return values.to(KERNEL_DTYPE).float()


def int4_fits(rows: int, cols: int, group: int = INT4_GROUP) -> bool:
    """Whether PyTorch's CPU int4 kernel takes a [rows, cols] weight (rows % 16, cols % group, its group sizes)."""
    return rows % 16 == 0 and cols % group == 0 and group in (32, 64, 128, 256)


class QuantizedLinear(nn.Module):
    """A linear layer with weight-only int8 or int4 weights (see the module docstring); `cap` soft-caps logits."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, cap: float | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.cap = in_features, out_features, cap
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
        y = self.matmul(flat).view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if self.cap is None else self.cap * torch.tanh(y / self.cap)


class Int8Linear(QuantizedLinear):
    """int8 weights [out, in] with one scale per output channel (`aten._weight_int8pack_mm`)."""

    def __init__(self, weight: GroupQuantized, bias: Tensor | None = None, cap: float | None = None) -> None:
        if weight.bits != 8 or weight.offsets is not None or weight.scales.shape[1] != 1:
            weight = weight.requantized(quantize_int8)  # other blocks: one more rounding
        super().__init__(weight.values.shape[1], weight.values.shape[0], bias, cap)
        self.register_buffer("weight", weight.values.contiguous())
        self.register_buffer("scales", weight.scales.view(-1).to(KERNEL_DTYPE))

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)


class Int4Linear(QuantizedLinear):
    """4-bit weights packed for `aten._weight_int4pack_mm_for_cpu`, a scale and offset per group of columns."""

    def __init__(self, weight: GroupQuantized, bias: Tensor | None = None, cap: float | None = None) -> None:
        rows, cols = weight.values.shape
        if weight.bits != 4:
            raise ValueError("Int4Linear takes 4-bit values")
        super().__init__(cols, rows, bias, cap)
        self.group = weight.group
        # Packed 4096 rows at a time (the layout is row by row): the kernel wants int32 input, 4 bytes a weight.
        self.register_buffer("weight", torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            chunk.to(torch.int32).contiguous(), 1) for chunk in weight.values.split(4096)]))
        offsets = weight.offsets if weight.offsets is not None else torch.zeros_like(weight.scales)
        # The kernel computes (q - 8) * scale + zero, per group: zero = offset + 8 * scale.
        zeros = offsets + 8 * weight.scales
        self.register_buffer("scale_zeros", torch.stack([weight.scales.t(), zeros.t()], dim=-1)
                             .to(KERNEL_DTYPE).contiguous())

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group, self.scale_zeros)


def quantized_linear(weight: Tensor | GroupQuantized, bias: Tensor | None, mode: str,
                     cap: float | None = None) -> QuantizedLinear:
    """The int8 or int4 (`mode`) layer for a float weight [out, in] or already quantized blocks: 4-bit blocks the
    int4 kernel takes stay as they are, 8-bit blocks become int8 (int4 under `int4`: PyTorch's int4 kernel is the
    faster one), and anything else is quantized to `mode`."""
    if isinstance(weight, GroupQuantized):
        rows, cols = weight.values.shape
        if weight.bits == 4 and int4_fits(rows, cols, weight.group):
            return Int4Linear(weight, bias, cap)
        if mode != "int4" or not int4_fits(rows, cols):
            return Int8Linear(weight, bias, cap)
        return Int4Linear(weight.requantized(quantize_int4), bias, cap)
    rows, cols = weight.shape
    if mode == "int4" and int4_fits(rows, cols):
        return Int4Linear(quantize_int4(weight), bias, cap)
    return Int8Linear(quantize_int8(weight), bias, cap)


class QuantizedEmbedding(nn.Module):
    """An embedding table kept quantized: a lookup dequantizes only the rows it reads (float32 out)."""

    def __init__(self, table: GroupQuantized) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.values.shape
        self.group = table.group
        self.register_buffer("weight", table.values.contiguous())  # `weight.device` is where the model lives
        self.register_buffer("scales", table.scales.float().contiguous())
        self.register_buffer("offsets", None if table.offsets is None else table.offsets.float().contiguous())

    def table(self) -> GroupQuantized:
        """The quantized rows (what a tied LM head is made from)."""
        return GroupQuantized(self.weight, self.scales, self.offsets, 4 if self.weight.dtype == torch.uint8 else 8)

    def forward(self, ids: Tensor) -> Tensor:
        values = self.weight[ids].float().unflatten(-1, (-1, self.group))
        rows = values * self.scales[ids][..., None]
        if self.offsets is not None:
            rows = rows + self.offsets[ids][..., None]
        return rows.flatten(-2)


def check_quantize_mode(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise OwnLLMError(f"unknown --quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    return mode


class RefinedHead(nn.Module):
    """A quantized LM head whose best `k` logits per position are recomputed in float32: the kernels return
    bfloat16, whose steps (0.125 at a logit of 20) would reorder close candidates and change greedy answers. The
    `fast` layer ranks every token; the top `k` are then the dot products of the float32 hidden state with their
    int8 rows (`rows`: the tied embedding's table, or the head's own), so the choice among them is the int8 head's
    in float32."""

    def __init__(self, fast: QuantizedLinear, rows: QuantizedEmbedding, k: int = 16) -> None:
        super().__init__()
        self.fast, self.rows, self.k = fast, rows, k
        self.cap, fast.cap = fast.cap, None
        self.in_features, self.out_features = fast.in_features, fast.out_features

    def forward(self, x: Tensor) -> Tensor:
        logits = self.fast(x)
        flat, hidden = logits.view(-1, self.out_features), x.reshape(-1, self.in_features).float()
        if flat.shape[0] <= 256:  # no loop over a count of rows: a compiled decode step keeps the count symbolic
            self._refine(flat, hidden)
        else:
            for start in range(0, flat.shape[0], 256):  # a slice of positions at a time: [256, k, dim] rows
                self._refine(flat[start: start + 256], hidden[start: start + 256])
        return logits if self.cap is None else self.cap * torch.tanh(logits / self.cap)

    def _refine(self, logits: Tensor, hidden: Tensor) -> None:
        """Recompute the top `k` of `logits` [positions, vocab] from `hidden` [positions, dim], in place."""
        top = logits.topk(min(self.k, self.out_features), dim=-1).indices
        exact = (self.rows(top) @ hidden[:, :, None]).squeeze(-1)
        if self.fast.bias is not None:
            exact = exact + self.fast.bias[top]
        logits.scatter_(-1, top, exact.to(logits.dtype))


def refined_head(weight: Tensor | GroupQuantized, bias: Tensor | None, mode: str, cap: float | None = None,
                 rows: QuantizedEmbedding | None = None) -> RefinedHead:
    """The LM head in `mode` with its top logits recomputed from int8 `rows` (default: its own, quantized)."""
    if rows is None:
        rows = QuantizedEmbedding(weight if isinstance(weight, GroupQuantized) else quantize_int8(weight))
    table = rows.table()
    fast = quantized_linear(table if mode == "int8" and table.bits == 8 and table.group == table.values.shape[1]
                            else weight, bias, mode, cap)
    return RefinedHead(fast, rows)


def quantize_model(model: nn.Module, mode: str, head: bool = True) -> nn.Module:
    """The model with its weights in `mode` (`none` and `auto` return it unchanged), on the CPU for int8/int4.
    `head=False` keeps the LM head in float32 (bench/quantize_quality.py measures what quantizing it costs).
    Layers already quantized (a GGUF's blocks) stay as they are."""
    check_quantize_mode(mode)
    if mode in ("none", "auto"):
        return model
    model.eval()
    if mode == "bf16":
        return model.to(torch.bfloat16)
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise OwnLLMError(f"--quantize {mode} runs on the CPU; the model is on {device} (use --device cpu, or bf16)")
    with torch.no_grad():
        tied = None
        embedding = getattr(model, "tok_emb", None)
        if isinstance(embedding, nn.Embedding):
            tied = embedding.weight
            model.tok_emb = QuantizedEmbedding(quantize_int8(embedding.weight))
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear) or (name == "lm_head" and not head):
                    continue
                cap = getattr(child, "cap", None)
                if name == "lm_head":  # a head tied to the embedding shares its int8 rows
                    rows = model.tok_emb if child.weight is tied else None
                    setattr(parent, name, refined_head(child.weight, child.bias, mode, cap, rows))
                else:
                    setattr(parent, name, quantized_linear(child.weight, child.bias, mode, cap))
    return model


def inference_weight(name: str, value: Tensor | GroupQuantized, stored_quantized: bool,
                     mode: str) -> Tensor | nn.Module:
    """What a model built for inference holds for its weight `name` read from a file (ownllm.runs, GGUF files):
    the float tensor, or a quantized layer (`*.weight` of a linear layer) or embedding (`tok_emb.weight`). Blocks
    already quantized stay so (`value` a GroupQuantized); a matrix the file stored quantized in blocks without a
    kernel becomes int8 under `auto`; float matrices are quantized under `int8` / `int4` only."""
    quantize = isinstance(value, GroupQuantized) or stored_quantized or mode in ("int8", "int4")
    if name == "pos_emb.weight" or not quantize:
        return value
    if name == "tok_emb.weight":
        return QuantizedEmbedding(value if isinstance(value, GroupQuantized) else quantize_int8(value))
    if isinstance(value, Tensor) and value.dim() != 2:
        return value
    mode = mode if mode in ("int8", "int4") else "int8"
    return refined_head(value, None, mode) if name == "lm_head.weight" else quantized_linear(value, None, mode)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations and KV caches should use for `model` (float32 for int8/int4 models)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


__all__ = ["QUANTIZE_MODES", "GroupQuantized", "Int4Linear", "Int8Linear", "QuantizedEmbedding", "QuantizedLinear",
           "RefinedHead", "refined_head",
           "check_quantize_mode", "inference_weight", "model_dtype", "quantize_int4", "quantize_int8", "quantize_model",
           "quantized_linear"]
