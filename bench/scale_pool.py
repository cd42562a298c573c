"""The scale bench's clients: lightweight synthetic FedKRSO clients, many to an asyncio process.

Each pool process (``pool_process``, started with ``spawn`` by ``bench/scale.py``) joins its
share of the N clients, one gRPC channel and TCP connection each, long-polls ``StartRound`` for
each and submits a valid synthetic update per selected client: ``acc.{k}.{module}`` (d_m, rank)
for the seeds the client's interval RNG draws (the ``seed_choices`` a real client uses) plus
every ``dense.{param}``, with the right ``update_digest`` and ``num_samples``. No client loads
a model or trains.

An update depends only on the round and the seed indices a client drew, so each distinct one is
built and encoded once (``UpdateFactory``) and its messages are shared by every client that
sends it: the pool shares the cores with the server, and drawing, hashing and encoding the
same tensors for every client made the pool, not the server, what a run measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

# Each pool client on its own TCP connection, as separate client processes are: channels of one
# process with the same target and options otherwise share one connection (gRPC's global
# subchannel pool), and past ``server.max_streams_per_connection`` concurrent long-polls the
# rest wait in the pool, so no round opens until polls time out (the regression of issue 26).
POOL_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
POLL_S = 30.0
JOINS_AT_ONCE = 256  # per pool process: clients arrive over seconds, not in one SYN storm


@dataclass(frozen=True)
class Update:
    """One encoded synthetic update: what its header needs and its tensor messages."""

    seeds_used: list[int]
    digest: str
    num_tensors: int
    messages: list  # SubmitUpdateRequest(tensors=...), shared by every client that sends it


class UpdateFactory:
    """Valid synthetic FedKRSO updates for the run: spec from the tiny model, loaded once."""

    def __init__(self, config: Path):
        from ..common.config import load_config
        from ..common.methods.fedkrso import FedKRSO
        from ..common.models import load_model
        from ..common.tensors import DTYPES

        self.cfg = load_config(config)
        # FedKRSO itself, not any method: the update carries the accumulators of the seeds a
        # client's interval RNG draws (``seed_choices``), which only FedKRSO has
        self.method = FedKRSO(self.cfg.method, self.cfg.run.seed)
        m = self.cfg.model
        self.model = load_model(m.name, m.task, m.num_labels, self.cfg.run.seed)
        self.method.prepare(self.model)
        self.dtype = DTYPES[self.cfg.method.wire_dtype]
        self.chunk = self.cfg.server.max_chunk_bytes  # what Join announces
        self._built: dict[tuple[int, tuple[int, ...]], Update] = {}

    def update(self, round_id: int, seeds: list[int], name: str) -> Update:
        """The update client ``name`` sends in ``round_id``: built on first use, then shared."""
        used = tuple(sorted(set(self.method.seed_choices(round_id, name))))
        key = (round_id, used)
        if key not in self._built:
            self._built = {k: u for k, u in self._built.items() if k[0] == round_id}  # older rounds: done
            self._built[key] = self._build(round_id, seeds, used)
        return self._built[key]

    def _build(self, round_id: int, seeds: list[int], used: tuple[int, ...]) -> Update:
        import torch

        from fedkrso.v1 import coordinator_pb2 as pb

        from ..common.subspace import stable_seed
        from ..common.wire import tensor_batches, update_digest

        spec = self.method.update_spec(self.model, seeds)
        required = self.method.required_names(self.model, seeds)
        g = torch.Generator().manual_seed(stable_seed("scale-bench", round_id, *used))
        tensors = {n: (torch.randn(shape, generator=g) * 1e-3).to(self.dtype) for n, shape in spec.items()
                   if n in required or any(n.startswith(f"acc.{k}.") for k in used)}
        messages = [pb.SubmitUpdateRequest(tensors=b) for b in tensor_batches(tensors, None, self.chunk)]
        return Update([seeds[k] for k in used], update_digest(tensors), len(tensors), messages)


@dataclass
class PoolStats:
    """What one pool process saw; times are ``time.monotonic()`` (one clock for every process)."""

    joined: int = 0
    submitted: int = 0
    payload: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    first_train: dict[int, float] = field(default_factory=dict)  # round -> first TRAIN header seen
    last_ack: float = 0.0
    leave_refused: dict[str, int] = field(default_factory=dict)
    final_poll_cut: int = 0


@dataclass
class Gates:
    """What a pool process lets its clients do at once: Join (open a connection), upload."""

    join: asyncio.Semaphore
    upload: asyncio.Semaphore | contextlib.nullcontext


async def client_task(i: int, target: str, factory: UpdateFactory, stats: PoolStats, gates: Gates,
                      total_rounds: int):
    """Client ``i``: join, then poll, train (submit a synthetic update) and poll again until the
    run is finished; an RPC that fails is raised naming the client and the call."""
    import grpc

    name = f"pool{i:05d}"
    state = {"call": "Join"}
    try:
        await _client_rounds(i, name, target, factory, stats, gates, total_rounds, state)
    except grpc.aio.AioRpcError as err:
        raise RuntimeError(f"{name}: {state['call']} failed: {err.code().name} {err.details()!r}") from None


async def _client_rounds(i: int, name: str, target: str, factory: UpdateFactory, stats: PoolStats, gates: Gates,
                         total_rounds: int, state: dict) -> None:
    import grpc

    from fedkrso.v1 import coordinator_pb2 as pb
    from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

    from ..common.protocol import TOKEN_HEADER, bearer

    samples = 10 + i % 7
    async with grpc.aio.insecure_channel(target, options=POOL_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        async with gates.join:  # the connection and its handshake are made by the first call
            call = stub.Join(pb.JoinRequest(name=name, num_samples=samples, software_version="bench"))
            resp = await call
            md = bearer(dict(await call.initial_metadata()).get(TOKEN_HEADER))
        run_id = resp.run_id
        stats.joined += 1
        have = int(resp.current_round)
        last_submitted = -1
        while True:
            header = None
            state["call"] = "StartRound"
            try:
                async for msg in stub.StartRound(pb.StartRoundRequest(run_id=run_id, have_round=have,
                                                                      wait_seconds=POLL_S), metadata=md):
                    if msg.WhichOneof("body") == "header":
                        header = msg.header
            except grpc.aio.AioRpcError as err:
                # after the last round the server stops once every client was *sent* FINISHED
                # (2 s grace): a final poll still streaming may be cut off. Not an error here.
                if last_submitted == total_rounds - 1 and err.code() in (
                        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    stats.final_poll_cut += 1
                    return
                raise
            if header.status == pb.ROUND_STATUS_WAIT:
                continue
            have = int(header.target_round)  # deltas are not applied: no model here
            if header.status == pb.ROUND_STATUS_FINISHED:
                try:  # the server may already be stopping once every client has seen FINISHED
                    await stub.Leave(pb.LeaveRequest(run_id=run_id, reason="finished"), metadata=md)
                except grpc.aio.AioRpcError as err:
                    stats.leave_refused[err.code().name] = stats.leave_refused.get(err.code().name, 0) + 1
                return
            rnd = int(header.round)
            stats.first_train.setdefault(rnd, time.monotonic())
            update = factory.update(rnd, list(header.seeds), name)
            uh = pb.UpdateHeader(run_id=run_id, round=rnd, num_samples=samples, loss=1.0, steps=4,
                                 seeds_used=update.seeds_used, num_tensors=update.num_tensors,
                                 update_digest=update.digest)

            def requests(uh=uh, update=update):
                yield pb.SubmitUpdateRequest(header=uh)
                yield from update.messages

            state["call"] = "SubmitUpdate"
            async with gates.upload:
                r = await stub.SubmitUpdate(requests(), metadata=md)
            if not r.accepted:
                raise RuntimeError(f"{name}: update for round {rnd} not accepted")
            stats.submitted += 1
            stats.last_ack = time.monotonic()
            last_submitted = rnd
            stats.payload = r.payload_bytes


async def run_pool(target: str, ids: range, factory: UpdateFactory, rounds: int, max_inflight: int = 0) -> PoolStats:
    """Clients ``ids`` through every round, all at once; the first client to fail fails the
    pool, naming itself and the RPC that failed."""
    gates = Gates(asyncio.Semaphore(JOINS_AT_ONCE),
                  asyncio.Semaphore(max_inflight) if max_inflight > 0 else contextlib.nullcontext())
    stats = PoolStats()
    await asyncio.gather(*(client_task(i, target, factory, stats, gates, rounds) for i in ids))
    stats.ended = time.monotonic()
    return stats


def pool_process(target: str, ids: range, config: Path, rounds: int, max_inflight: int, timeout: float,
                 results) -> None:
    """A pool process: load the spec, run clients ``ids``, put its ``PoolStats`` (or the
    error, as text) on ``results``."""
    import torch

    torch.set_num_threads(1)
    try:
        factory = UpdateFactory(config)
        results.put(asyncio.run(asyncio.wait_for(run_pool(target, ids, factory, rounds, max_inflight), timeout)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put(f"{type(err).__name__}: {err}")
