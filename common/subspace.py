"""Random subspaces rebuilt from integer seeds (docs/algorithm.md section 2).

Every party must draw the same P for the same (seed, matrix name, r, d_n), on any machine and
any device. So P is always drawn in float32 on a CPU ``torch.Generator`` seeded from a stable
hash, never from the global RNG and never on an accelerator (CPU and CUDA generators give
different numbers for the same seed), and only then moved to the working device and dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch

SEED_BITS = 63


def stable_seed(*parts: object) -> int:
    """A 63-bit integer from the first 8 bytes of SHA-256 of ``":".join(parts)``."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)


def cpu_generator(*parts: object) -> torch.Generator:
    """An explicit CPU generator seeded from ``stable_seed(*parts)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(*parts))
    return gen


def round_seeds(run_seed: int, round_id: int, k: int) -> list[int]:
    """The K fresh 63-bit seeds of round ``round_id``, reproducible from the run's seed."""
    return [stable_seed("round-seed", run_seed, round_id, i) for i in range(k)]


def subspace(
    seed: int,
    name: str,
    r: int,
    d_n: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """P (r x d_n) = randn / sqrt(r) for matrix ``name`` under ``seed``; E[P^T P] = I."""
    gen = cpu_generator(seed, name)
    p = torch.randn(r, d_n, generator=gen, dtype=torch.float32) / math.sqrt(r)
    return p.to(device=device, dtype=dtype)


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 hex of names, shapes, dtypes and raw bytes of (name, tensor) pairs, in order.

    Used for subspaces (to prove a client rebuilt the same P) and for model state (to prove a
    client rebuilt the same weights as the server)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place: no copy of the bytes
    return h.hexdigest()


def subspace_fingerprint(seeds: list[int], shapes: dict[str, tuple[int, int]], r: int) -> str:
    """Fingerprint of the subspaces of ``seeds`` for matrices ``{name: (d_m, d_n)}``.

    Hashes only the first row of each P: enough to catch a different seed, name, r or RNG,
    at a small fraction of the cost of drawing every P again."""
    pairs = []
    for seed in seeds:
        for name in sorted(shapes):
            pairs.append((f"{seed}:{name}", subspace(seed, name, r, shapes[name][1])[:1]))
    return fingerprint(pairs)
