"""Reliability of the coordinator against bad, duplicate, late and hostile traffic.

Everything runs against real gRPC servers on loopback: a ``Coordinator`` served in-process on
its own asyncio loop (a background thread) for the direct-RPC cases, and real server/client
processes (``bench.launch.Cluster``) for the crash and late-join cases. Every refusal is
checked for its precise gRPC status, and after each one the run must stay healthy: a valid
update is still accepted and the round closes.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from fedkrso.common.config import parse_config
from fedkrso.bench.launch import Cluster
from fedkrso.common.models import build_tiny
from fedkrso.common.wire import tensor_batches
from fedkrso.server.coordinator import Coordinator
from fedkrso.common.wire import update_digest
from fedkrso.server.service import run_server
from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc
from fedkrso.v1 import tensor_pb2

CHUNK = 1024  # the smallest chunk the config allows: tensors span several chunks
SC = grpc.StatusCode
METHOD = {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2, "lr": 1e-3}


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny("bert", tmp_path_factory.mktemp("rel_model") / "bert", num_labels=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny csv source partitioned into 3 shards (fedkrso-partition's own code path)."""
    from fedkrso.common.data.cli import main as partition

    root = tmp_path_factory.mktemp("rel_data")
    rng = random.Random(0)
    words = "good bad film plot actor boring great awful story music".split()
    rows = [(" ".join(rng.choice(words) for _ in range(8)), ("neg", "pos")[i % 2]) for i in range(90)]
    src = root / "d.csv"
    src.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    partition(["--source", f"csv:{src}", "--clients", "3", "--min-size", "10", "--out", str(root / "p")])
    return root / "p"


def config_dict(model: Path, out: Path, **rounds) -> dict:
    r = {"total": 50, "clients_per_round": 2, "min_clients": 2, "deadline_s": 60, "start_timeout_s": 60}
    r.update(rounds)
    return {
        "run": {"name": "rel", "seed": 1, "output_dir": str(out)},
        "model": {"name": str(model), "task": "sequence-classification", "num_labels": 2, "max_length": 32},
        "method": dict(METHOD),
        "rounds": r,
        "training": {"batch_size": 8},
        "server": {"listen": "127.0.0.1:0", "max_chunk_bytes": CHUNK},
    }


class InProcServer:
    """``run_server(Coordinator(cfg))`` plus ``coord.run()`` on a private loop in a thread."""

    def __init__(self, cfg_dict: dict):
        self.cfg = parse_config(cfg_dict)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        assert self.ready.wait(60), f"server did not start: {self.error!r}"
        assert self.error is None, self.error

    async def _serve(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            self.coord = Coordinator(self.cfg)
            async with run_server(self.coord, "127.0.0.1:0") as port:
                self.port = port
                self.run_task = asyncio.create_task(self.coord.run())
                self.ready.set()
                await self.stop_event.wait()
                self.run_task.cancel()
                try:
                    await self.run_task
                except BaseException:  # noqa: BLE001 - cancelled, or the run's own failure
                    pass
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.error = err
            self.ready.set()

    def alive(self) -> bool:
        return self.thread.is_alive() and not (self.run_task.done() and not self.coord.finished)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)


@pytest.fixture
def server_factory(tiny_model, tmp_path):
    started: list[InProcServer] = []

    def make(server: dict | None = None, **rounds) -> InProcServer:
        cfg = config_dict(tiny_model, tmp_path / f"out{len(started)}", **rounds)
        cfg["server"].update(server or {})
        srv = InProcServer(cfg)
        started.append(srv)
        return srv

    yield make
    for s in started:
        s.stop()


def wait_until(pred, timeout: float = 30.0, what: str = "condition") -> None:
    give_up = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Fake:
    """A hand-driven client speaking the real protocol over its own channel."""

    def __init__(self, srv: InProcServer, name: str, num_samples: int = 10):
        self.srv = srv
        self.channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        resp, call = self.stub.Join.with_call(pb.JoinRequest(name=name, num_samples=num_samples), timeout=10)
        self.token = dict(call.initial_metadata())["x-fedkrso-token"]
        self.md = (("authorization", f"Bearer {self.token}"),)
        self.run_id, self.client_id, self.num_samples = resp.run_id, resp.client_id, num_samples
        self.have = int(resp.current_round)

    def poll(self, wait: float = 2.0) -> pb.RoundHeader:
        stream = self.stub.StartRound(pb.StartRoundRequest(run_id=self.run_id, have_round=self.have,
                                                           wait_seconds=wait), metadata=self.md, timeout=(wait if 0 < wait < 60 else 0) + 30)
        header = None
        for msg in stream:
            if header is None and msg.WhichOneof("body") == "header":
                header = msg.header
        self.have = int(header.target_round)  # pretend the deltas were applied
        return header

    def wait_train(self, timeout: float = 30.0) -> pb.RoundHeader:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            h = self.poll()
            if h.status == pb.ROUND_STATUS_TRAIN:
                return h
            assert h.status == pb.ROUND_STATUS_WAIT, h
        raise AssertionError(f"{self.client_id} never selected")

    def update(self, header: pb.RoundHeader, value: float = 0.01) -> dict[str, torch.Tensor]:
        coord = self.srv.coord
        spec = coord.method.update_spec(coord.model, list(header.seeds))
        return {n: torch.full(s, value, dtype=torch.float32) for n, s in spec.items()}

    def messages(self, round_id: int, tensors, num_samples: int | None = None, run_id: str | None = None,
                 digest: str | None = None, dtype: str | None = None) -> list[pb.SubmitUpdateRequest]:
        header = pb.UpdateHeader(
            run_id=self.run_id if run_id is None else run_id, round=round_id,
            num_samples=self.num_samples if num_samples is None else num_samples, loss=0.5, steps=1,
            num_tensors=len(tensors), update_digest=update_digest(tensors) if digest is None else digest)
        return [pb.SubmitUpdateRequest(header=header)] + [
            pb.SubmitUpdateRequest(tensors=b) for b in tensor_batches(tensors, dtype, CHUNK)]

    def submit(self, msgs, md=None) -> pb.SubmitUpdateResponse:
        return self.stub.SubmitUpdate(iter(msgs), metadata=self.md if md is None else md, timeout=30)

    def close(self) -> None:
        self.channel.close()


def status_of(fn) -> tuple[SC, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def complete_round(srv: InProcServer, clients: list[Fake], headers: dict | None = None) -> dict:
    """Every client submits a valid update for the open round; the round must close with all of
    them. Returns the round's metrics row."""
    headers = headers or {c.client_id: c.wait_train() for c in clients}
    (round_id,) = {h.round for h in headers.values()}
    for c in clients:
        resp = c.submit(c.messages(round_id, c.update(headers[c.client_id])))
        assert resp.accepted and not resp.duplicate
    # the round closes (clients may go on) before its evaluation ends and its metrics row lands
    wait_until(lambda: any(r["round"] == round_id for r in srv.coord.metrics.rows()),
               what=f"round {round_id} to close and write its metrics row")
    row = srv.coord.metrics.rows()[-1]
    assert row["round"] == round_id and sorted(row["clients"]) == sorted(c.client_id for c in clients)
    assert srv.alive()
    return row


@pytest.fixture
def pair(server_factory, request):
    srv = server_factory(**getattr(request, "param", {}))
    a, b = Fake(srv, "alice"), Fake(srv, "bob", num_samples=30)
    yield srv, a, b
    a.close()
    b.close()


def test_snapshot_counts_as_downlink_and_old_deltas_leave_memory(server_factory):
    """A client behind the kept deltas (snapshot_after_rounds) gets a snapshot; its bytes are
    that round's downlink payload, and the server keeps only the last deltas in memory."""
    srv = server_factory({"snapshot_after_rounds": 1})
    a, b = Fake(srv, "alice"), Fake(srv, "bob", num_samples=30)
    try:
        complete_round(srv, [a, b])
        complete_round(srv, [a, b])
        assert sorted(srv.coord.deltas) == [1]  # round 0's delta left memory (it is on disk)
        a.have = 0  # as if alice had missed both rounds
        ha, hb = a.wait_train(), b.wait_train()
        assert ha.catch_up == pb.CATCH_UP_SNAPSHOT and ha.snapshot_round == 2
        got = sum(len(c.data) for m in a.stub.GetSnapshot(
            pb.GetSnapshotRequest(run_id=a.run_id, round=2), metadata=a.md, timeout=30)
            if m.WhichOneof("body") == "tensors" for c in m.tensors.chunks)
        assert got == srv.coord.state_bytes
        row = complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})
        assert row["per_client"]["alice"]["downlink_payload_bytes"] >= srv.coord.state_bytes
        assert row["per_client"]["bob"]["downlink_payload_bytes"] < srv.coord.state_bytes
    finally:
        a.close()
        b.close()


# -- header / identity refusals ----------------------------------------------------------------
def test_wrong_run_id(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    code, msg = status_of(lambda: a.submit(a.messages(ha.round, a.update(ha), run_id="other-run")))
    assert code == SC.FAILED_PRECONDITION and "other-run" in msg
    code, _ = status_of(lambda: list(a.stub.StartRound(pb.StartRoundRequest(run_id="x", wait_seconds=0),
                                                       metadata=a.md, timeout=10)))
    assert code == SC.FAILED_PRECONDITION
    code, _ = status_of(lambda: list(a.stub.GetSnapshot(pb.GetSnapshotRequest(run_id="x"), metadata=a.md,
                                                        timeout=10)))
    assert code == SC.FAILED_PRECONDITION
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


def test_stale_and_future_round(pair):
    srv, a, b = pair
    h0 = {c.client_id: c.wait_train() for c in (a, b)}
    old = a.update(h0[a.client_id])
    complete_round(srv, [a, b], h0)
    h1 = {c.client_id: c.wait_train() for c in (a, b)}
    assert h1[a.client_id].round == 1
    code, msg = status_of(lambda: a.submit(a.messages(0, a.update(h0[a.client_id], 0.5))))
    assert code == SC.FAILED_PRECONDITION and "stale" in msg
    code, msg = status_of(lambda: a.submit(a.messages(7, old)))
    assert code == SC.FAILED_PRECONDITION and "not open" in msg
    complete_round(srv, [a, b], h1)


def test_resubmission_after_round_closed_is_duplicate(pair):
    """A client whose response was lost retries after its update closed the round: same digest ->
    duplicate (not a stale-round error); a different update for the closed round -> stale."""
    srv, a, b = pair
    h0 = {c.client_id: c.wait_train() for c in (a, b)}
    msgs = a.messages(0, a.update(h0[a.client_id]))
    row = complete_round(srv, [a, b], h0)
    assert len(row["clients"]) == 2
    resp = a.submit(msgs)
    assert resp.accepted and resp.duplicate
    code, _ = status_of(lambda: a.submit(a.messages(0, a.update(h0[a.client_id], 0.7))))
    assert code == SC.FAILED_PRECONDITION
    complete_round(srv, [a, b])


def test_not_selected_client(server_factory):
    srv = server_factory()
    clients = [Fake(srv, f"c{i}") for i in range(3)]
    wait_until(lambda: srv.coord.current is not None, what="round 0")
    selected = [c for c in clients if c.client_id in srv.coord.current.selected]
    (outsider,) = [c for c in clients if c not in selected]
    assert outsider.poll(wait=0.3).status == pb.ROUND_STATUS_WAIT
    headers = {c.client_id: c.wait_train() for c in selected}
    fake_header = headers[selected[0].client_id]
    code, msg = status_of(lambda: outsider.submit(outsider.messages(0, outsider.update(fake_header))))
    assert code == SC.PERMISSION_DENIED and "not selected" in msg
    complete_round(srv, selected, headers)


def test_unknown_and_missing_token(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    msgs = a.messages(ha.round, a.update(ha))
    for md in [(), (("authorization", "Bearer nope"),), (("authorization", a.token),)]:
        code, _ = status_of(lambda: a.submit(msgs, md=md))
        assert code == SC.UNAUTHENTICATED
        code, _ = status_of(lambda: a.stub.Heartbeat(pb.HeartbeatRequest(run_id=a.run_id), metadata=md, timeout=10))
        assert code == SC.UNAUTHENTICATED
        code, _ = status_of(lambda: list(a.stub.StartRound(pb.StartRoundRequest(run_id=a.run_id), metadata=md,
                                                           timeout=10)))
        assert code == SC.UNAUTHENTICATED
        code, _ = status_of(lambda: a.stub.Leave(pb.LeaveRequest(run_id=a.run_id), metadata=md, timeout=10))
        assert code == SC.UNAUTHENTICATED
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


def test_num_samples_zero_and_above_declared(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    t = a.update(ha)
    for n in (0, a.num_samples + 1):
        code, msg = status_of(lambda: a.submit(a.messages(ha.round, t, num_samples=n)))
        assert code == SC.INVALID_ARGUMENT and "num_samples" in msg
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


# -- malformed tensor streams --------------------------------------------------------------------
def _split_chunk(msgs):
    """(message index, chunk index) of a chunk at a non-zero offset."""
    for i, m in enumerate(msgs[1:], 1):
        for j, c in enumerate(m.tensors.chunks):
            if c.offset > 0:
                return i, j
    raise AssertionError("no tensor spans two chunks")


def bad_name(a, h):
    t = a.update(h)
    name = sorted(t)[0]
    t["bogus." + name] = t.pop(name)
    return a.messages(h.round, t), "unexpected tensor"


def extra_name(a, h):
    t = a.update(h)
    t["bogus.extra"] = torch.zeros(3)
    return a.messages(h.round, t), "unexpected tensor"


def bad_shape(a, h):
    t = a.update(h)
    name = sorted(t)[0]
    t[name] = torch.zeros(*t[name].shape, 1)
    return a.messages(h.round, t), "shape"


def bad_dtype(a, h):
    return a.messages(h.round, a.update(h), dtype="bfloat16"), "dtype"


def unknown_dtype(a, h):
    msgs = a.messages(h.round, a.update(h))
    msgs[1].tensors.chunks[0].dtype = "float128"
    return msgs, "dtype"


def truncated(a, h):
    msgs = a.messages(h.round, a.update(h))
    last = msgs[-1].tensors.chunks[-1]
    last.data = last.data[:-4]
    return msgs, "truncated"


def dropped_chunk(a, h):
    msgs = a.messages(h.round, a.update(h))
    i, j = _split_chunk(msgs)
    msgs[i].tensors.chunks[j].data = b""  # same offsets, fewer bytes
    return msgs, ""


def extra_bytes(a, h):
    msgs = a.messages(h.round, a.update(h))
    msgs[-1].tensors.chunks[-1].data += b"\0\0\0\0"
    return msgs, "more bytes"


def extra_chunk(a, h):
    msgs = a.messages(h.round, a.update(h))
    c = msgs[-1].tensors.chunks[-1]
    msgs.append(pb.SubmitUpdateRequest(tensors=tensor_pb2.TensorBatch(chunks=[tensor_pb2.TensorChunk(
        name=c.name, offset=c.offset + len(c.data), data=b"\0" * 8)])))
    return msgs, "more bytes"


def bad_offset(a, h):
    msgs = a.messages(h.round, a.update(h))
    i, j = _split_chunk(msgs)
    msgs[i].tensors.chunks[j].offset += 4
    return msgs, "offset"


def repeated_tensor(a, h):
    msgs = a.messages(h.round, a.update(h))
    msgs.append(pb.SubmitUpdateRequest(tensors=msgs[1].tensors))
    return msgs, "twice"


def non_finite(value):
    def case(a, h):
        t = a.update(h)
        t[sorted(t)[-1]].view(-1)[3] = value
        return a.messages(h.round, t), "non-finite"
    case.__name__ = f"non_finite_{value}"
    return case


def header_missing(a, h):
    return a.messages(h.round, a.update(h))[1:], "header"


def header_after_tensors(a, h):
    msgs = a.messages(h.round, a.update(h))
    return msgs[1:2] + msgs[:1] + msgs[2:], "header"


def second_header(a, h):
    msgs = a.messages(h.round, a.update(h))
    return msgs[:2] + msgs[:1] + msgs[2:], "only tensor batches"


def empty_stream(a, h):
    return [], "empty"


def digest_mismatch(a, h):
    t = a.update(h)
    return a.messages(h.round, t, digest=update_digest(a.update(h, 0.02))), "digest"


def wrong_tensor_count(a, h):
    msgs = a.messages(h.round, a.update(h))
    msgs[0].header.num_tensors += 1
    return msgs, "announced"


def missing_required(a, h):
    t = a.update(h)
    required = a.srv.coord.method.required_names(a.srv.coord.model, list(h.seeds))
    del t[sorted(required)[0]]
    return a.messages(h.round, t), "missing"


WIRE_CASES = [bad_name, extra_name, bad_shape, bad_dtype, unknown_dtype, truncated, dropped_chunk, extra_bytes,
              extra_chunk, bad_offset, repeated_tensor, non_finite(float("nan")), non_finite(float("inf")),
              non_finite(float("-inf")), header_missing, header_after_tensors, second_header, empty_stream,
              digest_mismatch, wrong_tensor_count, missing_required]


@pytest.mark.parametrize("case", WIRE_CASES, ids=lambda c: c.__name__)
def test_malformed_update_refused_and_round_still_completes(pair, case):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    msgs, needle = case(a, ha)
    code, msg = status_of(lambda: a.submit(msgs))
    assert code == SC.INVALID_ARGUMENT, (code, msg)
    assert needle in msg, msg
    assert srv.coord.current is not None and not srv.coord.current.submissions  # nothing changed
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


@pytest.mark.parametrize("pair", [{"server": {"max_update_norm": 1.0}}], indirect=True)
def test_update_norm_bound(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    big = a.update(ha, 1.0)  # norm = sqrt(numel) >> 1
    code, msg = status_of(lambda: a.submit(a.messages(ha.round, big)))
    assert code == SC.INVALID_ARGUMENT and "max_update_norm" in msg
    small = a.update(ha, 1e-3)
    assert math.sqrt(sum(float(t.square().sum()) for t in small.values())) < 1.0
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})  # values 0.01: norm < 1


# -- duplicates -------------------------------------------------------------------------------------
def test_duplicate_counted_once_and_different_update_refused(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    ta, tb = a.update(ha, 0.25), b.update(hb, 1.0)
    first = a.submit(a.messages(0, ta))
    assert first.accepted and not first.duplicate and first.payload_bytes > 0
    again = a.submit(a.messages(0, ta))
    assert again.accepted and again.duplicate
    code, _ = status_of(lambda: a.submit(a.messages(0, a.update(ha, 0.5))))
    assert code == SC.ALREADY_EXISTS
    assert b.submit(b.messages(0, tb)).accepted
    wait_until(lambda: len(srv.coord.metrics.rows()) == 1, what="round 0 to close and write its row")
    row = srv.coord.metrics.rows()[-1]
    assert sorted(row["clients"]) == sorted([a.client_id, b.client_id])
    # weighted mean over samples: a counted once -> (10*0.25 + 30*1.0) / 40
    want = (a.num_samples * 0.25 + b.num_samples * 1.0) / (a.num_samples + b.num_samples)
    for name, t in srv.coord.deltas[0].tensors.items():
        assert torch.allclose(t.float(), torch.full_like(t.float(), want)), name
    complete_round(srv, [a, b])


def test_concurrent_identical_submissions_fold_once(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    msgs = a.messages(0, a.update(ha, 0.25))
    results: list = []

    def go():
        try:
            results.append(a.submit(msgs))
        except grpc.RpcError as err:
            results.append(err.code())

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, pb.SubmitUpdateResponse) and r.accepted for r in results), results
    assert sum(not r.duplicate for r in results) == 1, results
    assert b.submit(b.messages(0, b.update(hb, 1.0))).accepted
    wait_until(lambda: srv.coord.completed == 1, what="round 0 to close")
    want = (a.num_samples * 0.25 + b.num_samples * 1.0) / (a.num_samples + b.num_samples)
    for name, t in srv.coord.deltas[0].tensors.items():
        assert torch.allclose(t.float(), torch.full_like(t.float(), want)), name
    complete_round(srv, [a, b])


def test_non_finite_wait_seconds_does_not_hang_the_server(pair):
    """wait_seconds=NaN used to reach asyncio's timer heap and stall the whole event loop."""
    srv, a, b = pair
    complete_round(srv, [a, b])
    c = Fake(srv, "carol")  # a and b hold round 1's TRAIN; carol is not selected
    for wait in (float("nan"), -1.0):
        started = time.monotonic()
        assert c.poll(wait).status == pb.ROUND_STATUS_WAIT
        assert time.monotonic() - started < 5
    code, _ = status_of(lambda: list(c.stub.StartRound(pb.StartRoundRequest(
        run_id=c.run_id, have_round=c.have, wait_seconds=float("inf")), metadata=c.md, timeout=1.5)))
    assert code == SC.DEADLINE_EXCEEDED  # held up to MAX_POLL_S, cut by the client's own deadline
    complete_round(srv, [a, b])


# -- fuzz ---------------------------------------------------------------------------------------------
RPCS = {
    "Join": "unary_unary", "Heartbeat": "unary_unary", "Leave": "unary_unary",
    "StartRound": "unary_stream", "GetSnapshot": "unary_stream", "SubmitUpdate": "stream_unary",
}


def _fuzz_payload(rng: random.Random, run_id: str) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:  # a valid message of the wrong type, or with mangled fields
        msg = rng.choice([
            pb.StartRoundRequest(run_id=run_id, have_round=rng.randrange(1 << 63), wait_seconds=rng.random()),
            pb.GetSnapshotRequest(run_id=run_id, round=rng.randrange(5)),
            pb.HeartbeatRequest(run_id=run_id, round=rng.randrange(1 << 40), phase="x" * rng.randrange(100)),
            pb.SubmitUpdateRequest(header=pb.UpdateHeader(run_id=run_id, round=rng.randrange(3),
                                                          num_samples=rng.randrange(1 << 62))),
            pb.SubmitUpdateRequest(tensors=tensor_pb2.TensorBatch(chunks=[tensor_pb2.TensorChunk(
                name="x", dtype=rng.choice(["float32", "int64", ""]), shape=[rng.randrange(1 << 40)] * 3,
                offset=rng.randrange(1 << 40), data=rng.randbytes(16))])),
        ])
        return msg.SerializeToString()
    if kind == 2:  # a valid message with bytes flipped
        raw = bytearray(pb.StartRoundRequest(run_id=run_id, wait_seconds=0.1).SerializeToString())
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return b"\x0a" + bytes([rng.randrange(128, 256)]) * 5 + rng.randbytes(8)  # runaway varint length


def test_fuzz_every_rpc(server_factory):
    srv = server_factory(clients_per_round=2, min_clients=1, deadline_s=4, start_timeout_s=1)
    valid = Fake(srv, "valid")
    fuzzer = Fake(srv, "fuzzer")  # a real identity, so fuzzing also reaches past authentication
    rng = random.Random(1234)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    codes: dict[str, set] = {}
    for i in range(200):
        rpc = rng.choice(sorted(RPCS))
        md = rng.choice([(), (("authorization", "Bearer garbage"),), fuzzer.md])
        if rpc == "Leave" and md == fuzzer.md:
            md = ()
        path = f"/fedkrso.v1.Coordinator/{rpc}"
        call = getattr(channel, RPCS[rpc])(path, request_serializer=None, response_deserializer=None)
        try:
            if RPCS[rpc] == "stream_unary":
                call(iter([_fuzz_payload(rng, valid.run_id) for _ in range(rng.randrange(0, 4))]),
                     metadata=md, timeout=5)
            elif RPCS[rpc] == "unary_stream":
                list(call(_fuzz_payload(rng, valid.run_id), metadata=md, timeout=5))
            else:
                call(_fuzz_payload(rng, valid.run_id), metadata=md, timeout=5)
            codes.setdefault(rpc, set()).add("OK")
        except grpc.RpcError as err:
            codes.setdefault(rpc, set()).add(err.code().name)
            # grpc.aio answers UNKNOWN when the request does not parse; any other UNKNOWN is a
            # handler that crashed
            if err.code() == SC.UNKNOWN:
                assert "DecodeError" in (err.details() or ""), (rpc, err.details())
    channel.close()
    assert srv.alive()
    allowed = {"OK", "UNAUTHENTICATED", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED", "UNKNOWN"}
    assert set().union(*codes.values()) <= allowed, codes
    # a valid client still completes a round (the fuzzer, if selected, is dropped at the deadline)
    h = valid.wait_train()
    resp = valid.submit(valid.messages(h.round, valid.update(h)))
    assert resp.accepted and not resp.duplicate
    wait_until(lambda: any(r["round"] == h.round for r in srv.coord.metrics.rows()), timeout=30,
               what="round after fuzzing")
    assert valid.client_id in srv.coord.metrics.rows()[-1]["clients"]
    print("fuzz status codes:", {k: sorted(v) for k, v in codes.items()})


# -- real processes ------------------------------------------------------------------------------------
def write_yaml(path: Path, model: Path, out: Path, **rounds) -> Path:
    cfg = config_dict(model, out, **rounds)
    cfg["server"]["max_chunk_bytes"] = 1 << 16
    path.write_text(yaml.safe_dump(cfg))
    return path


def metric_rows(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.slow
def test_client_killed_mid_round_quorum_closes(tmp_path, tiny_model, shards):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "round.yaml", tiny_model, out, total=3, clients_per_round=3, min_clients=2,
                     deadline_s=12, start_timeout_s=120)
    cluster = Cluster(tmp_path)
    try:
        cluster.start_server(cfg)
        procs = [cluster.start_client(shards / f"shard{i}", f"shard{i}") for i in range(3)]
        wait_until(lambda: len(metric_rows(out)) >= 1 or cluster.server.popen.poll() is not None, 120,
                   "round 0")
        victim = procs[2]
        victim.kill()
        assert cluster.wait(120) == 0, cluster.server.text()[-3000:]
        for p in procs[:2]:
            assert p.wait(60) == 0, p.text()[-3000:]
    finally:
        cluster.stop()
    rows = metric_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["clients"]) >= 2 for r in rows)
    victim_id = next(c for c in rows[0]["clients"] if c.endswith("shard2"))
    assert victim_id not in rows[-1]["clients"] and len(rows[-1]["clients"]) == 2
    assert rows[-1]["dropped"] == [victim_id]  # selected (still counted live), silent, recorded
    fp = (out / "final_state_fingerprint.txt").read_text().strip()
    for name in ("shard0", "shard1"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["state_fingerprint"] == fp


@pytest.mark.slow
def test_late_joiner_catches_up_to_final_state(tmp_path, tiny_model, shards):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "round.yaml", tiny_model, out, total=8, clients_per_round=2, min_clients=2,
                     deadline_s=60, start_timeout_s=120)
    data = yaml.safe_load(cfg.read_text())
    data["server"]["snapshot_after_rounds"] = 1  # a client 2+ rounds behind takes a snapshot
    cfg.write_text(yaml.safe_dump(data))
    cluster = Cluster(tmp_path)
    try:
        cluster.start_server(cfg)
        early = [cluster.start_client(shards / f"shard{i}", f"shard{i}") for i in range(2)]
        wait_until(lambda: len(metric_rows(out)) >= 2, 120, "two rounds")
        # freeze the early clients so the run cannot finish before the late one has joined
        for p in early:
            p.popen.send_signal(signal.SIGSTOP)
        late = cluster.start_client(shards / "shard2", "shard2")
        try:
            joined = lambda: any("client_joined" in line and "shard2" in line  # noqa: E731 - the id is the name
                                 for line in cluster.server.text().splitlines())
            wait_until(joined, 120, "the late join")
        finally:
            for p in early:
                p.popen.send_signal(signal.SIGCONT)
        assert cluster.wait(150) == 0, cluster.server.text()[-3000:]
        for p in [*early, late]:
            assert p.wait(60) == 0, p.text()[-3000:]
    finally:
        cluster.stop()
    fp = (out / "final_state_fingerprint.txt").read_text().strip()
    report = json.loads((tmp_path / "shard2.json").read_text())
    assert report["state_fingerprint"] == fp
    assert report["have_round"] == 8
    assert report["snapshots"] + report["deltas_applied"] >= 1
    for name in ("shard0", "shard1"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["state_fingerprint"] == fp
