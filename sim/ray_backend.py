"""``fedkrso-sim --backend ray``: the coordinator in the driver, the clients' rounds on a pool
of Ray actors (``ray_actor.ClientActor``), each holding one copy of the base model.

The driver is the simulator's (``runner.py``) with the training moved out: the same
round port (``RoundPort.in_memory``: no deadlines, clients that stay live), the same join of one client
per shard, the same download accounting per client (the client's own StartRound and
GetSnapshot streams, counted message by message, as if it had received them). What differs
is where a client trains: the selected clients of a round are dispatched at once, over the
actors, each actor running its queue one after another. An actor holds W^have of its own and
is sent the real StartRound stream (and snapshot stream) that takes it to the round's state,
as serialized messages; it answers with the serialized SubmitUpdate stream, which the driver
reads like the gRPC service does (the header checks, the tensors assembled against the
round's spec and their digest, then the intake). So bytes are counted from real messages
and every update goes through the server's own checks.

Training is keyed by (run seed, round, client) and the aggregation does not depend on the
order updates arrive in, so with the same torch threads the run reaches the state
fingerprints of the in-process simulator and of a distributed run after every round.

An actor that dies mid-round (killed, its node lost) loses its queue: those clients' rounds
are run again on a live actor, which produces the same bytes. When no actor is left the run
stops with ``SimulationError`` (exit 1).

``RoundDriver`` holds every call into the server's round port (``server.port.RoundPort``, the
one part of ``server/`` that ``sim/`` may import), like ``runner.py``'s simulator does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.config import ConfigError, RunConfig
from ..common.data import load_client_eval, load_split
from ..common.precision import Placement
from ..server.port import RoundError, RoundPort
from .ray_actor import ClientActor, threads_for
from .ray_connect import RayUnavailable, connect  # noqa: F401 - fedkrso-sim's and the tests' entry
from .runner import SimulationError, shard_folders

log = structlog.get_logger("fedkrso.sim.ray")


@dataclass
class PoolSpec:
    """The actor pool: how many, and what each is granted (and applies)."""

    actors: int = 2
    cpus: float = 1.0
    gpus: float = 0.0
    device: str | None = None  # --device / --dtype of fedkrso-sim, resolved where the actor runs
    dtype: str | None = None

    def check(self) -> None:
        """ConfigError for a pool that cannot be asked of Ray (no actor, no CPU, a GPU share that is
        neither a fraction nor whole GPUs)."""
        if self.actors < 1:
            raise ConfigError(f"--actors must be at least 1, got {self.actors}")
        if not self.cpus > 0:
            raise ConfigError(f"--cpus-per-actor must be positive, got {self.cpus}")
        if not 0 <= self.gpus <= 1 and not (self.gpus > 1 and float(self.gpus).is_integer()):
            raise ConfigError(f"--gpus-per-actor must be a fraction of one GPU or a whole number, got {self.gpus}")


@dataclass
class _Member:
    """One actor of the pool as the driver sees it: the round it will hold once its queue is
    done, whether it holds a fixed-seed method's seeds, and its queue length."""

    handle: object
    index: int
    have: int = 0
    holds_seeds: bool = False
    queued: int = 0
    alive: bool = True


@dataclass
class _Client:
    have: int = 0
    holds_seeds: bool = False
    path: Path = field(default_factory=Path)


class RoundDriver:
    """The round port operations the Ray driver uses, in one place (the simulator's set: join,
    the run loop, downloads counted per client, the actors' catch-up streams, the service's
    reading of an update, leaving and refusals)."""

    def __init__(self, cfg: RunConfig, fresh: bool, placement: Placement | None):
        self.cfg = cfg
        self.port = RoundPort.in_memory(cfg, fresh=fresh, placement=placement)

    @property
    def run_id(self) -> str:
        """The run's identity."""
        return self.port.run_id

    async def join(self, name: str, num_samples: int, eval_samples: int) -> None:
        """Join one shard's client; it is always waiting for work."""
        await self.port.join(name, name, num_samples, eval_samples)
        self.port.touch(name, polling=True)  # a simulated client is always waiting for work

    async def download(self, client_id: str, have: int, holds_seeds: bool) -> tuple[int, bool, int]:
        """Count the client's StartRound (and snapshot) stream as the service would send it;
        (the round it then holds, whether it was sent seeds, the round it trains)."""
        port = self.port
        task = port.assignment(client_id, have, holds_seeds)
        async for _ in port.assignment_stream(client_id, task):  # counted, as sent
            pass
        if task.catch_up == "snapshot":
            async for _ in port.snapshot_stream(client_id, task.target_round):
                pass
        return task.target_round, bool(task.seeds), task.round

    async def actor_streams(self, client_id: str, have: int, holds_seeds: bool) -> tuple[list[bytes], list[bytes], int]:
        """The StartRound stream (and snapshot stream) that takes an actor at round ``have``
        to the open round for ``client_id``, serialized, not counted (the client's own
        download was); and that round."""
        task = self.port.assignment(client_id, have, holds_seeds)
        stream = [m.SerializeToString() for m in self.port.assignment_copy(task)]
        snapshot: list[bytes] = []
        if task.catch_up == "snapshot":
            snapshot = [m.SerializeToString() for m in await self.port.snapshot_copy(task.target_round)]
        return stream, snapshot, task.target_round

    async def submit(self, client_id: str, requests: list[bytes]) -> None:
        """The update as the gRPC service reads it (``RoundPort.submit_messages``); RoundError
        when refused. A duplicate (a rerun of a round whose first answer got through) changes
        nothing."""
        await self.port.submit_messages(client_id, [pb.SubmitUpdateRequest.FromString(b) for b in requests])


class RaySimulation:
    """One run of ``cfg`` with a client per shard of ``data_root``, trained on a Ray actor pool
    (module docstring). Connect to Ray first (``connect``)."""

    def __init__(self, cfg: RunConfig, data_root: Path, pool: PoolSpec, fresh: bool = True,
                 placement: Placement | None = None):
        if cfg.privacy.secure_aggregation.enabled:
            raise ConfigError("fedkrso-sim has no transport to run secure aggregation over; run real processes "
                              "(fedkrso-server and fedkrso-client, or fedkrso-bench with runner: processes)")
        pool.check()
        self.cfg, self.pool = cfg, pool
        self.clients = {name: _Client(path=path) for name, path in shard_folders(Path(data_root)).items()}
        self.driver = RoundDriver(cfg, fresh, placement)
        self.port = self.driver.port  # what fedkrso-sim's summary reads (run_id, output_dir)
        self.members: list[_Member] = []
        self.actor_stats: list[dict] = []

    def _start_actors(self) -> None:
        import ray

        p = self.pool
        remote = ray.remote(ClientActor).options(num_cpus=p.cpus, num_gpus=p.gpus, max_restarts=0,
                                                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads_for(p.cpus))}})
        cfg_json = self.cfg.model_dump_json()
        shards = {name: str(c.path.resolve()) for name, c in self.clients.items()}
        self.members = [_Member(remote.remote(cfg_json, shards, self.driver.run_id, p.cpus, p.gpus, p.device, p.dtype),
                                i) for i in range(p.actors)]
        needed = {"CPU": p.cpus * p.actors, "GPU": p.gpus * p.actors}
        have = ray.cluster_resources()
        short = {k: v for k, v in needed.items() if v and have.get(k, 0.0) + 1e-9 < v}
        if short:  # Ray would queue the actors for ever: say so instead
            raise RayUnavailable(f"the cluster has {({k: have.get(k, 0.0) for k in short})}, the pool asks for "
                                 f"{short} ({p.actors} actors x {p.cpus} CPU, {p.gpus} GPU): fewer --actors, or "
                                 "smaller --cpus-per-actor / --gpus-per-actor")

    async def run(self) -> list[dict]:
        """Run every round; returns the metrics rows."""
        import ray

        started = time.monotonic()
        for name, c in self.clients.items():
            ev = load_client_eval(c.path)
            await self.driver.join(name, len(load_split(c.path)), 0 if ev is None or not len(ev) else len(ev))
        self._start_actors()
        log.info("ray_pool", actors=self.pool.actors, cpus_per_actor=self.pool.cpus, gpus_per_actor=self.pool.gpus,
                 clients=len(self.clients), nodes=len([n for n in ray.nodes() if n.get("Alive")]))
        port = self.port
        loop = asyncio.create_task(port.run())
        try:
            loop.add_done_callback(lambda _: asyncio.ensure_future(port.notify()))  # wakes the wait below
            while True:
                waiting = await port.wait_pending(loop)
                if loop.done():
                    break
                await asyncio.gather(*(self._client_round(c) for c in waiting))
            await loop  # raises what the run raised
        finally:
            loop.cancel()
            self.actor_stats = self._collect_stats()
        log.info("ray_run_done", seconds=round(time.monotonic() - started, 1), actors=self.actor_stats)
        return port.rows()

    def _collect_stats(self) -> list[dict]:
        import ray

        out = []
        for m in self.members:
            if not m.alive:
                out.append({"actor": m.index, "alive": False})
                continue
            try:
                out.append({"actor": m.index, "alive": True, **ray.get(m.handle.stats.remote(), timeout=60)})
            except Exception as err:  # noqa: BLE001 - a figure we could not read is reported as such
                out.append({"actor": m.index, "alive": False, "error": str(err)[:200]})
        return out

    def _pick(self) -> _Member:
        live = [m for m in self.members if m.alive]
        if not live:
            raise SimulationError("every Ray actor of the pool died; see the Ray logs (/tmp/ray/session_latest/logs)")
        return min(live, key=lambda m: (m.queued, m.index))

    async def _client_round(self, client_id: str) -> None:
        import ray

        driver, c = self.driver, self.clients[client_id]
        c.have, sent, round_id = await driver.download(client_id, c.have, c.holds_seeds)
        c.holds_seeds = c.holds_seeds or sent
        while True:
            m = self._pick()
            stream, snapshot, target = await driver.actor_streams(client_id, m.have, m.holds_seeds)
            m.have, m.holds_seeds, m.queued = target, True, m.queued + 1
            try:
                answer = await m.handle.round.remote(client_id, stream, snapshot)
            except ray.exceptions.RayActorError as err:
                if m.alive:
                    m.alive = False
                    log.warning("actor_lost", actor=m.index, round=round_id, reason=str(err).splitlines()[0][:200])
                log.warning("client_round_rerun", client=client_id, round=round_id, lost_actor=m.index)
                continue
            except ray.exceptions.RayTaskError as err:
                raise SimulationError(f"{client_id}, round {round_id}: {err.cause if err.cause else err}") from None
            finally:
                m.queued -= 1
            break
        if "left" in answer:  # as a distributed client would: it leaves rather than train past its budget
            log.warning("dp_sgd_budget_reached", client=client_id, round=round_id, reason=answer["left"])
            await self.port.leave(client_id, "dp-sgd budget reached")
            self._check_round_goes_on(round_id, f"{client_id} reached its DP-SGD budget: {answer['left']}")
            return
        try:
            await driver.submit(client_id, answer["requests"])
        except RoundError as err:  # the service would answer with this status; the run goes on without it
            log.warning("update_refused", client=client_id, round=round_id, code=err.code, reason=str(err))
            await self.port.drop(client_id)
            self._check_round_goes_on(round_id, f"the last update was refused with {err.code}: {err}")
            return
        log.info("client_trained", client=client_id, round=round_id, actor=m.index, loss=round(answer["loss"], 4))

    def _check_round_goes_on(self, round_id: int, why: str) -> None:
        if self.port.nobody_left(round_id):
            raise SimulationError(f"round {round_id}: no selected client is left to submit; {why}")
