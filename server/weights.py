"""How much each client counts in a round's weighted mean, and why it cannot be inflated.

A client's weight is frozen for a round when it is selected: the round keeps the shard size
it declared then (``RoundState.declared``), and its weight (``frozen``) is its pinned weight
(``training.client_weights``), else its declared shard size capped at
``training.max_samples_per_client`` (``weighting: samples``), else 1. A client that joins
again in the middle of a round declaring another size changes nothing in that round; its
update's header may claim fewer samples than it declared, never more.

When an update is folded, ``training.max_weight_share`` caps its weight so that no client
carries more than that share of the round's total weight (``share_cap``, water-filling over
the frozen weights of the clients selected for the round). The share is of the selection's
weight: when selected clients do not submit, a capped client's share of what was aggregated
can exceed it, and ``rounds.min_clients`` is the guard there.
"""

from __future__ import annotations

import math

from ..common.config import TrainingSection
from .rounds import RoundState


def share_cap(weights: list[float], share: float | None) -> float:
    """The largest cap c such that no ``min(w, c)`` exceeds ``share`` of ``sum(min(w, c))``
    (math.inf when no weight needs capping). When ``share`` is below 1/n no cap can meet it
    and c is the smallest weight: every client then counts the same."""
    if share is None or share >= 1 or not weights:
        return math.inf
    ws = sorted(weights)
    total = sum(ws)
    if ws[-1] <= share * total:
        return math.inf
    below = total  # sum of the weights left uncapped
    for capped in range(1, len(ws)):
        below -= ws[-capped]
        if capped * share >= 1:
            break
        cap = share * below / (1 - capped * share)
        if cap >= ws[-capped - 1]:
            return cap
    return ws[0]


class RoundWeights:
    """The weighting policy of ``training`` (module docstring)."""

    def __init__(self, training: TrainingSection):
        self.training = training

    def frozen(self, client_id: str, declared_samples: int) -> float:
        """The weight ``client_id`` carries through a round, fixed when it is selected."""
        t = self.training
        pinned = t.client_weights.get(client_id)
        if pinned is not None:
            return float(pinned)
        if t.weighting == "uniform":
            return 1.0
        cap = t.max_samples_per_client
        return float(declared_samples if cap is None else min(declared_samples, cap))

    def fold_weight(self, rs: RoundState, client_id: str, claimed_samples: int) -> float:
        """The weight ``client_id``'s update is folded into ``rs`` with: its frozen weight (or,
        weighting by samples, the fewer samples its header claims), capped so that it carries
        at most ``max_weight_share`` of the frozen weights of the round's selected clients."""
        t = self.training
        weight = self.frozen(client_id, rs.declared[client_id])
        if client_id not in t.client_weights and t.weighting == "samples":
            weight = min(weight, float(claimed_samples))
        return min(weight, self.round_cap(rs, client_id))

    def round_cap(self, rs: RoundState, client_id: str) -> float:
        """``share_cap`` over the frozen weights of the round's selected clients (and of
        ``client_id``). Computed once per selection, not once per update: sorting N weights
        for each of N updates made a round O(N^2 log N). The selection's frozen weights change
        only when clients are selected, leave or are replaced: a replacement assigns a new
        selection (and declares new weights), a leave shrinks it, so the selection's identity
        and size and the number of declared weights key the cached cap."""
        key = (id(rs.selected), len(rs.selected), len(rs.declared))
        cached = rs.weight_cap
        if client_id in rs.selected and cached is not None and cached[0] == key:
            return cached[1]
        selection = [self.frozen(c, rs.declared[c]) for c in sorted(rs.selected | set(rs.submissions) | {client_id})]
        cap = share_cap(selection, self.training.max_weight_share)
        if client_id in rs.selected:
            rs.weight_cap = (key, cap)
        return cap
