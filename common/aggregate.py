"""Streaming weighted aggregation of named tensors (ALGORITHM.md section 5).

Aggregation is linear, so each update is folded in as it arrives and memory is one running
sum, whatever the number of clients. A tensor a client did not send counts as zero: with
FedKRSO, a seed it never drew contributes nothing to that seed's accumulator.
"""

from __future__ import annotations

import torch


class StreamingAggregator:
    """Running ``sum_n w_n x_n`` and ``sum_n w_n``; ``result()`` is the weighted mean."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: dict[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, t in tensors.items():
            t = t.detach().to("cpu", torch.float32)
            if name in self.sums:
                self.sums[name].add_(t, alpha=weight)
            else:
                self.sums[name] = t.mul(weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("no update was aggregated")
        return {name: s / self.total_weight for name, s in sorted(self.sums.items())}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())
