"""The records of a run's rounds: an open round, an accepted submission, a closed round's delta,
what a polling client is told (``Assignment``) and a shared snapshot of the state.

Plain data with no I/O: the coordinator (``coordinator.py``) changes them, the persistence
layer (``state.py``) writes and reads them, the metrics row (``metrics.py``) summarises them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..common.accounting import Traffic, payload_bytes, seeds_bytes
from ..common.aggregate import Aggregator
from ..common.update import UpdateRecord


class RoundError(Exception):
    """An update or request that the current round state refuses; ``code`` names the gRPC
    status the service answers with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class RoundDelta:
    """The canonical bytes of one round's aggregated delta (in the wire dtype)."""

    round: int
    seeds: list[int]
    tensors: dict[str, torch.Tensor]
    state_fingerprint: str  # state after applying it

    @functools.cached_property
    def tensor_bytes(self) -> int:
        """Its tensors' payload bytes: counted once, not for every client it is sent to."""
        return payload_bytes(self.tensors)

    @property
    def payload_bytes(self) -> int:
        """Bytes the delta carries on the wire: its tensors and its seeds."""
        return self.tensor_bytes + seeds_bytes(len(self.seeds))


@dataclass
class Submission:
    """An accepted update of the open round: who sent it, what its record reported
    (``common.update.UpdateRecord``, less what is only checked: round, tensor count) and what
    it was folded with. Its tensors are folded into the aggregate, not kept. Flat, because it
    is the open round's saved form (``open_round.py``): older saved rounds still load."""

    client_id: str
    digest: str
    num_samples: int
    loss: float
    steps: int
    train_seconds: float
    peak_rss_bytes: int
    train_state_bytes: int
    seeds_used: list[int]
    weight: float = 0.0  # what it was folded with (weights.RoundWeights.fold_weight)
    update_norm: float | None = None  # the size of the weight change it implies (method.update_norm);
    # None: not seen (secure aggregation hides each update from the server)
    eval: dict[str, float] = field(default_factory=dict)  # validated (``client_eval.check``)
    eval_examples: int = 0
    accelerator_peak_bytes: int = 0  # absent from open rounds saved before it existed

    @classmethod
    def of(cls, client_id: str, record: UpdateRecord, weight: float, update_norm: float | None) -> Submission:
        """The saved record of an accepted update: ``record``'s figures with its weight and norm."""
        return cls(client_id, record.digest, record.num_samples, record.loss, record.steps,
                   record.train_seconds, record.peak_rss_bytes, record.train_state_bytes,
                   list(record.seeds_used), weight, update_norm, dict(record.eval_metrics), record.eval_examples,
                   record.accelerator_peak_bytes)


@dataclass
class RoundState:
    """An open round: its seeds and plan, who is selected and dropped, the declared shard sizes, the
    running aggregate, the submissions and traffic, and its deadline."""

    round: int
    seeds: list[int]
    plan_fingerprint: str
    selected: set[str]
    deadline: float
    started: float = field(default_factory=time.monotonic)
    submissions: dict[str, Submission] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    # client -> the shard size it declared when the round selected it: its weight in this round
    # follows from it (server/weights.py) and a later Join cannot change it
    declared: dict[str, int] = field(default_factory=dict)
    # the selection's weight cap and what it was computed for (weights.RoundWeights.round_cap)
    weight_cap: tuple[tuple[int, int, int], float] | None = None
    traffic: dict[str, Traffic] = field(default_factory=dict)
    # clients whose submission or traffic changed since the open round was last saved: what
    # the next save's journal line holds (open_round.py); marked by ``traffic_of``
    changed: set[str] = field(default_factory=set)
    aggregator: Aggregator | None = None
    closing: bool = False
    failed: str | None = None  # why the round closes without changing the model (secure aggregation)
    # group commit of accepted updates: ``folds`` counts updates folded into ``aggregator``,
    # ``saved_folds`` those on disk; one ``flusher`` task writes for every update waiting
    folds: int = 0
    saved_folds: int = 0
    flusher: asyncio.Task | None = None
    # downloads finished since the last save of the open round (saved by ``record_flusher``)
    unsaved_downloads: bool = False
    record_flusher: asyncio.Task | None = None
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # set once the round is on disk

    def is_open_for(self, client_id: str) -> bool:
        """Whether ``client_id`` is selected and may still submit (the round is not closing)."""
        return not self.closing and client_id in self.selected and client_id not in self.submissions

    def traffic_of(self, client_id: str) -> Traffic:
        """The client's traffic meter of this round, created on first use, and the client
        marked as changed: whoever asks for the meter is about to change it, or its submission."""
        self.changed.add(client_id)
        return self.traffic.setdefault(client_id, Traffic())


@dataclass
class Assignment:
    """What a polling client is told: train the open round, or the run is over; in both cases
    how to reach the target state first (deltas, a snapshot, or nothing)."""

    status: Literal["train", "finished"]
    round: int
    target_round: int
    state_fingerprint: str
    catch_up: Literal["none", "deltas", "snapshot"]
    deltas: list[RoundDelta] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    plan_fingerprint: str = ""
    deadline_unix: float = 0.0
    seeds_in_deltas: bool = True  # False: fixed seeds the client already holds (not resent)


class StateCopy(dict):
    """A snapshot's tensors (a dict that can be weakly referenced)."""
