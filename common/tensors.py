"""Typed tensor codec: dtype name, shape and raw little-endian bytes. No pickle, ever.

The wire format (``fedkrso.v1.Tensor``) and checkpoints both carry exactly these three fields,
so decoding can only ever produce a tensor of a known dtype and a checked size.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8


class CodecError(ValueError):
    """Raised for a tensor description that does not decode to exactly one valid tensor."""


@dataclass(frozen=True)
class Encoded:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def element_size(dtype: str) -> int:
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


def encode(t: torch.Tensor, dtype: str | None = None) -> Encoded:
    """Encode ``t`` (cast to ``dtype`` if given) as raw little-endian bytes."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise CodecError(f"unsupported dtype {dtype!r}; one of {sorted(DTYPES)}")
        t = t.to(DTYPES[dtype])
    if t.dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported dtype {t.dtype}")
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    data = raw.numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in CI
        data = bytes(torch.frombuffer(bytearray(data), dtype=t.dtype).byteswap().view(torch.uint8))
    return Encoded(DTYPE_NAMES[t.dtype], tuple(t.shape), data)


def decode(dtype: str, shape: tuple[int, ...] | list[int], data: bytes) -> torch.Tensor:
    """Decode and validate: known dtype, sane shape, byte length equal to numel * itemsize."""
    if dtype not in DTYPES:
        raise CodecError(f"unknown dtype {dtype!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) > MAX_DIMS or any(s < 0 for s in shape):
        raise CodecError(f"invalid shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    want = numel * element_size(dtype)
    if len(data) != want:
        raise CodecError(f"byte length {len(data)} != {want} for {dtype}{list(shape)}")
    if numel == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    t = torch.frombuffer(bytearray(data), dtype=DTYPES[dtype])
    if sys.byteorder != "little":  # pragma: no cover
        t = t.byteswap()
    return t.reshape(shape)


def l2_norm(tensors) -> float:
    """L2 norm over every element of ``tensors`` (an iterable), summed in float64."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def product_norm_sq(left: torch.Tensor, right: torch.Tensor) -> float:
    """``||left @ right||_F^2`` without forming the product: ``sum((L^T L) * (R R^T))``.

    For a (d_m x q) times (q x d_n) product with small q (a low-rank weight change) this
    costs O((d_m + d_n) q^2) instead of O(d_m d_n q); float64 throughout."""
    left, right = left.detach().double(), right.detach().double()
    return float(((left.T @ left) * (right @ right.T)).sum())
