"""A GGUF tensor's quantized blocks as integers and scales (`ownllm.quantize.GroupQuantized`), without float32.

    blocks = group_quantized(tensor)     # a gguf ReaderTensor of type Q8_0, Q4_0, Q4_1 or Q4_K; None for others

llama.cpp stores a matrix row by row in blocks of 32 (or 256) values, each block with its own scale:
- Q8_0 (34 bytes / 32 values): fp16 scale d, 32 int8: w = d * q.
- Q4_0 (18 / 32): fp16 d, 16 bytes of nibbles (low nibbles the first 16 values, high ones the next 16): w = d * (q - 8).
- Q4_1 (20 / 32): fp16 d and m, the same nibbles: w = d * q + m.
- Q4_K (144 / 256): fp16 d and dmin, 8 sub-blocks of 32 with 6-bit scales sc and mins mn packed in 12 bytes, 128
  bytes of nibbles (64 values per 32 bytes: low nibbles first): w = d * sc * q - dmin * mn.
Each becomes a scale (and offset) per group of 32 columns, the layout of ownllm's int8/int4 layers, exactly (a
float32 scale and offset per group; the layers round them to bfloat16). Nothing here reads the whole file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ownllm.quantize import GroupQuantized

KERNEL_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")


def group_quantized(tensor: Any) -> GroupQuantized | None:
    """The tensor's blocks as integers and per-32-column scales, or None for a type without an int kernel."""
    kind = tensor.tensor_type.name
    if kind not in KERNEL_TYPES:
        return None
    cols, rows = int(tensor.shape[0]), int(np.prod([int(d) for d in tensor.shape[1:]]))
    raw = np.ascontiguousarray(np.asarray(tensor.data).view(np.uint8)).reshape(rows, -1)
    if kind == "Q8_0":
        blocks = raw.reshape(rows, cols // 32, 34)
        scales = _halves(blocks[..., 0:2])
        values = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return GroupQuantized(torch.from_numpy(values), torch.from_numpy(scales), None, 8)
    if kind == "Q4_K":
        return _q4_k(raw, rows, cols)
    width = 18 if kind == "Q4_0" else 20
    blocks = raw.reshape(rows, cols // 32, width)
    scales = _halves(blocks[..., 0:2])
    offsets = -8 * scales if kind == "Q4_0" else _halves(blocks[..., 2:4])
    values = _nibbles(blocks[..., width - 16:]).reshape(rows, cols)
    return GroupQuantized(torch.from_numpy(values), torch.from_numpy(scales), torch.from_numpy(offsets), 4)


def _halves(pairs: np.ndarray) -> np.ndarray:
    """fp16 numbers stored as byte pairs [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> 2n values: the n low nibbles, then the n high ones."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _q4_k(raw: np.ndarray, rows: int, cols: int) -> GroupQuantized:
    blocks = raw.reshape(rows, cols // 256, 144)
    d, dmin = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])
    sc, mn = _k_scales(blocks[..., 4:16])
    scales = d[..., None] * sc  # [rows, blocks, 8]
    offsets = -dmin[..., None] * mn
    packed = blocks[..., 16:].reshape(rows, cols // 256, 4, 32)  # 4 chunks of 32 bytes = 64 values each
    values = _nibbles(packed).reshape(rows, cols)
    return GroupQuantized(torch.from_numpy(values), torch.from_numpy(scales.reshape(rows, -1).astype(np.float32)),
                          torch.from_numpy(offsets.reshape(rows, -1).astype(np.float32)), 4)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a K-quant super-block, from its 12 bytes (llama.cpp's get_scale_min_k4)."""
    packed = packed.astype(np.uint16)
    low, high, tail = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 63, (tail & 15) | ((low >> 6) << 4)], axis=-1)
    mn = np.concatenate([high & 63, (tail >> 4) | ((high >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)
