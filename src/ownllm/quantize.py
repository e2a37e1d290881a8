"""Faster CPU inference by storing weights in fewer bits: `int8` (dynamic int8 linear layers) or `bf16`.

    from ownllm.quantize import quantize_model
    model = quantize_model(run.model, "int8")     # for generation, chat and serving; not for training
    run = load_run("runs/my-model", quantize="int8")   # the same at load time (ownllm.runs)

Decoding one token reads every weight once, so it is bound by memory bandwidth: int8 weights are a quarter of the
bytes of fp32. `int8` replaces each `nn.Linear` (attention, MLP, LM head) by PyTorch's dynamically quantized linear
layer: weights int8 with one scale per output channel, activations quantized per batch on the fly, products in
int8 with int32 accumulation (fbgemm/oneDNN kernels using AVX512-VNNI or AMX-INT8 where the CPU has them).
Embeddings and norms stay fp32. `bf16` casts the whole model to bfloat16 (a gain where the CPU multiplies bf16
natively, i.e. with AMX; on other CPUs it mostly halves memory). The quality cost is measured with
`ownllm evaluate RUN --data held_out.txt --quantize int8` (perplexity) and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ownllm.errors import OwnLLMError

QUANTIZE_MODES = ("none", "bf16", "int8")


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """The model with its weights in `mode` (`none` returns it unchanged). int8 runs on the CPU only."""
    if mode not in QUANTIZE_MODES:
        raise OwnLLMError(f"unknown --quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return model
    model.eval()
    if mode == "bf16":
        return model.to(torch.bfloat16)
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise OwnLLMError(f"--quantize int8 runs on the CPU; the model is on {device} (use --device cpu, or bf16)")
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantization is marked for migration to torchao; in torch 2.5-2.13 it is the
        # CPU int8 path that ships with PyTorch itself (no extra package), and it is what we measure.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations and KV caches should use for `model` (float32 for int8 models)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
