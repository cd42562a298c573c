"""The layer math of FedTT, from small parts to the whole: a dimension split into TT factors,
the contraction of TT cores into a matrix, the TT matrix that holds the cores, the adapter
``y + U act(D y)`` built from two of them, and the forward hook that applies an adapter to its
host module's output. Nothing here knows a model or a round (``method`` does)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...subspace import cpu_generator
from .config import Config

ATTR = "tt_adapter"  # the attribute of a host module that holds its adapter
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def tt_factors(n: int, d: int) -> list[int]:
    """``n`` as ``d`` balanced factors (ascending): primes, largest first, each into the bucket
    with the smallest product. Pads with 1 where n has fewer than d prime factors."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    buckets = [1] * d
    for q in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= q
    return sorted(buckets)


def contract(cores: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The (out x in) matrix of TT ``cores``."""
    t = cores[0]
    for core in cores[1:]:
        a, o, i, _ = t.shape
        _, p, j, _ = core.shape
        t = torch.einsum("aoir,rpjs->aopijs", t, core).reshape(a, o * p, i * j, -1)
    return t.reshape(shape)


class TTMatrix(nn.Module):
    """An (out x in) matrix stored as TT cores G_k (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1."""

    def __init__(self, out_factors: list[int], in_factors: list[int], rank: int):
        super().__init__()
        d = len(out_factors)
        ranks = [1] + [rank] * (d - 1) + [1]
        self.shape = (math.prod(out_factors), math.prod(in_factors))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(ranks[k], out_factors[k], in_factors[k], ranks[k + 1]))
            for k in range(d)
        )

    @torch.no_grad()
    def init(self, variance: float, zero: int | None, seed_parts: tuple) -> None:
        """Gaussian cores whose product has ``variance`` per entry; core ``zero`` set to 0."""
        inner = math.prod(c.shape[-1] for c in list(self.cores)[:-1])
        std = (variance / inner) ** (1 / (2 * len(self.cores)))
        for k, core in enumerate(self.cores):
            g = torch.randn(core.shape, generator=cpu_generator(*seed_parts, k)) * std
            core.copy_(torch.zeros_like(g) if k == zero else g)

    def full(self) -> torch.Tensor:
        """The dense matrix the cores contract to."""
        return contract(list(self.cores), self.shape)


class TTAdapter(nn.Module):
    """``y + U act(D y)`` with D (m x h) and U (h x m) as TT matrices."""

    def __init__(self, hidden: int, cfg: Config):
        super().__init__()
        h, m = tt_factors(hidden, cfg.cores), tt_factors(cfg.bottleneck, cfg.cores)
        self.down = TTMatrix(m, h, cfg.tt_rank)
        self.up = TTMatrix(h, m, cfg.tt_rank)
        self.activation = cfg.activation

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y + U act(D y)``, with D and U contracted from their cores in ``y``'s dtype."""
        z = ACTIVATIONS[self.activation](F.linear(y, self.down.full().to(y.dtype)))
        return y + F.linear(z, self.up.full().to(y.dtype))


def adapter_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook on a host module: its output through its adapter. It looks the adapter
    up at call time, so a deepcopy of the model uses its own copy."""
    return getattr(module, ATTR)(output)
