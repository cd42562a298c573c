"""Every client of a run in one process, on one copy of the base model, with the code of the
distributed run: the same ``Coordinator`` (selection, aggregation, evaluation, state on disk,
metrics rows), the same client-side round (``common.participant.Participant``: seeds, client
RNG keys, method code) and the same message streams (``server.messages`` and
``PreparedUpdate.requests``), so for the same config, data and torch thread count a simulated
run reaches the state fingerprints of a distributed one after every round.

What differs, by design: no gRPC and no sockets (every wire figure is ``None``: not measured;
payload and message bytes are counted from the very messages a distributed run would send);
no deadlines (clients train one after another and every selected client submits); and one
model: the participants train on the coordinator's own copy, each returning it to W^t bit for
bit (``Participant.train`` restores its snapshot), so a client never has to apply a delta: a
catch-up only moves its round counter and counts the bytes it would have downloaded.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import structlog

from ..common.accounting import message_bytes, payload_bytes, peak_rss_bytes
from ..common.config import ConfigError, RunConfig
from ..common.data import load_client_eval, load_split
from ..common.participant import Participant
from ..common.precision import Placement
from ..common.privacy.ledger import BudgetExceeded
from ..server.coordinator import Coordinator
from ..server.intake import report_of
from ..server.messages import DeltaEncodings, assignment_messages, snapshot_messages
from ..server.registry import ClientRegistry
from ..server.rounds import RoundError

log = structlog.get_logger("fedkrso.sim")


class SimulationError(RuntimeError):
    """The run cannot go on (no selected client of a round is left to submit); the message says why."""


def shard_folders(data_root: Path) -> dict[str, Path]:
    """``shard0 .. shardN-1`` under ``data_root`` (written by fedkrso-partition), by name in
    index order; each is one client, named like a distributed client with ``--data shardN``,
    and evaluates on its ``shardN/eval`` when it has one, as that client would."""
    found = {p.name: p for p in data_root.glob("shard*") if p.is_dir() and p.name[5:].isdigit()}
    if not found:
        raise FileNotFoundError(f"no shard folders under {data_root}; write them with fedkrso-partition")
    return dict(sorted(found.items(), key=lambda kv: int(kv[0][5:])))


class Simulation:
    """One run of ``cfg`` with a client per shard of ``data_root``."""

    def __init__(self, cfg: RunConfig, data_root: Path, fresh: bool = True, placement: Placement | None = None):
        """``placement``: the one device and dtype of the coordinator's model, on which every
        simulated client trains (default: round.yaml's)."""
        if cfg.privacy.secure_aggregation.enabled:
            raise ConfigError("fedkrso-sim has no transport to run secure aggregation over; run real processes "
                              "(fedkrso-server and fedkrso-client, or fedkrso-bench with runner: processes)")
        self.cfg = cfg
        registry = ClientRegistry(cfg.run.seed, liveness_s=math.inf)
        self.coord = Coordinator(cfg, fresh=fresh, registry=registry, deadlines=False, placement=placement)
        shared = self.coord.shared
        self.participants = {name: Participant(cfg, name, load_split(path), shared, load_client_eval(path))
                             for name, path in shard_folders(Path(data_root)).items()}
        self.deltas = DeltaEncodings(cfg.server.max_chunk_bytes, cfg.server.snapshot_after_rounds)

    async def run(self) -> list[dict]:
        """Run every round; returns the metrics rows."""
        coord = self.coord
        for name, p in self.participants.items():
            await coord.join(name, name, p.num_samples, p.eval_samples)
            coord.touch(name, polling=True)  # a simulated client is always waiting for work
        loop = asyncio.create_task(coord.run())
        try:
            loop.add_done_callback(lambda _: asyncio.ensure_future(coord.notify()))  # wakes the wait below
            while True:
                async with coord.changed:
                    await coord.changed.wait_for(lambda: loop.done() or bool(self._waiting()))
                if loop.done():
                    break
                for client_id in self._waiting():
                    await self._client_round(client_id)
            await loop  # raises what the run raised
        finally:
            loop.cancel()
        return coord.metrics.rows()

    def _waiting(self) -> list[str]:
        """Selected clients of the open round that still have to train."""
        rs = self.coord.current
        if rs is None or rs.closing or self.coord.finished:
            return []
        return sorted(c for c in rs.selected if rs.is_open_for(c))

    async def _client_round(self, client_id: str) -> None:
        coord, p = self.coord, self.participants[client_id]
        task = coord.assignment(client_id, p.have, bool(p.fixed_seeds))
        coord.begin_download(client_id, task.round, None)
        for msg, payload in assignment_messages(task, self.deltas):
            coord.count_download(client_id, payload, message_bytes(msg))
        if task.catch_up == "snapshot":
            state, fp = await coord.snapshot(task.target_round)
            for msg, payload in snapshot_messages(task.target_round, state, fp, self.cfg.server.max_chunk_bytes):
                coord.count_download(client_id, payload, message_bytes(msg))
            del state
        coord.end_download(client_id)
        p.have = task.target_round  # the shared model is already at the target state
        seeds = p.seeds(task.seeds)
        p.check_plan(task.round, seeds, task.plan_fingerprint)
        try:
            update = await asyncio.to_thread(p.train, task.round, seeds)
        except BudgetExceeded as err:  # as a distributed client would: it leaves rather than train past it
            log.warning("dp_sgd_budget_reached", client=client_id, round=task.round, reason=str(err))
            await coord.leave(client_id, "dp-sgd budget reached")
            self._check_round_goes_on(task.round, f"{client_id} reached its DP-SGD budget: {err}")
            return
        rss = peak_rss_bytes()
        up_message = sum(message_bytes(m) for m in update.requests(coord.run_id, rss, self.cfg.server.max_chunk_bytes))
        header = update.header(coord.run_id, rss)  # what the service reads: the same checks, the same report
        try:
            rs = coord.intake.check_header(client_id, header.run_id, header.round, header.num_samples,
                                           header.update_digest)
            report = report_of(header, self.cfg.privacy)
            coord.intake.check_eval(rs, client_id, report)
            await coord.intake.accept(rs, client_id, report, {k: v.float() for k, v in update.tensors.items()},
                                      payload_bytes(update.tensors), up_message, None, None)
        except RoundError as err:  # the service would answer with this status; the run goes on without it
            await self._refused(client_id, task.round, err)
            return
        log.info("client_trained", client=client_id, round=task.round, loss=round(update.loss, 4))

    async def _refused(self, client_id: str, round_id: int, err: RoundError) -> None:
        """A refused update, as a distributed client would log it; the round stops waiting for
        this client (no deadline here to do it). When nobody is left to submit, the run cannot
        go on: ``SimulationError`` with the server's reason."""
        log.warning("update_refused", client=client_id, round=round_id, code=err.code, reason=str(err))
        await self.coord.drop_from_round(client_id)
        self._check_round_goes_on(round_id, f"the last update was refused with {err.code}: {err}")

    def _check_round_goes_on(self, round_id: int, why: str) -> None:
        """``SimulationError`` when no selected client is left to submit to round ``round_id``."""
        rs = self.coord.current
        if rs is not None and rs.round == round_id and not rs.selected:
            raise SimulationError(f"round {round_id}: no selected client is left to submit; {why}")
