"""Aggregation of named tensors (docs/algorithm.md section 5), plain or robust.

``StreamingAggregator`` is the default weighted mean: aggregation is linear, so each update is
folded in as it arrives and memory is one running sum, whatever the number of clients. The
sums are float64: a product of a float32 value and an integer sample count is exact there, so
the mean no longer depends on the order updates arrived in (float32 sums did, through
rounding), which keeps a run reproducible when a server restart reorders the updates.

A tensor a client did not send counts as zero: with FedKRSO, a seed it never drew contributes
nothing to that seed's accumulator.

Robust options (``server.clip_norm``, ``server.aggregation: trimmed-mean``) bound what one
client can do to the global model. Every aggregator exposes ``state()`` and ``from_state()``
so an open round's partial aggregate survives a server restart (``server/state.py``).
"""

from __future__ import annotations

import torch

from .tensors import l2_norm

Tensors = dict[str, torch.Tensor]


def clip_update(tensors: Tensors, clip_norm: float | None, norm: float | None = None) -> Tensors:
    """Scale an update whose size exceeds ``clip_norm`` down to it.

    ``norm`` is the update's size in the space the bound is stated in: the server passes
    ``method.update_norm`` (the norm of the weight change the update implies, the same space
    for every method); without it, the L2 norm over all the update's tensors. Applied before
    weighting, so one client's influence is at most ``w_n * clip_norm``."""
    if clip_norm is None:
        return tensors
    norm = l2_norm(tensors.values()) if norm is None else norm
    if norm <= clip_norm:
        return tensors
    scale = clip_norm / norm
    return {name: t.double().mul(scale) for name, t in tensors.items()}


class StreamingAggregator:
    """Running ``sum_n w_n x_n`` and ``sum_n w_n``; ``result()`` is the weighted mean (float32).

    With ``clip_norm`` each update is clipped first (``clip_update``); still O(1) updates in
    memory."""

    kind = "mean"

    def __init__(self, clip_norm: float | None = None) -> None:
        self.clip_norm = clip_norm
        self.sums: Tensors = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Tensors, weight: float, norm: float | None = None) -> None:
        """Fold one update in with ``weight``; ``norm`` is its size for clipping (``clip_update``)."""
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, t in clip_update(tensors, self.clip_norm, norm).items():
            t = t.detach().to("cpu", torch.float64)
            if name in self.sums:
                self.sums[name].add_(t, alpha=weight)
            else:
                self.sums[name] = t.mul(weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> Tensors:
        """The weighted mean of every update folded in, as float32."""
        if not self.count:
            raise ValueError("no update was aggregated")
        return {name: (s / self.total_weight).float() for name, s in sorted(self.sums.items())}

    def nbytes(self) -> int:
        """Bytes the running sums hold: the aggregator's memory, whatever the client count."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def state(self) -> tuple[Tensors, dict]:
        """(tensors, JSON-able numbers) from which ``from_state`` rebuilds this aggregator."""
        return dict(self.sums), {"kind": self.kind, "clip_norm": self.clip_norm,
                                 "total_weight": self.total_weight, "count": self.count}

    @classmethod
    def from_state(cls, tensors: Tensors, meta: dict) -> StreamingAggregator:
        """The aggregator that ``state`` described (a restarted server's open round)."""
        agg = cls(meta["clip_norm"])
        agg.sums = {name: t.to(torch.float64) for name, t in tensors.items()}
        agg.total_weight, agg.count = float(meta["total_weight"]), int(meta["count"])
        return agg


class TrimmedMeanAggregator:
    """Coordinate-wise trimmed mean: per element, drop the ``trim_fraction`` largest and
    smallest values over the round's updates and average the rest.

    Unlike the streaming mean this keeps every update of the round in memory (a per-coordinate
    order statistic cannot be folded in one at a time), and it ignores sample weights: every
    client counts once, since weighting would let a client inflate its say by claiming many
    samples. At least one value per coordinate is always kept (the median for tiny rounds)."""

    kind = "trimmed-mean"

    def __init__(self, trim_fraction: float, clip_norm: float | None = None) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction
        self.clip_norm = clip_norm
        self.updates: list[Tensors] = []

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        return len(self.updates)

    def add(self, tensors: Tensors, weight: float, norm: float | None = None) -> None:
        """Keep one update (clipped to ``clip_norm`` by ``norm``) for the coordinate-wise trimmed mean;
        ``weight`` must be positive and is otherwise unused (the trimmed mean is unweighted)."""
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        clipped = clip_update(tensors, self.clip_norm, norm)
        self.updates.append({n: t.detach().to("cpu", torch.float32).clone() for n, t in clipped.items()})

    def result(self) -> Tensors:
        """Per coordinate, the mean of the updates left after cutting the ``trim_fraction`` largest and
        smallest values (at most (n - 1) // 2 each side), as float32."""
        n = self.count
        if not n:
            raise ValueError("no update was aggregated")
        cut = min(int(self.trim_fraction * n), (n - 1) // 2)
        shapes = {name: t.shape for u in self.updates for name, t in u.items()}
        out: Tensors = {}
        for name in sorted(shapes):
            stacked = torch.stack([u.get(name, torch.zeros(shapes[name])) for u in self.updates]).double()
            kept = stacked.sort(dim=0).values[cut:n - cut]
            out[name] = kept.mean(dim=0).float()
        return out

    def nbytes(self) -> int:
        """Bytes the kept updates hold: linear in the clients of the round, unlike the streaming mean."""
        return sum(t.numel() * t.element_size() for u in self.updates for t in u.values())

    def state(self) -> tuple[Tensors, dict]:
        """(tensors named ``<index>/<name>``, JSON-able numbers) from which ``from_state`` rebuilds
        this aggregator."""
        tensors = {f"{i}/{name}": t for i, u in enumerate(self.updates) for name, t in u.items()}
        return tensors, {"kind": self.kind, "clip_norm": self.clip_norm,
                         "trim_fraction": self.trim_fraction, "count": self.count}

    @classmethod
    def from_state(cls, tensors: Tensors, meta: dict) -> TrimmedMeanAggregator:
        """The aggregator that ``state`` described (a restarted server's open round)."""
        agg = cls(meta["trim_fraction"], meta["clip_norm"])
        agg.updates = [{} for _ in range(int(meta["count"]))]
        for key, t in tensors.items():
            index, name = key.split("/", 1)
            agg.updates[int(index)][name] = t
        return agg


Aggregator = StreamingAggregator | TrimmedMeanAggregator
AGGREGATORS: dict[str, type[StreamingAggregator] | type[TrimmedMeanAggregator]] = {
    StreamingAggregator.kind: StreamingAggregator, TrimmedMeanAggregator.kind: TrimmedMeanAggregator}


def build_aggregator(kind: str, clip_norm: float | None, trim_fraction: float) -> Aggregator:
    """The aggregator ``server.aggregation`` names, with the clipping bound."""
    if kind == TrimmedMeanAggregator.kind:
        return TrimmedMeanAggregator(trim_fraction, clip_norm)
    return StreamingAggregator(clip_norm)


def aggregator_from_state(tensors: Tensors, meta: dict) -> Aggregator:
    """The aggregator an open round saved (``state()``), of whichever kind it was."""
    return AGGREGATORS[meta["kind"]].from_state(tensors, meta)
