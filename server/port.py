"""The round port: what a transport may ask of a run's rounds, and nothing else.

In the spirit of Flower's ``Grid`` (one interface, a gRPC and an in-memory implementation), every
transport drives a round through this one object: the gRPC service (``service.py``,
``secagg_service.py``), the one-process simulator (``sim/runner.py``) and any backend that has
a client's protobuf messages in memory (a cluster backend). What it may ask:

* membership: ``join``, ``leave``, ``touch`` (heard from), ``heartbeat``, ``drop`` (a client
  that will not submit: its update was refused where nobody retries);
* downloads: ``assignment`` (what to do and how to catch up), then ``assignment_stream`` or
  ``snapshot_stream``, the very messages a distributed client receives, each counted into the
  client's traffic of the open round (payload and message bytes) as it is yielded;
* uploads: ``admit`` a header (every check that can refuse before a tensor is read), then
  ``fold`` its tensors; ``submit`` does both for a transport holding the whole update;
* secure aggregation: ``secure_round`` (the open round's protocol, whose methods are the
  phases), ``admit_masked`` and ``add_masked``;
* the run itself, for in-memory transports that drive it: ``run``, ``pending``,
  ``wait_pending``, ``rows``.

Refusals are ``RoundError`` with the gRPC status code a transport answers with. Nothing here
knows gRPC; the byte counts and the order of checks are the ones a distributed run has, so a
simulated run reaches the fingerprints and traffic figures of a distributed one. The module
also names what a transport's command needs of the server besides (``StateError``,
``format_table``): ``sim/`` imports nothing else of ``server/`` (an import-linter contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import structlog
import torch

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import ConnCounters, message_bytes, payload_bytes
from ..common.config import RunConfig
from ..common.logs import bounded
from ..common.participant import Shared
from ..common.precision import Placement
from ..common.update import UpdateRecord
from .clock import Clock
from .coordinator import Coordinator
from .downloads import DownloadMeter
from .intake import Admission
from .messages import DeltaEncodings, assignment_messages, snapshot_messages
from .metrics import format_table
from .registry import ClientRegistry
from .rounds import Assignment, RoundError
from .secagg import SecAggRound
from .state import StateError
from .uploads import HeldUpload, receive

log = structlog.get_logger("fedkrso.server")
__all__ = ["Admission", "Assignment", "RoundError", "RoundPort", "StateError", "format_table"]


class RoundPort:
    """One run's rounds, as a transport sees them (module docstring)."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        self.meter = DownloadMeter(coord.ledger)
        s = coord.cfg.server
        self.chunk = s.max_chunk_bytes
        self._deltas = DeltaEncodings(self.chunk, s.snapshot_after_rounds)
        # every long-poll is released at once when a round opens; each stream's serialized
        # copies wait in the transport's buffers until its client reads them: bound the streams
        self._downloads = asyncio.Semaphore(s.max_concurrent_downloads)

    @classmethod
    def in_memory(cls, cfg: RunConfig, fresh: bool = True, placement: Placement | None = None,
                  clock: Clock | None = None) -> RoundPort:
        """The port of a run whose clients live in this process (a simulator): they stay live
        (no liveness timeout) and the round has no deadline, since every selected client submits
        (or is ``drop``-ped) when its turn comes."""
        registry = ClientRegistry(cfg.run.seed, liveness_s=math.inf)
        return cls(Coordinator(cfg, fresh=fresh, registry=registry, deadlines=False, placement=placement,
                               clock=clock))

    # -- the run ---------------------------------------------------------------------------------
    @property
    def cfg(self) -> RunConfig:
        """The run's round.yaml."""
        return self.coord.cfg

    @property
    def run_id(self) -> str:
        """The run's identity (a digest of what shapes it)."""
        return self.coord.run_id

    @property
    def output_dir(self) -> Path:
        """Where the run writes its state, metrics and final model."""
        return self.coord.out

    @property
    def shared(self) -> Shared:
        """The server's model, tokenizer and method: in-process participants train on it."""
        return self.coord.shared

    @property
    def completed(self) -> int:
        """Rounds completed so far."""
        return self.coord.completed

    @property
    def finished(self) -> bool:
        """Whether the run has finished."""
        return self.coord.finished

    def check_run(self, run_id: str) -> None:
        """FAILED_PRECONDITION unless ``run_id`` is this run's."""
        if run_id != self.coord.run_id:
            raise RoundError("FAILED_PRECONDITION", f"run {bounded(run_id)} is not this run ({self.coord.run_id!r})")

    async def run(self) -> None:
        """The round loop, to the end of the run (``Coordinator.run``)."""
        await self.coord.run()

    def rows(self) -> list[dict]:
        """The metrics rows written so far."""
        return self.coord.metrics.rows()

    def pending(self) -> list[str]:
        """Selected clients of the open round that have yet to submit, in name order."""
        rs = self.coord.current
        if rs is None or rs.closing or self.coord.finished:
            return []
        return sorted(c for c in rs.selected if rs.is_open_for(c))

    def nobody_left(self, round_id: int) -> bool:
        """Round ``round_id`` is open with no selected client left to submit (all dropped)."""
        rs = self.coord.current
        return rs is not None and rs.round == round_id and not rs.selected

    async def wait_pending(self, stop: asyncio.Task) -> list[str]:
        """Until some client is ``pending`` or ``stop`` (the run's task) is done; the pending."""
        async with self.coord.changed:
            await self.coord.changed.wait_for(lambda: stop.done() or bool(self.pending()))
        return self.pending()

    async def notify(self) -> None:
        """Wake whatever waits on the run's state (an in-memory driver after a change of its own)."""
        await self.coord.notify()

    # -- membership ------------------------------------------------------------------------------
    def touch(self, client_id: str, polling: bool = False) -> None:
        """``client_id`` was heard from (``polling``: it asks for work, so it is selectable)."""
        self.coord.touch(client_id, polling)

    def is_live(self, client_id: str) -> bool:
        """Whether ``client_id`` joined, has not left and was heard from recently."""
        return self.coord.registry.is_live(client_id)

    def known_clients(self):
        """The ids the client table holds (a forgotten client's session ends with it)."""
        return self.coord.registry.clients

    async def join(self, client_id: str, name: str, num_samples: int, eval_samples: int = 0,
                   software_version: str = "") -> None:
        """Add (or rejoin) a client with its declared shard and evaluation sizes."""
        await self.coord.join(client_id, name, num_samples, eval_samples, software_version)

    async def leave(self, client_id: str, reason: str) -> None:
        """``client_id`` leaves the run (out of the open round too)."""
        await self.coord.leave(client_id, reason)

    def heartbeat(self, client_id: str) -> tuple[bool, int]:
        """(the run is finished, rounds completed), ``client_id`` heard from."""
        self.coord.touch(client_id)
        return self.coord.finished, self.coord.completed

    async def drop(self, client_id: str) -> None:
        """``client_id`` will not submit to the open round: it stops waiting for it."""
        await self.coord.drop_from_round(client_id)

    # -- downloads -------------------------------------------------------------------------------
    def assignment(self, client_id: str, have: int, holds_seeds: bool = False) -> Assignment | None:
        """Train the open round or the run is over, and how to catch up from ``have``; None
        while ``client_id`` has to wait (``Coordinator.assignment``)."""
        return self.coord.assignment(client_id, have, holds_seeds)

    async def wait_for_work(self, client_id: str, timeout: float) -> None:
        """A poll that got no assignment waits here until its answer may change, or ``timeout``."""
        await self.coord.wait_for_work(client_id, timeout)

    async def assignment_stream(self, client_id: str, task: Assignment,
                                counters: ConnCounters | None = None) -> AsyncIterator[pb.StartRoundResponse]:
        """The answer to ``task``: its header, then every delta the client lacks, counted into
        its traffic when it trains (from ``counters``' mark: the connection's socket bytes, None
        when not measured). A FINISHED stream yielded whole marks the client done."""
        meter, training = self.meter, task.status == "train"
        if training:
            meter.begin(client_id, task.round, counters)
        async with self._downloads if task.deltas else contextlib.nullcontext():
            for msg, payload in assignment_messages(task, self._deltas):
                if training:
                    meter.count(client_id, payload, message_bytes(msg))
                yield msg
        if training:
            meter.end(client_id)
        else:
            await self.coord.finished_stream_sent(client_id)

    async def snapshot_stream(self, client_id: str, round_id: int) -> AsyncIterator[pb.GetSnapshotResponse]:
        """The state after ``round_id`` rounds (the current one), counted into ``client_id``'s
        downlink of the open round like deltas."""
        async with self._downloads:  # one copy of the state per stream: bounded like deltas
            state, fp = await self.coord.snapshot(round_id)
            log.info("snapshot_sent", client=client_id, round=round_id)
            for msg, payload in snapshot_messages(round_id, state, fp, self.chunk):
                self.meter.count(client_id, payload, message_bytes(msg))
                yield msg
        self.meter.end(client_id)

    def assignment_copy(self, task: Assignment) -> list[pb.StartRoundResponse]:
        """``task``'s stream as ``assignment_stream`` yields it, counted nowhere: for a transport
        that hands a client's stream to a worker other than the client (a cluster backend's
        actor catching up; the client's own download is counted by ``assignment_stream``)."""
        return [msg for msg, _ in assignment_messages(task, self._deltas)]

    async def snapshot_copy(self, round_id: int) -> list[pb.GetSnapshotResponse]:
        """The snapshot stream of ``round_id`` as ``snapshot_stream`` yields it, counted nowhere
        (``assignment_copy``)."""
        state, fp = await self.coord.snapshot(round_id)
        return [msg for msg, _ in snapshot_messages(round_id, state, fp, self.chunk)]

    # -- uploads ---------------------------------------------------------------------------------
    def admit(self, client_id: str, header: pb.UpdateHeader) -> Admission:
        """Every check of an update that needs no tensor: the run, the round, the client's
        selection, its row count and evaluation, finite figures (``UpdateIntake.admit``)."""
        return self.coord.intake.admit(client_id, header.run_id, UpdateRecord.of_header(header))

    async def fold(self, adm: Admission, tensors: dict[str, torch.Tensor], up_payload: int, up_message: int,
                   counters: ConnCounters | None = None, down_at_submit: int | None = None) -> bool:
        """Fold an admitted update's tensors (checked against ``adm.spec`` by the transport as
        it read them); False for a duplicate of an update already folded. Durable before it
        returns. ``counters``/``down_at_submit``: the connection's socket counters and their
        downlink count when the upload began (None: not measured)."""
        return await self.coord.intake.accept(adm, tensors, up_payload, up_message, counters, down_at_submit)

    async def submit(self, client_id: str, header: pb.UpdateHeader, tensors: dict[str, torch.Tensor],
                     up_message: int) -> bool:
        """A whole update held in memory (its stream's messages summing to ``up_message``
        bytes): ``admit`` then ``fold``; False for a duplicate. The tensors are in the wire
        dtype, as a stream carries them."""
        adm = self.admit(client_id, header)
        if adm.duplicate:
            return False
        return await self.fold(adm, tensors, payload_bytes(tensors), up_message)

    async def submit_messages(self, client_id: str, messages: list[pb.SubmitUpdateRequest]) -> bool:
        """A whole SubmitUpdate stream held in memory (a cluster backend's actor answered with
        its client's messages): read as the gRPC service reads a stream (``uploads.receive``:
        the header admitted, the tensors assembled against the admitted spec and the header's
        digest, then folded); False for a duplicate."""
        got = await receive(HeldUpload(messages), "update", lambda h: self.admit(client_id, h), self.fold)
        return got.folded

    # -- secure aggregation ----------------------------------------------------------------------
    def secure_round(self, run_id: str, round_id: int) -> SecAggRound:
        """The protocol of round ``round_id``, whose methods are its phases (``secagg.py``)."""
        self.check_run(run_id)
        if self.coord.secagg is None:
            raise RoundError("FAILED_PRECONDITION", "this run does not use secure aggregation")
        return self.coord.secagg.round_for(int(round_id))

    def admit_masked(self, client_id: str, header: pb.UpdateHeader) -> Admission:
        """A masked input's header: its round's protocol first, then the update's checks; its
        tensor is one ring vector (``masked``), a duplicate's bound its ring's width."""
        sa = self.secure_round(header.run_id, header.round)
        adm = self.admit(client_id, header)
        return dataclasses.replace(adm, spec={"masked": (sa.numel,)}, required=frozenset({"masked"}), wire=sa.wire)

    async def add_masked(self, adm: Admission, tensors: dict[str, torch.Tensor], up_payload: int,
                         up_message: int) -> None:
        """Sum an admitted masked input into its round's protocol; its bytes into the traffic."""
        sa = self.secure_round(self.run_id, adm.record.round)
        vector = tensors["masked"].numpy().view(np.uint32 if sa.bits == 32 else np.uint64)
        await sa.add_masked(adm.client_id, adm.record, vector)
        traffic = sa.rs.traffic_of(adm.client_id)
        traffic.up_payload, traffic.up_message, traffic.up_wire = up_payload, up_message, None
