"""The one place where tensors become protobuf messages and back.

Named tensors travel as ``TensorBatch`` messages of at most ``max_chunk_bytes`` of tensor
data each: small tensors share a message, a large one is split into consecutive chunks. So no
message nears gRPC's 4 MB receive limit and no limit is raised anywhere. The assembler on
the receiving side checks every chunk against an expected spec (names, shapes, dtype, byte
offsets, total size) and raises ``WireError`` with a precise message on the first violation.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator

import torch

from fedkrso.v1 import tensor_pb2

from .logs import bounded
from .subspace import fingerprint
from .tensors import DTYPES, MAX_DIMS, CodecError, decode, element_size, encode

class WireError(ValueError):
    """A tensor stream that does not match what was expected."""


def tensor_batches(
    tensors: dict[str, torch.Tensor], dtype: str | None, max_chunk_bytes: int
) -> Iterator[tensor_pb2.TensorBatch]:
    """Pack ``tensors`` (cast to ``dtype``) into batches of <= ``max_chunk_bytes`` data bytes."""
    batch = tensor_pb2.TensorBatch()
    room = max_chunk_bytes
    for name in sorted(tensors):
        enc = encode(tensors[name], dtype)
        offset = 0
        while True:
            piece = enc.data[offset : offset + room]
            batch.chunks.append(
                tensor_pb2.TensorChunk(
                    name=name,
                    dtype=enc.dtype if offset == 0 else "",
                    shape=list(enc.shape) if offset == 0 else [],
                    offset=offset,
                    data=piece,
                )
            )
            offset += len(piece)
            room -= len(piece)
            if room <= 0:
                yield batch
                batch, room = tensor_pb2.TensorBatch(), max_chunk_bytes
            if offset >= len(enc.data):
                break
    if batch.chunks:
        yield batch


def update_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over an update's tensors (names, dtypes, shapes, bytes): its identity, which
    makes a resubmission idempotent. Client and server compute it the same way."""
    return fingerprint(sorted(tensors.items()))


class TensorAssembler:
    """Rebuilds named tensors from ``TensorBatch`` messages, validating as it goes.

    ``spec`` (name -> shape) restricts names and shapes; ``dtype`` fixes the dtype;
    ``max_bytes`` caps the total data accepted (a stream that would exceed it is refused
    before it is buffered)."""

    def __init__(
        self,
        spec: dict[str, tuple[int, ...]] | None = None,
        dtype: str | None = None,
        max_bytes: int = 1 << 40,
    ):
        self.spec = spec
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.payload_bytes = 0
        self._meta: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self._parts: dict[str, bytearray] = {}

    def add(self, batch: tensor_pb2.TensorBatch) -> None:
        """Take in one batch of chunks (each checked against the announced specs and bounds)."""
        for chunk in batch.chunks:
            self._add_chunk(chunk)

    def _add_chunk(self, chunk: tensor_pb2.TensorChunk) -> None:
        # each field read once: protobuf builds a new object (for ``data`` a copy) per access;
        # names and dtypes come from the other side: bounded in messages
        name, offset, data = chunk.name, chunk.offset, chunk.data
        if offset == 0:
            if name in self._meta:
                raise WireError(f"tensor {bounded(name)} sent twice")
            if len(chunk.shape) > MAX_DIMS:
                raise WireError(f"tensor {bounded(name)} has {len(chunk.shape)} dimensions (at most {MAX_DIMS})")
            shape = tuple(int(s) for s in chunk.shape)
            if self.spec is not None:
                if name not in self.spec:
                    raise WireError(f"unexpected tensor {bounded(name)}")
                if shape != tuple(self.spec[name]):
                    raise WireError(f"tensor {bounded(name)} has shape {list(shape)}, expected "
                                    f"{list(self.spec[name])}")
            dtype = chunk.dtype
            if self.dtype is not None and dtype != self.dtype:
                raise WireError(f"tensor {bounded(name)} has dtype {bounded(dtype, 20)}, expected {self.dtype!r}")
            try:
                itemsize = element_size(dtype)
            except KeyError:
                raise WireError(f"tensor {bounded(name)} has unknown dtype {bounded(dtype, 20)}") from None
            if any(s < 0 for s in shape):
                raise WireError(f"tensor {bounded(name)} has a negative dimension")
            numel = 1
            for s in shape:
                numel *= s
            self._meta[name] = (dtype, shape, numel * itemsize)
            self._parts[name] = bytearray()
        elif name not in self._meta:
            raise WireError(f"chunk of {bounded(name)} at offset {offset} before its first chunk")
        size = self._meta[name][2]
        buf = self._parts[name]
        if offset != len(buf):
            raise WireError(f"tensor {bounded(name)}: chunk offset {offset}, expected {len(buf)}")
        if len(buf) + len(data) > size:
            raise WireError(f"tensor {bounded(name)}: more bytes than its shape holds ({size})")
        if self.payload_bytes + len(data) > self.max_bytes:
            raise WireError(f"stream exceeds the {self.max_bytes}-byte limit")
        buf += data
        self.payload_bytes += len(data)

    def finish(self, required: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The decoded tensors; raises if any is truncated or a required name is missing."""
        out = {}
        for name, (dtype, shape, size) in self._meta.items():
            if len(self._parts[name]) != size:
                raise WireError(f"tensor {name!r} truncated: {len(self._parts[name])} of {size} bytes")
            try:
                out[name] = decode(dtype, shape, self._parts[name])  # the buffer becomes the tensor
            except CodecError as err:
                raise WireError(f"tensor {name!r}: {err}") from None
        missing = sorted((required or set()) - set(out))
        if missing:
            raise WireError(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return out

    def digest(self) -> str:
        """``update_digest`` of the tensors received, hashed from the bytes as they arrived
        (little-endian, as ``fingerprint`` hashes them on a little-endian host) instead of
        from the decoded tensors: the same SHA-256 with no tensor operation per tensor."""
        if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in CI
            return update_digest(self.finish())
        h = hashlib.sha256()
        for name in sorted(self._meta):
            dtype, shape, _ = self._meta[name]
            h.update(f"{name}|{shape}|{DTYPES[dtype]}|".encode())
            h.update(self._parts[name])
        return h.hexdigest()
