"""Every client of a run in one process, on one copy of the base model, with the code of the
distributed run: the same round port (``server.port.RoundPort``, in memory: the coordinator's
selection, aggregation, evaluation, state on disk, metrics rows, and the message streams it
counts), the same client-side round (``common.participant.Participant``: seeds, client RNG
keys, method code) and the same update messages (``PreparedUpdate.requests``), so for the same config, data and torch thread count a simulated
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
from pathlib import Path

import structlog

from ..common.accounting import message_bytes, peak_rss_bytes
from ..common.config import ConfigError, RunConfig
from ..common.data import load_client_eval, load_split
from ..common.participant import Participant
from ..common.precision import Placement
from ..common.privacy.ledger import BudgetExceeded
from ..server.port import RoundError, RoundPort

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
    """One run of ``cfg`` with a client per shard of ``data_root``, over the in-memory round port."""

    def __init__(self, cfg: RunConfig, data_root: Path, fresh: bool = True, placement: Placement | None = None):
        """``placement``: the one device and dtype of the coordinator's model, on which every
        simulated client trains (default: round.yaml's)."""
        if cfg.privacy.secure_aggregation.enabled:
            raise ConfigError("fedkrso-sim has no transport to run secure aggregation over; run real processes "
                              "(fedkrso-server and fedkrso-client, or fedkrso-bench with runner: processes)")
        self.cfg = cfg
        self.port = RoundPort.in_memory(cfg, fresh=fresh, placement=placement)
        shared = self.port.shared
        self.participants = {name: Participant(cfg, name, load_split(path), shared, load_client_eval(path))
                             for name, path in shard_folders(Path(data_root)).items()}

    async def run(self) -> list[dict]:
        """Run every round; returns the metrics rows."""
        port = self.port
        for name, p in self.participants.items():
            await port.join(name, name, p.num_samples, p.eval_samples)
            port.touch(name, polling=True)  # a simulated client is always waiting for work
        loop = asyncio.create_task(port.run())
        try:
            loop.add_done_callback(lambda _: asyncio.ensure_future(port.notify()))  # wakes the wait below
            while True:
                waiting = await port.wait_pending(loop)
                if loop.done():
                    break
                for client_id in waiting:
                    await self._client_round(client_id)
            await loop  # raises what the run raised
        finally:
            loop.cancel()
        return port.rows()

    async def _client_round(self, client_id: str) -> None:
        port, p = self.port, self.participants[client_id]
        task = port.assignment(client_id, p.have, bool(p.fixed_seeds))
        async for _ in port.assignment_stream(client_id, task):  # counted, as sent
            pass
        if task.catch_up == "snapshot":
            async for _ in port.snapshot_stream(client_id, task.target_round):
                pass
        p.have = task.target_round  # the shared model is already at the target state
        seeds = p.seeds(task.seeds)
        p.check_plan(task.round, seeds, task.plan_fingerprint)
        try:
            update = await asyncio.to_thread(p.train, task.round, seeds)
        except BudgetExceeded as err:  # as a distributed client would: it leaves rather than train past it
            log.warning("dp_sgd_budget_reached", client=client_id, round=task.round, reason=str(err))
            await port.leave(client_id, "dp-sgd budget reached")
            self._check_round_goes_on(task.round, f"{client_id} reached its DP-SGD budget: {err}")
            return
        rss = peak_rss_bytes()
        up_message = sum(message_bytes(m) for m in update.requests(port.run_id, rss, self.cfg.server.max_chunk_bytes))
        try:  # the header the service reads: the same checks, the same record
            await port.submit(client_id, update.header(port.run_id, rss), update.tensors, up_message)
        except RoundError as err:  # the service would answer with this status; the run goes on without it
            await self._refused(client_id, task.round, err)
            return
        log.info("client_trained", client=client_id, round=task.round, loss=round(update.loss, 4))

    async def _refused(self, client_id: str, round_id: int, err: RoundError) -> None:
        """A refused update, as a distributed client would log it; the round stops waiting for
        this client (no deadline here to do it). When nobody is left to submit, the run cannot
        go on: ``SimulationError`` with the server's reason."""
        log.warning("update_refused", client=client_id, round=round_id, code=err.code, reason=str(err))
        await self.port.drop(client_id)
        self._check_round_goes_on(round_id, f"the last update was refused with {err.code}: {err}")

    def _check_round_goes_on(self, round_id: int, why: str) -> None:
        """``SimulationError`` when no selected client is left to submit to round ``round_id``."""
        if self.port.nobody_left(round_id):
            raise SimulationError(f"round {round_id}: no selected client is left to submit; {why}")
