"""What the transport alone costs per update: a grpc.aio server that does nothing but the scale
bench's message pattern, against the same pool, with and without the byte-counting relay.

``python -m fedkrso.bench.scale_floor --clients 1000``

Per update a client gets its round (a header, a delta header and one ~20 KB tensor batch, the
first round only the header) and streams an update of the same size (a header and one
batch). The server only counts: no validation, no aggregation, no persistence. Its CPU per
update is the floor under ``bench/scale.py``'s server CPU per update: what remains above it is
the coordinator's own work (docs/SCALE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time

import grpc

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc
from fedkrso.v1 import tensor_pb2

from .scale_pool import POOL_CHANNEL_OPTIONS

ROUNDS = 3
BATCH = tensor_pb2.TensorBatch(chunks=[
    tensor_pb2.TensorChunk(name=f"t{i}", dtype="float32", shape=[100], data=b"x" * 400) for i in range(50)])


class Counting(pb_grpc.CoordinatorServicer):
    """Rounds of ``n`` updates: a round ends when all ``n`` arrived."""

    def __init__(self, n: int):
        self.n, self.round, self.got = n, 0, 0
        self.opened = asyncio.Event()
        self.first_update: tuple[float, float] | None = None  # (monotonic, process CPU)

    async def StartRound(self, request, context):
        while self.round < request.have_round and self.round < ROUNDS:
            await self.opened.wait()
        if self.round >= ROUNDS:
            yield pb.StartRoundResponse(header=pb.RoundHeader(status=pb.ROUND_STATUS_FINISHED))
            return
        yield pb.StartRoundResponse(header=pb.RoundHeader(status=pb.ROUND_STATUS_TRAIN, round=self.round))
        if self.round:
            yield pb.StartRoundResponse(delta=pb.DeltaHeader(round=self.round - 1, num_tensors=50))
            yield pb.StartRoundResponse(tensors=BATCH)

    async def SubmitUpdate(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        self.first_update = self.first_update or (time.monotonic(), time.process_time())
        self.got += 1
        if self.got == self.n:
            self.got, self.round = 0, self.round + 1
            opened, self.opened = self.opened, asyncio.Event()
            opened.set()
        return pb.SubmitUpdateResponse(accepted=True)


async def serve(n: int, relay: bool, ports, results) -> None:
    from ..server.relay import CountingRelay, RelayLimits

    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 1 << 20),
                                      ("grpc.server.max_pending_requests_hard_limit", 1 << 20)])
    service = Counting(n)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if relay:
        limits = RelayLimits(max_connections=n + 64, max_per_peer=n + 64, max_pending=n + 64)
        port = await CountingRelay("127.0.0.1", 0, "127.0.0.1", port, limits).start()
    ports.put(port)
    while service.round < ROUNDS:
        await asyncio.sleep(0.05)
    t0, cpu0 = service.first_update
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    results.put({"clients": n, "relay": relay, "updates_per_s": n * ROUNDS / wall,
                 "server_cpu_ms_per_update": 1000 * cpu / (n * ROUNDS)})
    await asyncio.sleep(1.0)  # the last FINISHED headers go out
    await server.stop(1.0)


def server_process(n: int, relay: bool, ports, results) -> None:
    asyncio.run(serve(n, relay, ports, results))


async def client(target: str, joins: asyncio.Semaphore) -> None:
    async with grpc.aio.insecure_channel(target, options=POOL_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        async with joins:
            await channel.channel_ready()
        have = 0
        update = [pb.SubmitUpdateRequest(header=pb.UpdateHeader(round=0)), pb.SubmitUpdateRequest(tensors=BATCH)]
        while True:
            header = [m.header async for m in stub.StartRound(pb.StartRoundRequest(have_round=have))
                      if m.WhichOneof("body") == "header"][0]
            if header.status == pb.ROUND_STATUS_FINISHED:
                return
            have = header.round + 1
            await stub.SubmitUpdate(iter(update))


def run(n: int, relay: bool) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=server_process, args=(n, relay, ports, results), daemon=True)
    proc.start()
    target = f"127.0.0.1:{ports.get(timeout=60)}"
    cpu0 = time.process_time()

    async def pool() -> None:
        joins = asyncio.Semaphore(256)
        await asyncio.gather(*(client(target, joins) for _ in range(n)))

    asyncio.run(pool())
    result = results.get(timeout=60)
    proc.join(30)
    return {**result, "pool_cpu_ms_per_update": 1000 * (time.process_time() - cpu0) / (n * ROUNDS),
            "load_avg_before": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-bench-scale-floor", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    args = p.parse_args(argv)
    for relay in (False, True):
        print(json.dumps(run(args.clients, relay)), flush=True)


if __name__ == "__main__":
    main()
