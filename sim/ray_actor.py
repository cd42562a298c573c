"""One Ray actor of ``fedkrso-sim --backend ray``: a copy of the base model on the actor's
device, and the client side of the rounds the driver hands it, one after another.

The actor is a client process without a socket. It holds W^have, like a distributed client,
and the driver sends it what a StartRound stream (and, when it is far behind, a GetSnapshot
stream) would carry, as serialized protobuf messages: it applies the round's deltas once
(the first of its clients of a round; the next ones find it at the target already), checks
the rebuilt state against the server's fingerprint, then trains the client with the same
``Participant`` every transport drives and answers with the serialized SubmitUpdate stream.
The base model is loaded once, when the actor starts; a client's shard is read and tokenised
the first time the actor trains it, then kept.

Its limits are applied, not only declared: torch computes with as many threads as the CPUs
Ray granted it, and on a GPU the process's memory fraction is its share of the GPU.

This module imports neither ray nor server code: the driver (``ray_backend.py``) wraps the
class with ``ray.remote``; it is plain Python here, so it can be read and tested as such.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import structlog
import torch

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import peak_rss_bytes
from ..common.config import RunConfig
from ..common.data import load_client_eval, load_split
from ..common.participant import Participant, ParticipantError, Shared
from ..common.precision import peak_bytes, resolve_placement
from ..common.privacy.ledger import BudgetExceeded
from ..common.wire import TensorAssembler

log = structlog.get_logger("fedkrso.sim.actor")


def threads_for(cpus: float) -> int:
    """Torch threads for ``cpus`` granted CPUs: the whole ones, at least one."""
    return max(1, math.floor(cpus))


class ClientActor:
    """A pool member (module docstring). ``shards``: client name -> its shard folder, which
    must be readable where the actor runs (the same path on every node)."""

    def __init__(self, cfg_json: str, shards: dict[str, str], run_id: str, cpus: float, gpus: float,
                 device: str | None = None, dtype: str | None = None):
        self.threads = threads_for(cpus)
        torch.set_num_threads(self.threads)
        self.cfg = RunConfig.model_validate_json(cfg_json)
        m = self.cfg.model
        placement = resolve_placement(m.device, m.dtype, device, dtype)
        self.gpu_fraction = None
        if placement.device.type == "cuda" and 0 < gpus < 1:  # several actors share this GPU
            self.gpu_fraction = gpus
            torch.cuda.set_per_process_memory_fraction(gpus, placement.device)
        self.placement = placement
        self.shards = {k: Path(v) for k, v in shards.items()}
        self.run_id = run_id
        self.shared = Shared.load(self.cfg, placement=placement)  # once per actor, never per client
        self.have = 0
        self.fixed_seeds: list[int] = []
        self.participants: dict[str, Participant] = {}
        self.trained = 0
        self.deltas_applied = 0
        self.snapshots = 0
        log.info("actor_ready", pid=os.getpid(), threads=self.threads, placement=str(placement),
                 gpu_fraction=self.gpu_fraction)

    def _participant(self, client: str) -> Participant:
        p = self.participants.get(client)
        if p is None:
            path = self.shards[client]
            p = Participant(self.cfg, client, load_split(path), self.shared, load_client_eval(path))
            self.participants[client] = p
        p.have, p.fixed_seeds = self.have, list(self.fixed_seeds)  # the actor's state is the client's
        return p

    def round(self, client: str, stream: list[bytes], snapshot: list[bytes]) -> dict:
        """Catch up with ``stream`` (StartRoundResponse messages: the header, then the deltas
        from this actor's round to the target) and ``snapshot`` (GetSnapshotResponse messages,
        when the header says so), then train ``client``. The answer: ``{"requests": [...]}``,
        the SubmitUpdate stream, or ``{"left": reason}`` when the client's DP-SGD budget is spent."""
        p = self._participant(client)
        header = self._catch_up(p, [pb.StartRoundResponse.FromString(b) for b in stream],
                                [pb.GetSnapshotResponse.FromString(b) for b in snapshot])
        seeds = p.seeds(list(header.seeds))
        self.fixed_seeds = list(p.fixed_seeds)
        p.check_plan(header.round, seeds, header.plan_fingerprint)
        try:
            update = p.train(header.round, seeds)
        except BudgetExceeded as err:
            return {"left": str(err)}
        self.trained += 1
        chunk = self.cfg.server.max_chunk_bytes
        return {"requests": [m.SerializeToString() for m in update.requests(self.run_id, peak_rss_bytes(), chunk)],
                "loss": update.loss}

    def _catch_up(self, p: Participant, stream: list[pb.StartRoundResponse],
                  snapshot: list[pb.GetSnapshotResponse]) -> pb.RoundHeader:
        if not stream or stream[0].WhichOneof("body") != "header":
            raise ParticipantError("the round stream carried no header")
        header = stream[0].header
        if header.catch_up == pb.CATCH_UP_SNAPSHOT:
            asm = TensorAssembler(p.state_spec(), None, max_bytes=p.state_bytes())
            for msg in snapshot[1:]:
                asm.add(msg.tensors)
            p.load_snapshot(header.snapshot_round, asm.finish(set(p.state_spec())))
            self.snapshots += 1
        delta, asm = None, None
        for msg in [*stream[1:], None]:
            kind = msg.WhichOneof("body") if msg is not None else None
            if kind == "tensors":
                asm.add(msg.tensors)
                continue
            if delta is not None:  # the previous delta is whole
                p.apply_delta(delta.round, p.seeds(list(delta.seeds)), asm.finish())
                self.deltas_applied += 1
            if kind == "delta":
                delta = msg.delta
                asm = TensorAssembler(p.delta_spec(p.seeds(list(delta.seeds))), self.cfg.method.wire_dtype)
        p.verify(header.target_round, header.state_fingerprint)
        self.have = p.have
        self.fixed_seeds = list(p.fixed_seeds)
        return header

    def stats(self) -> dict:
        """What this actor did and what it cost: its process's peak resident memory and, on
        an accelerator, its peak allocated bytes."""
        try:
            import ray  # only ever run inside a Ray worker: which node it is on

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - plain Python, outside Ray
            node = None
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": node, "threads": torch.get_num_threads(),
                "device": str(self.placement.device), "gpu_fraction": self.gpu_fraction,
                "peak_rss_bytes": peak_rss_bytes(), "accelerator_peak_bytes": peak_bytes(self.placement.device),
                "clients_trained": self.trained, "clients_held": len(self.participants),
                "deltas_applied": self.deltas_applied, "snapshots": self.snapshots, "have": self.have}
