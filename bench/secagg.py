"""Secure aggregation's cost per round, side by side with the same round without it.

``python -m fedkrso.bench.secagg --clients 10,100 --shape minilm``

One process: a real ``Coordinator`` behind the real gRPC service on loopback (its own asyncio
loop in a thread), and N client threads, each with its own channel, that join, long-poll
until selected and submit one synthetic FedKRSO update of the model's shape (``--shape``: the
tiny test BERT, or MiniLM-L6 with K=4, r=8: 663,552 accumulator values plus the 148,997
dense ones): plainly (SubmitUpdate) or through the whole SecAgg protocol (real X25519,
Shamir, ChaCha20 masks, fixed point). No client trains: the figures are the protocol's.

Per N and mode it prints and returns: the round's wall seconds (round open to round closed,
the coordinator's ``round_seconds``), the uplink payload and message bytes per client, the
key-exchange and unmasking bytes per client (requests + responses), each client's masking
CPU seconds (its thread's CPU time: encoding, the self mask and one pairwise mask per other
client; mean, max) and the server's unmasking seconds. All clients share this machine's cores
with the server, so the round's wall seconds include every client's masking work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

from ..client.secagg import SecureSubmission
from ..common.config import parse_config
from ..common.models import build_tiny
from ..common.participant import PreparedUpdate
from ..common.protocol import TOKEN_HEADER
from ..common.wire import tensor_batches, update_digest
from ..server.coordinator import Coordinator
from ..server.service import run_server

CHUNK = 1 << 20


def config(model: str, out: Path, n: int, secure: bool) -> dict:
    return {"run": {"name": f"secagg{n}{'s' if secure else 'p'}", "seed": 0, "output_dir": str(out)},
            "model": {"name": model, "num_labels": 2, "max_length": 32},
            "method": {"name": "fedkrso", "k": 4, "rank": 8},
            "rounds": {"total": 1, "clients_per_round": n, "min_clients": n, "deadline_s": 900,
                       "start_timeout_s": 900},
            "training": {"weighting": "uniform"},
            "server": {"listen": "127.0.0.1:0", "max_concurrent_uploads": 256,
                       "join_burst": max(32, n)},  # every client joins from one address
            "privacy": {"secure_aggregation": {"enabled": secure, "phase_timeout_s": 900}}}


class Server(threading.Thread):
    def __init__(self, cfg: dict):
        super().__init__(daemon=True)
        self.cfg = parse_config(cfg)
        self.ready, self.done = threading.Event(), threading.Event()

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.coord = Coordinator(self.cfg, fresh=True)
        async with run_server(self.coord, "127.0.0.1:0", count_bytes=False) as port:
            self.port = port
            self.ready.set()
            await self.coord.run()
            await asyncio.sleep(0.5)  # let the last calls answer
        self.done.set()


def client(i: int, srv: Server, secure: bool, timings: list, errors: list) -> None:
    try:
        # its own connection, as a client process has: on gRPC's global subchannel pool every
        # thread's calls share one, and past server.max_streams_per_connection streams are refused
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.max_receive_message_length", 1 << 26),
                                                                          ("grpc.use_local_subchannel_pool", 1)])
        stub = pb_grpc.CoordinatorStub(channel)
        resp, call = stub.Join.with_call(pb.JoinRequest(name=f"c{i:03d}", num_samples=10), timeout=60)
        md = (("authorization", f"Bearer {dict(call.initial_metadata())[TOKEN_HEADER]}"),)
        while True:
            stream = stub.StartRound(pb.StartRoundRequest(run_id=resp.run_id, wait_seconds=20), metadata=md, timeout=120)
            header = next(iter(stream)).header
            if header.status == pb.ROUND_STATUS_TRAIN:
                break
        coord = srv.coord
        spec = coord.method.update_spec(coord.model, list(header.seeds))
        gen = torch.Generator().manual_seed(i)
        tensors = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in sorted(spec.items())}
        update = PreparedUpdate(round=int(header.round), tensors=tensors, digest=update_digest(tensors),
                                num_samples=10, loss=0.5, steps=1)
        if secure:
            sub = SecureSubmission(stub, lambda fn, arg, t: fn(arg, metadata=md, timeout=t), resp.run_id,
                                   resp.client_id, update, spec, srv.coord.cfg.privacy.secure_aggregation, 900)
            original = sub.masked_input

            def timed():  # this thread's CPU seconds: the client's own work, whatever else runs
                started = time.thread_time()
                out = original()
                timings.append(time.thread_time() - started)
                return out
            sub.masked_input = timed
            sub.run(0, CHUNK)
        else:
            stub.SubmitUpdate(update.requests(resp.run_id, 0, CHUNK), metadata=md, timeout=900)
        channel.close()
    except Exception as err:  # noqa: BLE001 - reported by the bench
        errors.append(f"c{i}: {err!r}")


def measure(model: str, n: int, secure: bool, workdir: Path) -> dict:
    srv = Server(config(model, workdir / f"{n}-{secure}", n, secure))
    srv.start()
    assert srv.ready.wait(300)
    timings, errors = [], []
    threads = [threading.Thread(target=client, args=(i, srv, secure, timings, errors)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    assert srv.done.wait(600) and not errors, errors[:3]
    row = srv.coord.metrics.rows()[-1]
    sa = row.get("secagg", {})
    return {"clients": n, "secure_aggregation": secure, "round_seconds": round(row["round_seconds"], 2),
            "uplink_payload_bytes_per_client": row["uplink_payload_bytes_per_client"],
            "uplink_message_bytes_per_client": row["uplink_message_bytes"] / max(len(row["clients"]), 1),
            "protocol_bytes_per_client": round(sa.get("protocol_bytes_per_client", 0)),
            "client_mask_cpu_seconds_mean": round(statistics.mean(timings), 3) if timings else 0.0,
            "client_mask_cpu_seconds_max": round(max(timings), 3) if timings else 0.0,
            "server_unmask_seconds": round(sa.get("unmask_seconds", 0.0), 3),
            "fixed_point_step": sa.get("fixed_point_step")}


def format_table(results: list[dict]) -> str:
    cols = ["clients", "secure_aggregation", "round_seconds", "uplink_payload_bytes_per_client",
            "uplink_message_bytes_per_client", "protocol_bytes_per_client", "client_mask_cpu_seconds_mean",
            "client_mask_cpu_seconds_max", "server_unmask_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedkrso.bench.secagg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="10,100", help="comma-separated client counts")
    p.add_argument("--shape", choices=["tiny", "minilm"], default="minilm")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from ..common import logs
    logs.configure("warning", True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = "minilm" if args.shape == "minilm" else str(build_tiny("bert", Path(tmp) / "tiny"))
        for n in (int(x) for x in args.clients.split(",")):
            for secure in (False, True):
                results.append(measure(model, n, secure, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
