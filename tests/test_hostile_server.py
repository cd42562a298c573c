"""A broken or malicious server against the real client process (issue 12, the client side).

``HostileCoordinator`` is a real gRPC server implementing the Coordinator service badly, one
way per row of ``ROWS``: an absurd run configuration, a giant string, headers or deltas or
snapshot bytes that never end, a billion deltas announced, seeds the run does not derive, a
delta of NaNs. A real ``fedkrso-client`` process joins it; it must refuse with a clear message
and exit 3, quickly, without allocating more than a client of the tiny model needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
import torch

from conftest import log_events, round_config
from fedkrso.bench.launch import child_env
from fedkrso.common.config import parse_config
from fedkrso.common.methods import build_method
from fedkrso.common.models import load_model, model_fingerprint
from fedkrso.common.wire import tensor_batches
from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc
from fedkrso.v1 import tensor_pb2

MB = 1 << 20


@dataclass
class Run:
    """The honest answers a hostile server starts from: the run's config and fingerprints."""

    config: dict
    model_fingerprint: str
    state_fingerprint: str
    method: object
    model: object

    def join(self, **changes) -> pb.JoinResponse:
        fields = {"client_id": "shard0", "run_id": "hostile-0123456789ab", "config_json": json.dumps(self.config),
                  "model_fingerprint": self.model_fingerprint, "current_round": 0, "max_chunk_bytes": 1 << 16}
        return pb.JoinResponse(**{**fields, **changes})

    def header(self, **changes) -> pb.RoundHeader:
        """A TRAIN header of round 0 that an honest client accepts, with ``changes``."""
        seeds = self.method.round_seeds(0)
        fields = {"status": pb.ROUND_STATUS_TRAIN, "round": 0, "seeds": seeds, "target_round": 0,
                  "plan_fingerprint": self.method.plan_fingerprint(self.model, seeds),
                  "state_fingerprint": self.state_fingerprint, "catch_up": pb.CATCH_UP_NONE}
        return pb.RoundHeader(**{**fields, **changes})


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Run:
    cfg = parse_config(round_config(tiny_bert, tmp_path_factory.mktemp("hostile")))
    method = build_method(cfg.method, cfg.run.seed)
    model = load_model(cfg.model.name, cfg.model.task, cfg.model.num_labels, cfg.run.seed)
    method.prepare(model)
    return Run(json.loads(cfg.model_dump_json()), model_fingerprint(model), method.state_fingerprint(model),
               method, model)


# -- the rows: what the server does wrong, and the reason the client must give -------------------
def forever(message) -> Iterator:
    while True:
        yield message


def absurd_config(r: Run) -> dict:
    config = {**r.config, "method": {**r.config["method"], "rank": 10**9}}
    return {"join": r.join(config_json=json.dumps(config))}


def headers_forever(r: Run) -> dict:
    return {"rounds": lambda: forever(pb.StartRoundResponse(header=r.header()))}


def billion_deltas(r: Run) -> dict:
    header = r.header(catch_up=pb.CATCH_UP_DELTAS, num_deltas=10**9, target_round=1, round=1,
                      seeds=r.method.round_seeds(1))
    return {"rounds": lambda: iter([pb.StartRoundResponse(header=header)])}


def endless_delta(r: Run) -> dict:
    """One delta announced, then tensor bytes without end for its first tensor."""
    seeds = r.method.round_seeds(0)
    header = r.header(catch_up=pb.CATCH_UP_DELTAS, num_deltas=1, target_round=1, round=1,
                      seeds=r.method.round_seeds(1))
    name, shape = sorted(r.method.update_spec(r.model, seeds).items())[0]

    def stream():
        yield pb.StartRoundResponse(header=header)
        yield pb.StartRoundResponse(delta=pb.DeltaHeader(round=0, seeds=seeds, num_tensors=1))
        offset = 0
        while True:
            chunk = tensor_pb2.TensorChunk(name=name, dtype="float32" if offset == 0 else "",
                                           shape=list(shape) if offset == 0 else [], offset=offset, data=b"\0" * 4096)
            offset += 4096
            yield pb.StartRoundResponse(tensors=tensor_pb2.TensorBatch(chunks=[chunk]))

    return {"rounds": stream}


def endless_snapshot(r: Run) -> dict:
    header = r.header(catch_up=pb.CATCH_UP_SNAPSHOT, snapshot_round=1, target_round=1, round=1,
                      seeds=r.method.round_seeds(1))
    snap = pb.RoundHeader(round=1, target_round=1, state_fingerprint=r.state_fingerprint)

    def snapshot():
        yield pb.GetSnapshotResponse(header=snap)
        yield from forever(pb.GetSnapshotResponse(tensors=tensor_pb2.TensorBatch()))

    return {"rounds": lambda: iter([pb.StartRoundResponse(header=header)]), "snapshot": snapshot}


def foreign_seeds(r: Run) -> dict:
    return {"rounds": lambda: iter([pb.StartRoundResponse(header=r.header(seeds=[1, 2]))])}


def nan_delta(r: Run) -> dict:
    seeds = r.method.round_seeds(0)
    header = r.header(catch_up=pb.CATCH_UP_DELTAS, num_deltas=1, target_round=1, round=1,
                      seeds=r.method.round_seeds(1))
    delta = {n: torch.full(s, float("nan")) for n, s in r.method.update_spec(r.model, seeds).items()}

    def stream():
        yield pb.StartRoundResponse(header=header)
        yield pb.StartRoundResponse(delta=pb.DeltaHeader(round=0, seeds=seeds, num_tensors=len(delta)))
        for batch in tensor_batches(delta, "float32", 1 << 16):
            yield pb.StartRoundResponse(tensors=batch)

    return {"rounds": stream}


ROWS: list[tuple[str, Callable[[Run], dict], str]] = [
    ("absurd config (rank 1e9)", absurd_config, "run configuration does not validate at 'method.fedkrso.rank'"),
    ("chunk size 0", lambda r: {"join": r.join(max_chunk_bytes=0)}, "max_chunk_bytes=0 is outside"),
    ("1 MB run id", lambda r: {"join": r.join(run_id="r" * MB)}, "invalid run id"),
    ("round headers forever", headers_forever, "unexpected 'header' message in the round stream"),
    ("a billion deltas announced", billion_deltas, "announced 1000000000 deltas; from round 0 to 1 takes 1"),
    ("delta bytes without end", endless_delta, "malformed round delta from the server"),
    ("snapshot without end", endless_snapshot, "snapshot of round 1 goes on past the state's size"),
    ("seeds the run does not derive", foreign_seeds, "seeds for round 0 are not the ones this run derives"),
    ("delta of NaNs", nan_delta, "has non-finite values"),
]


class HostileCoordinator(pb_grpc.CoordinatorServicer):
    def __init__(self, r: Run, behaviour: dict):
        self.r, self.b = r, behaviour

    def Join(self, request, context):
        return self.b.get("join") or self.r.join()

    def StartRound(self, request, context):
        yield from self.b["rounds"]()

    def GetSnapshot(self, request, context):
        yield from self.b["snapshot"]()

    def Heartbeat(self, request, context):
        return pb.HeartbeatResponse()

    def Leave(self, request, context):
        return pb.LeaveResponse()


def reap(pid: int, timeout: float):
    """(wait status, resource usage) of child ``pid`` once it exits; fails after ``timeout``."""
    give_up = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        assert time.monotonic() < give_up, f"the client did not exit within {timeout:g} s"
        time.sleep(0.05)


@pytest.mark.parametrize(("what", "behaviour", "reason"), ROWS, ids=[r[0] for r in ROWS])
def test_client_refuses_a_hostile_server_and_exits_3(what, behaviour, reason, run, shards, tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 8 * MB)])
    pb_grpc.add_CoordinatorServicer_to_server(HostileCoordinator(run, behaviour(run)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    log = tmp_path / "client.log"
    started = time.monotonic()
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedkrso.client.main", "--server", f"127.0.0.1:{port}",
                 "--data", str(shards / "shard0"), "--log-json", "--reconnect-seconds", "5"],
                stdout=out, stderr=subprocess.STDOUT, env=child_env())
            try:
                status, _ = reap(proc.pid, timeout=120)
            finally:
                proc.kill()
    finally:
        server.stop(0)
    text = log.read_text()
    assert os.waitstatus_to_exitcode(status) == 3, text[-3000:]
    (refusal,) = log_events(text, "client_refused")
    assert reason in refusal["reason"], refusal
    assert len(refusal["reason"]) < 400  # a clear, bounded message, whatever the server sent
    # the client's own high-water mark (wait4's ru_maxrss would also hold this test worker's RSS,
    # which the kernel folds into a child's at exec)
    peak = refusal["peak_rss_bytes"]
    assert peak < 1536 * MB, f"{what}: the client's peak RSS {peak // MB} MiB"
    print(f"\n{what}: exit 3 after {time.monotonic() - started:.1f} s, peak RSS {peak // MB} MiB: "
          f"{refusal['reason']}")
