"""Typed tensor codec: dtype name, shape and raw little-endian bytes. No pickle, ever.

The wire format (``fedkrso.v1.Tensor``) and checkpoints both carry exactly these three fields,
so decoding can only ever produce a tensor of a known dtype and a checked size.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
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
    """One tensor as it travels: its wire dtype's name, its shape and its little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


ELEMENT_SIZES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def element_size(dtype: str) -> int:
    """Bytes per element of a dtype name (KeyError for an unknown one)."""
    return ELEMENT_SIZES[dtype]


def spec_numel(spec: dict[str, tuple[int, ...]]) -> int:
    """How many values tensors of ``spec`` (name -> shape) hold together."""
    return sum(math.prod(shape) for shape in spec.values())


def spec_bytes(spec: dict[str, tuple[int, ...]], dtype: str) -> int:
    """The most bytes tensors of ``spec`` can hold in ``dtype``: the one bound a stream of
    them is read under (an update on the server, a delta or snapshot on the client)."""
    return spec_numel(spec) * element_size(dtype)


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


def decode(dtype: str, shape: tuple[int, ...] | list[int], data: bytes | bytearray) -> torch.Tensor:
    """Decode and validate: known dtype, sane shape, byte length equal to numel * itemsize. A
    ``bytearray`` becomes the tensor's memory (the caller hands it over: no copy); ``bytes``,
    which is read-only, is copied."""
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
    t = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=DTYPES[dtype])
    if sys.byteorder != "little":  # pragma: no cover
        t = t.byteswap()
    return t.reshape(shape)


FLAT_BATCH = 1 << 20  # elements: small tensors are checked and summed this many at a time


def _flat_batches(tensors) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """(the tensors, all their elements as one 1-D tensor), small tensors concatenated up to
    ``FLAT_BATCH`` elements: an update of many small tensors costs a few operations instead of
    a few per tensor, and a large tensor is never copied whole."""
    def flat(group: list[torch.Tensor]) -> torch.Tensor:
        return (torch.cat([g.reshape(-1) for g in group]) if len(group) > 1 else group[0].reshape(-1)).detach()

    group: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if group and size + t.numel() > FLAT_BATCH:
            yield group, flat(group)
            group, size = [], 0
        group.append(t)
        size += t.numel()
    if group:
        yield group, flat(group)


def l2_norm(tensors) -> float:
    """L2 norm over every element of ``tensors`` (an iterable), summed in float64."""
    return math.sqrt(sum(float(flat.double().square().sum()) for _, flat in _flat_batches(tensors)))


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity; None when all are finite."""
    by_id = {id(t): name for name, t in tensors.items()}
    for group, flat in _flat_batches(tensors.values()):
        if not bool(torch.isfinite(flat).all()):
            return next(by_id[id(t)] for t in group if not bool(torch.isfinite(t).all()))
    return None


def product_norm_sq(left: torch.Tensor, right: torch.Tensor) -> float:
    """``||left @ right||_F^2`` without forming the product: ``sum((L^T L) * (R R^T))``.

    For a (d_m x q) times (q x d_n) product with small q (a low-rank weight change) this
    costs O((d_m + d_n) q^2) instead of O(d_m d_n q); float64 throughout."""
    left, right = left.detach().double(), right.detach().double()
    return float(((left.T @ left) * (right @ right.T)).sum())
