"""Reliability of the coordinator against bad, duplicate, late and hostile traffic.

Everything runs against real gRPC servers on loopback: a ``Coordinator`` served in-process on
its own asyncio loop (a background thread) for the direct-RPC cases, and real server/client
processes (``bench.launch.Cluster``) for the crash and late-join cases. Every refusal is
checked for its precise gRPC status, and after each one the run must stay healthy: a valid
update is still accepted and the round closes.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import threading
from collections.abc import Callable

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError

from conftest import (InProcServer, finish_cluster, log_events, metric_rows, round_config, rpc_error, wait_until,
                      write_round_yaml)
from fedkrso.bench.launch import Cluster
from fedkrso.common.wire import tensor_batches, update_digest
from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc
from fedkrso.v1 import tensor_pb2

CHUNK = 1024  # the smallest chunk the config allows: tensors span several chunks
SC = grpc.StatusCode


@pytest.fixture
def make_server(server_factory) -> Callable[..., InProcServer]:
    """``make_server(server={...}, **rounds)``: an in-process server whose run is long enough
    (50 rounds) never to finish under a test, with ``CHUNK``-byte tensor messages."""

    def make(server: dict | None = None, training: dict | None = None, **rounds) -> InProcServer:
        return server_factory(rounds={"total": 50, **rounds}, server={"max_chunk_bytes": CHUNK, **(server or {})},
                              training=training or {})

    return make


class Fake:
    """A hand-driven client speaking the real protocol over its own channel."""

    def __init__(self, srv: InProcServer, name: str, num_samples: int = 10, eval_samples: int = 0):
        self.srv = srv
        self.channel = grpc.insecure_channel(srv.target)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        resp, call = self.stub.Join.with_call(pb.JoinRequest(name=name, num_samples=num_samples,
                                                             eval_samples=eval_samples), timeout=10)
        self.token = dict(call.initial_metadata())["x-fedkrso-token"]
        self.md = (("authorization", f"Bearer {self.token}"),)
        self.run_id, self.client_id, self.num_samples = resp.run_id, resp.client_id, num_samples
        self.have = int(resp.current_round)
        self.seeds_used: list[int] = []
        self.poll(wait=0)  # asks for work once, as a real client does: selectable from now on

    def poll(self, wait: float = 2.0) -> pb.RoundHeader:
        """One long-poll (``wait`` seconds at most, as the server reads it); the header."""
        stream = self.stub.StartRound(pb.StartRoundRequest(run_id=self.run_id, have_round=self.have, wait_seconds=wait),
                                      metadata=self.md, timeout=(wait if 0 < wait < 60 else 0) + 30)
        header = None
        for msg in stream:
            if header is None and msg.WhichOneof("body") == "header":
                header = msg.header
        self.have = int(header.target_round)  # pretend the deltas were applied
        return header

    def wait_train(self, timeout: float = 30.0) -> pb.RoundHeader:
        """Long-poll until selected for the open round; the TRAIN header."""
        headers: list[pb.RoundHeader] = []

        def selected() -> bool:
            headers.append(self.poll())
            assert headers[-1].status in (pb.ROUND_STATUS_WAIT, pb.ROUND_STATUS_TRAIN), headers[-1]
            return headers[-1].status == pb.ROUND_STATUS_TRAIN

        wait_until(selected, timeout, f"{self.client_id} to be selected")
        return headers[-1]

    def update(self, header: pb.RoundHeader, value: float = 0.01) -> dict[str, torch.Tensor]:
        """A valid update of round ``header``: every tensor this client may send (FedKRSO: the
        accumulators of the seeds its key draws), filled with ``value``."""
        coord = self.srv.coord
        seeds = list(header.seeds)
        spec = coord.method.update_spec(coord.model, seeds)
        allowed = coord.method.allowed_update_names(coord.model, seeds, header.round, self.client_id)
        self.seeds_used = [seeds[k] for k in sorted({int(n.split(".")[1]) for n in allowed if n.startswith("acc.")})]
        return {n: torch.full(s, value, dtype=torch.float32) for n, s in spec.items() if n in allowed}

    def messages(self, round_id: int, tensors, num_samples: int | None = None, run_id: str | None = None,
                 digest: str | None = None, dtype: str | None = None, eval_metrics=(),
                 eval_examples: int = 0) -> list[pb.SubmitUpdateRequest]:
        header = pb.UpdateHeader(
            run_id=self.run_id if run_id is None else run_id, round=round_id,
            num_samples=self.num_samples if num_samples is None else num_samples, loss=0.5, steps=1,
            seeds_used=self.seeds_used, num_tensors=len(tensors),
            update_digest=update_digest(tensors) if digest is None else digest,
            eval_metrics=[pb.EvalMetric(name=k, value=v) for k, v in eval_metrics],  # (name, value) pairs
            eval_examples=eval_examples)
        return [pb.SubmitUpdateRequest(header=header)] + [
            pb.SubmitUpdateRequest(tensors=b) for b in tensor_batches(tensors, dtype, CHUNK)]

    def submit(self, msgs, md=None) -> pb.SubmitUpdateResponse:
        return self.stub.SubmitUpdate(iter(msgs), metadata=self.md if md is None else md, timeout=30)

    def close(self) -> None:
        self.channel.close()


def weighted_mean(*updates: tuple[dict[str, torch.Tensor], float]) -> dict[str, torch.Tensor]:
    """The server's weighted mean of ``(tensors, weight)``: a tensor a client did not send
    (an accumulator of a seed it did not draw) counts as zero."""
    names = {n for t, _ in updates for n in t}
    total = sum(w for _, w in updates)
    return {n: sum(w * t[n].double() for t, w in updates if n in t) / total for n in names}


def assert_round_delta(srv: InProcServer, round_id: int, want: dict[str, torch.Tensor]) -> None:
    got = srv.coord.deltas[round_id].tensors
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert torch.allclose(t.double(), want[name], atol=1e-7), name


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
def pair(make_server, request):
    """A server (``make_server(**request.param)``) and two joined clients, alice (10 samples)
    and bob (30), weighted by samples without a share cap (test_hostile covers the cap)."""
    srv = make_server(**{"training": {"max_weight_share": None}, **getattr(request, "param", {})})
    a, b = Fake(srv, "alice"), Fake(srv, "bob", num_samples=30)
    yield srv, a, b
    a.close()
    b.close()


def test_snapshot_counts_as_downlink_and_old_deltas_leave_memory(make_server):
    """A client behind the kept deltas (snapshot_after_rounds) gets a snapshot; its bytes are
    that round's downlink payload, and the server keeps only the last deltas in memory."""
    srv = make_server({"snapshot_after_rounds": 1})
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
    code, msg = rpc_error(lambda: a.submit(a.messages(ha.round, a.update(ha), run_id="other-run")))
    assert code == SC.FAILED_PRECONDITION and "other-run" in msg
    code, msg = rpc_error(lambda: list(a.stub.StartRound(pb.StartRoundRequest(run_id="x", wait_seconds=0),
                                                         metadata=a.md, timeout=10)))
    assert code == SC.FAILED_PRECONDITION and "run 'x' is not this run" in msg
    code, msg = rpc_error(lambda: list(a.stub.GetSnapshot(pb.GetSnapshotRequest(run_id="x"), metadata=a.md,
                                                          timeout=10)))
    assert code == SC.FAILED_PRECONDITION and "run 'x' is not this run" in msg
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


def test_stale_and_future_round(pair):
    srv, a, b = pair
    h0 = {c.client_id: c.wait_train() for c in (a, b)}
    old = a.update(h0[a.client_id])
    complete_round(srv, [a, b], h0)
    h1 = {c.client_id: c.wait_train() for c in (a, b)}
    assert h1[a.client_id].round == 1
    code, msg = rpc_error(lambda: a.submit(a.messages(0, a.update(h0[a.client_id], 0.5))))
    assert code == SC.FAILED_PRECONDITION and "stale" in msg
    code, msg = rpc_error(lambda: a.submit(a.messages(7, old)))
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
    code, msg = rpc_error(lambda: a.submit(a.messages(0, a.update(h0[a.client_id], 0.7))))
    assert code == SC.FAILED_PRECONDITION and "stale update for round 0" in msg and "already accepted" in msg
    complete_round(srv, [a, b])


def test_not_selected_client(make_server):
    srv = make_server()
    clients = [Fake(srv, f"c{i}") for i in range(3)]
    wait_until(lambda: srv.coord.current is not None, what="round 0")
    selected = [c for c in clients if c.client_id in srv.coord.current.selected]
    (outsider,) = [c for c in clients if c not in selected]
    assert outsider.poll(wait=0.3).status == pb.ROUND_STATUS_WAIT
    headers = {c.client_id: c.wait_train() for c in selected}
    fake_header = headers[selected[0].client_id]
    code, msg = rpc_error(lambda: outsider.submit(outsider.messages(0, outsider.update(fake_header))))
    assert code == SC.PERMISSION_DENIED and "not selected" in msg
    complete_round(srv, selected, headers)


def test_unknown_and_missing_token(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    msgs = a.messages(ha.round, a.update(ha))
    calls = [lambda md: a.submit(msgs, md=md),
             lambda md: a.stub.Heartbeat(pb.HeartbeatRequest(run_id=a.run_id), metadata=md, timeout=10),
             lambda md: list(a.stub.StartRound(pb.StartRoundRequest(run_id=a.run_id), metadata=md, timeout=10)),
             lambda md: a.stub.Leave(pb.LeaveRequest(run_id=a.run_id), metadata=md, timeout=10)]
    cases = [((), "missing bearer token"), ((("authorization", "Bearer nope"),), "unknown or revoked token"),
             ((("authorization", a.token),), "missing bearer token")]  # the token without its scheme
    for md, reason in cases:
        for call in calls:
            assert rpc_error(lambda: call(md)) == (SC.UNAUTHENTICATED, reason)
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


def test_num_samples_zero_and_above_declared(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    t = a.update(ha)
    for n in (0, a.num_samples + 1):
        code, msg = rpc_error(lambda: a.submit(a.messages(ha.round, t, num_samples=n)))
        assert code == SC.INVALID_ARGUMENT and "num_samples" in msg
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


# -- malformed tensor streams --------------------------------------------------------------------
# Each case breaks one thing in an otherwise valid update and names the message the server's
# refusal must carry: a refusal for some other reason would not show that this check works.
def _chunk_positions(msgs) -> list[tuple[int, int]]:
    """(message index, chunk index) of every tensor chunk, in stream order."""
    return [(i, j) for i, m in enumerate(msgs[1:], 1) for j in range(len(m.tensors.chunks))]


def _split_chunk(msgs) -> tuple[int, int]:
    """Where the first chunk at a non-zero offset is (a tensor's continuation)."""
    for i, j in _chunk_positions(msgs):
        if msgs[i].tensors.chunks[j].offset > 0:
            return i, j
    raise AssertionError("no tensor spans two chunks")


def bad_name(a, h):
    t = a.update(h)
    name = sorted(t)[0]
    t["bogus." + name] = t.pop(name)
    return a.messages(h.round, t), f"unexpected tensor {'bogus.' + name!r}"


def extra_name(a, h):
    t = a.update(h)
    t["bogus.extra"] = torch.zeros(3)
    return a.messages(h.round, t), "unexpected tensor 'bogus.extra'"


def bad_shape(a, h):
    t = a.update(h)
    name = sorted(t)[0]
    want = list(t[name].shape)
    t[name] = torch.zeros(*want, 1)
    return a.messages(h.round, t), f"tensor {name!r} has shape {want + [1]}, expected {want}"


def bad_dtype(a, h):
    return a.messages(h.round, a.update(h), dtype="bfloat16"), "has dtype 'bfloat16', expected 'float32'"


def unknown_dtype(a, h):
    msgs = a.messages(h.round, a.update(h))
    msgs[1].tensors.chunks[0].dtype = "float128"
    return msgs, "has dtype 'float128', expected 'float32'"


def truncated(a, h):
    msgs = a.messages(h.round, a.update(h))
    last = msgs[-1].tensors.chunks[-1]
    size = last.offset + len(last.data)
    last.data = last.data[:-4]
    return msgs, f"tensor {last.name!r} truncated: {size - 4} of {size} bytes"


def dropped_chunk(a, h):
    msgs = a.messages(h.round, a.update(h))
    positions = _chunk_positions(msgs)
    i, j = positions[positions.index(_split_chunk(msgs)) - 1]  # a chunk its tensor continues after
    chunk = msgs[i].tensors.chunks[j]
    lost = len(chunk.data)
    chunk.data = b""  # the next chunk's offset now points past what arrived
    return msgs, f"tensor {chunk.name!r}: chunk offset {chunk.offset + lost}, expected {chunk.offset}"


def extra_bytes(a, h):
    msgs = a.messages(h.round, a.update(h))
    last = msgs[-1].tensors.chunks[-1]
    last.data += b"\0\0\0\0"
    return msgs, f"tensor {last.name!r}: more bytes than its shape holds"


def extra_chunk(a, h):
    msgs = a.messages(h.round, a.update(h))
    c = msgs[-1].tensors.chunks[-1]
    msgs.append(pb.SubmitUpdateRequest(tensors=tensor_pb2.TensorBatch(chunks=[tensor_pb2.TensorChunk(
        name=c.name, offset=c.offset + len(c.data), data=b"\0" * 8)])))
    return msgs, f"tensor {c.name!r}: more bytes than its shape holds"


def bad_offset(a, h):
    msgs = a.messages(h.round, a.update(h))
    i, j = _split_chunk(msgs)
    chunk = msgs[i].tensors.chunks[j]
    chunk.offset += 4
    return msgs, f"tensor {chunk.name!r}: chunk offset {chunk.offset}, expected {chunk.offset - 4}"


def repeated_tensor(a, h):
    msgs = a.messages(h.round, a.update(h))
    msgs.append(pb.SubmitUpdateRequest(tensors=msgs[1].tensors))
    return msgs, f"tensor {msgs[1].tensors.chunks[0].name!r} sent twice"


def non_finite(value):
    def case(a, h):
        t = a.update(h)
        name = sorted(t)[-1]
        t[name].view(-1)[3] = value
        return a.messages(h.round, t), f"tensor {name!r} has non-finite values"
    case.__name__ = f"non_finite_{value}"
    return case


def header_missing(a, h):
    return a.messages(h.round, a.update(h))[1:], "update stream must start with a header"


def header_after_tensors(a, h):
    msgs = a.messages(h.round, a.update(h))
    return msgs[1:2] + msgs[:1] + msgs[2:], "update stream must start with a header"


def second_header(a, h):
    msgs = a.messages(h.round, a.update(h))
    return msgs[:2] + msgs[:1] + msgs[2:], "only tensor batches may follow the header"


def empty_stream(a, h):
    return [], "empty update stream"


def digest_mismatch(a, h):
    t = a.update(h)
    return a.messages(h.round, t, digest=update_digest(a.update(h, 0.02))), "update_digest does not match"


def wrong_tensor_count(a, h):
    msgs = a.messages(h.round, a.update(h))
    n = msgs[0].header.num_tensors
    msgs[0].header.num_tensors += 1
    return msgs, f"header announced {n + 1} tensors, stream carried {n}"


def missing_required(a, h):
    t = a.update(h)
    required = a.srv.coord.method.required_names(a.srv.coord.model, list(h.seeds))
    name = sorted(required)[0]
    del t[name]
    return a.messages(h.round, t), f"missing tensors: [{name!r}]"


WIRE_CASES = [bad_name, extra_name, bad_shape, bad_dtype, unknown_dtype, truncated, dropped_chunk, extra_bytes,
              extra_chunk, bad_offset, repeated_tensor, non_finite(float("nan")), non_finite(float("inf")),
              non_finite(float("-inf")), header_missing, header_after_tensors, second_header, empty_stream,
              digest_mismatch, wrong_tensor_count, missing_required]


@pytest.mark.parametrize("case", WIRE_CASES, ids=lambda c: c.__name__)
def test_malformed_update_refused_and_round_still_completes(pair, case):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    msgs, needle = case(a, ha)
    code, msg = rpc_error(lambda: a.submit(msgs))
    assert code == SC.INVALID_ARGUMENT, (code, msg)
    assert needle in msg, msg
    assert srv.coord.current is not None and not srv.coord.current.submissions  # nothing changed
    complete_round(srv, [a, b], {a.client_id: ha, b.client_id: hb})


@pytest.mark.parametrize("pair", [{"server": {"max_update_norm": 1.0}}], indirect=True)
def test_update_norm_bound(pair):
    """Over ``server.max_update_norm`` an update is refused and leaves no trace; under it the
    same client's next update is accepted and is what the round aggregates."""
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    big, small = a.update(ha, 1.0), a.update(ha, 1e-3)
    size = lambda t: srv.coord.method.update_norm(srv.coord.model, list(ha.seeds), t)  # noqa: E731
    assert size(big) > 1.0 > size(small)
    code, msg = rpc_error(lambda: a.submit(a.messages(ha.round, big)))
    assert code == SC.INVALID_ARGUMENT, (code, msg)
    assert f"update norm {size(big):.6g} (of the weight change it implies) exceeds server.max_update_norm=1" in msg
    assert not srv.coord.current.submissions
    resp = a.submit(a.messages(ha.round, small))
    assert resp.accepted and not resp.duplicate
    assert b.submit(b.messages(hb.round, b.update(hb, 1e-3))).accepted
    wait_until(lambda: srv.coord.completed == 1, what="round 0 to close")
    # the mean of the two small updates only
    assert_round_delta(srv, 0, weighted_mean((small, a.num_samples), (b.update(hb, 1e-3), b.num_samples)))


# -- duplicates -------------------------------------------------------------------------------------
def test_duplicate_counted_once_and_different_update_refused(pair):
    srv, a, b = pair
    ha, hb = a.wait_train(), b.wait_train()
    ta, tb = a.update(ha, 0.25), b.update(hb, 1.0)
    first = a.submit(a.messages(0, ta))
    assert first.accepted and not first.duplicate and first.payload_bytes > 0
    again = a.submit(a.messages(0, ta))
    assert again.accepted and again.duplicate
    code, msg = rpc_error(lambda: a.submit(a.messages(0, a.update(ha, 0.5))))
    assert code == SC.ALREADY_EXISTS and "a different update for round 0 was already accepted" in msg
    assert b.submit(b.messages(0, tb)).accepted
    wait_until(lambda: len(srv.coord.metrics.rows()) == 1, what="round 0 to close and write its row")
    row = srv.coord.metrics.rows()[-1]
    assert sorted(row["clients"]) == sorted([a.client_id, b.client_id])
    # weighted mean over samples: a counted once -> (10*0.25 + 30*1.0) / 40 where both sent
    assert_round_delta(srv, 0, weighted_mean((ta, a.num_samples), (tb, b.num_samples)))
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
    assert len(results) == 4 and all(isinstance(r, pb.SubmitUpdateResponse) and r.accepted for r in results), results
    assert sum(not r.duplicate for r in results) == 1, results
    assert b.submit(b.messages(0, b.update(hb, 1.0))).accepted
    wait_until(lambda: srv.coord.completed == 1, what="round 0 to close")
    assert_round_delta(srv, 0, weighted_mean((a.update(ha, 0.25), a.num_samples), (b.update(hb, 1.0), b.num_samples)))
    complete_round(srv, [a, b])


@pytest.mark.parametrize("pair", [{"total": 2}], indirect=True)
def test_non_finite_wait_seconds_does_not_hang_the_server(pair):
    """wait_seconds=NaN used to reach asyncio's timer heap and stall the whole event loop. NaN
    and negative waits are answered at once, as a wait of 0; +inf is an ordinary long poll,
    held until there is news for the client (here: the end of the run)."""
    srv, a, b = pair
    complete_round(srv, [a, b])
    wait_until(lambda: srv.coord.current is not None and srv.coord.current.round == 1, what="round 1 to open")
    c = Fake(srv, "carol")  # joined after round 1 chose a and b: carol is not selected
    for wait in (float("nan"), -1.0):
        assert c.poll(wait).status == pb.ROUND_STATUS_WAIT
    seen = srv.coord.registry.get(c.client_id).last_seen
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(c.poll, float("inf"))
        wait_until(lambda: srv.coord.registry.get(c.client_id).last_seen > seen,
                   what="carol's +inf poll to reach the server")
        complete_round(srv, [a, b])  # the last round: the run finishes
        assert held.result(timeout=60).status == pb.ROUND_STATUS_FINISHED
    c.close()


# -- fuzz ---------------------------------------------------------------------------------------------
RPCS = {
    "Join": "unary_unary", "Heartbeat": "unary_unary", "Leave": "unary_unary",
    "StartRound": "unary_stream", "GetSnapshot": "unary_stream", "SubmitUpdate": "stream_unary",
}


def _fuzz_request(rng: random.Random, rpc: str, run_id: str, names: list[str]):
    """A request of ``rpc``'s own type with hostile values: another or no run, extreme and
    non-finite numbers, invalid names, headers that pass or fail the round's checks, tensor
    chunks of real and unknown names with wrong shapes, dtypes and offsets."""
    run = rng.choice([run_id, run_id, "", "other-run"])
    count = lambda: rng.choice([0, 1, 2, 10, 30, 31, rng.randrange(1 << 40), (1 << 64) - 1])  # noqa: E731
    if rpc == "Join":  # never "valid" or "fuzzer": that would end their sessions
        return pb.JoinRequest(name=rng.choice(["", "fz-1", "bad name!", "x" * 49, "ü"]), num_samples=count(),
                              software_version="v" * rng.randrange(100))
    if rpc == "Heartbeat":
        return pb.HeartbeatRequest(run_id=run, round=count(), phase="x" * rng.randrange(100))
    if rpc == "Leave":
        return pb.LeaveRequest(run_id=run, reason="x" * rng.randrange(100))
    if rpc == "StartRound":
        return pb.StartRoundRequest(run_id=run, have_round=count(), wait_seconds=rng.choice(
            [0.0, 0.1, -1.0, float("nan"), float("inf"), float("-inf"), 1e30]))
    if rpc == "GetSnapshot":
        return pb.GetSnapshotRequest(run_id=run, round=rng.choice([0, 0, 1, (1 << 64) - 1]))
    if rng.random() < 0.5:
        return pb.SubmitUpdateRequest(header=pb.UpdateHeader(
            run_id=run, round=rng.choice([0, 0, 1, (1 << 64) - 1]), num_samples=count(), loss=rng.random(),
            num_tensors=rng.randrange(1 << 32), update_digest=rng.randbytes(32).hex()))
    return pb.SubmitUpdateRequest(tensors=tensor_pb2.TensorBatch(chunks=[tensor_pb2.TensorChunk(
        name=rng.choice([*names, "x", ""]), dtype=rng.choice(["float32", "int64", "float128", ""]),
        shape=[rng.randrange(-2, 1 << 40) for _ in range(rng.randrange(4))], offset=rng.choice([0, 4, 1 << 40]),
        data=rng.randbytes(rng.randrange(64)))]))


def _fuzz_payload(rng: random.Random, rpc: str, run_id: str, names: list[str]) -> bytes:
    """Half hostile but well-formed requests (they reach the handlers), half bytes that do not
    decode or decode to something else: random bytes, flipped bytes, a runaway length."""
    kind = rng.randrange(6)
    if kind < 3:
        return _fuzz_request(rng, rpc, run_id, names).SerializeToString()
    if kind == 3:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 4:
        raw = bytearray(_fuzz_request(rng, rpc, run_id, names).SerializeToString() or b"\0")
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return b"\x0a" + bytes([rng.randrange(128, 256)]) * 5 + rng.randbytes(8)  # runaway varint length


REQUESTS = {"Join": pb.JoinRequest, "Heartbeat": pb.HeartbeatRequest, "Leave": pb.LeaveRequest,
            "StartRound": pb.StartRoundRequest, "GetSnapshot": pb.GetSnapshotRequest,
            "SubmitUpdate": pb.SubmitUpdateRequest}


def _parsed(rpc: str, payload: bytes):
    try:
        return REQUESTS[rpc].FromString(payload)
    except DecodeError:
        return None


def expected_codes(rpc: str, payloads: list[bytes], credential: str, run_id: str, declared: int) -> set[str]:
    """The status a fuzzed call must get: the server's checks, in the order it makes them,
    for round 0 open with the fuzzing client (``declared`` samples) selected. A set only
    where the outcome depends on what random bytes decode to."""
    msgs = [_parsed(rpc, p) for p in payloads]
    if rpc != "SubmitUpdate" and msgs[0] is None:
        return {"INVALID_ARGUMENT"}  # a request that does not decode, refused before any handler runs
    if rpc == "Join":  # open enrolment: whether the decoded name and size are valid, whether the name is
        # live already (ALREADY_EXISTS without its session token), whether the Join rate is exceeded
        return {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"}
    if credential != "client":
        return {"UNAUTHENTICATED"}
    if rpc == "Heartbeat":
        return {"OK"}
    if rpc in ("StartRound", "GetSnapshot"):
        ok = msgs[0].run_id == run_id and (rpc == "StartRound" or msgs[0].round == 0)
        return {"OK"} if ok else {"FAILED_PRECONDITION"}
    if not msgs or msgs[0] is None:
        return {"INVALID_ARGUMENT"}
    if msgs[0].WhichOneof("body") != "header":
        return {"INVALID_ARGUMENT"}
    h = msgs[0].header
    if h.run_id != run_id or h.round != 0:
        return {"FAILED_PRECONDITION"}
    if not 1 <= h.num_samples <= declared:
        return {"INVALID_ARGUMENT"}
    # a valid header: the tensors refuse (none of these can match the spec and the digest)
    return {"INVALID_ARGUMENT"}


def test_fuzz_every_rpc(make_server):
    """400 calls of hostile requests and undecodable bytes on every RPC, with no, a forged and a
    real credential: each gets exactly the status the server's checks give (never a crash
    or a hang), the server stays up, nothing of the open round changes, and the round still
    completes with exactly the valid updates."""
    srv = make_server()
    valid = Fake(srv, "valid")
    fuzzer = Fake(srv, "fuzzer", num_samples=30)  # a real identity: fuzzing reaches past authentication
    wait_until(lambda: srv.coord.current is not None, what="round 0 to open")
    assert srv.coord.current.selected == {"valid", "fuzzer"}
    credentials = {"none": (), "forged": (("authorization", "Bearer garbage"),), "client": fuzzer.md}
    reasons = {"none": "missing bearer token", "forged": "unknown or revoked token"}
    names = sorted(srv.coord.intake.update_spec(srv.coord.current)[0])
    rng = random.Random(1234)
    channel = grpc.insecure_channel(srv.target)
    seen: set[str] = set()
    undecodable = 0
    for _ in range(400):
        rpc = rng.choice(sorted(RPCS))
        credential = rng.choice(["none", "forged", "client", "client"])  # mostly past authentication
        if rpc == "Leave" and credential == "client":
            credential = "none"  # the fuzzer must stay in the round
        n = rng.randrange(0, 4) if rpc == "SubmitUpdate" else 1
        payloads = [_fuzz_payload(rng, rpc, valid.run_id, names) for _ in range(n)]
        call = getattr(channel, RPCS[rpc])(f"/fedkrso.v1.Coordinator/{rpc}", request_serializer=None,
                                           response_deserializer=None)
        md = credentials[credential]
        try:
            if RPCS[rpc] == "stream_unary":
                call(iter(payloads), metadata=md, timeout=5)
            elif RPCS[rpc] == "unary_stream":
                list(call(payloads[0], metadata=md, timeout=5))
            else:
                call(payloads[0], metadata=md, timeout=5)
            code, details = "OK", ""
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""
        want = expected_codes(rpc, payloads, credential, valid.run_id, fuzzer.num_samples)
        assert code in want, (rpc, credential, payloads, code, details, want)
        if "does not decode" in details:  # precise: never UNKNOWN, never a handler that crashed
            assert details == f"a request message does not decode as {REQUESTS[rpc].DESCRIPTOR.full_name}", details
            assert None in [_parsed(rpc, p) for p in payloads]
            undecodable += 1
        if code == "UNAUTHENTICATED":
            assert details == reasons[credential], details
        seen.add(code)
    channel.close()
    # the fuzz reached every layer: decoding, authentication, the handlers' refusals and answers
    assert {"OK", "UNAUTHENTICATED", "INVALID_ARGUMENT", "FAILED_PRECONDITION"} <= seen, seen
    assert undecodable > 10 and "UNKNOWN" not in seen and "INTERNAL" not in seen
    assert srv.alive() and srv.coord.completed == 0 and not srv.coord.metrics.rows()
    rs = srv.coord.current
    assert rs.round == 0 and rs.selected == {"valid", "fuzzer"} and not rs.submissions and not rs.dropped
    headers = {c.client_id: c.wait_train() for c in (valid, fuzzer)}
    complete_round(srv, [valid, fuzzer], headers)
    # the two valid updates (all 0.01), nothing else; weights capped equal (max_weight_share 0.5)
    assert_round_delta(srv, 0, weighted_mean(*((c.update(headers[c.client_id]), 1.0) for c in (valid, fuzzer))))
    valid.close()
    fuzzer.close()


# -- real processes ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_client_killed_mid_round_quorum_closes(tmp_path, tiny_bert, shards):
    out = tmp_path / "out"
    cfg = round_config(tiny_bert, out, rounds={"total": 3, "clients_per_round": 3, "min_clients": 2,
                                                "deadline_s": 6, "start_timeout_s": 120})
    cluster = Cluster(tmp_path)
    try:
        cluster.start_server(write_round_yaml(tmp_path / "round.yaml", cfg))
        procs = [cluster.start_client(shards / f"shard{i}", f"shard{i}") for i in range(3)]
        wait_until(lambda: len(metric_rows(out)) >= 1 or cluster.server.popen.poll() is not None, 120,
                   "round 0")
        victim = procs[2]
        victim.kill()
        run = finish_cluster(cluster, out, 120, killed=[victim])
    finally:
        cluster.stop()
    rows = run.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["clients"]) >= 2 for r in rows)
    victim_id = next(c for c in rows[0]["clients"] if c.endswith("shard2"))
    assert victim_id not in rows[-1]["clients"] and len(rows[-1]["clients"]) == 2
    assert rows[-1]["dropped"] == [victim_id]  # selected (still counted live), silent, recorded
    assert sorted(run.reports) == ["shard0", "shard1"]  # and both hold the final state


@pytest.mark.slow
def test_an_update_the_server_refuses_for_time_is_retried_and_never_ends_the_client(tmp_path, tiny_bert, shards):
    """The server's upload clocks (``server.upload_total_s``) refuse an honest client's update
    stream with DEADLINE_EXCEEDED (here: a full-model update cannot arrive within 1 ms). The
    client sends it again like to a busy server, and when its retries give up it leaves that
    update and polls for the next round: it does not exit (it used to, with status 4)."""
    out = tmp_path / "out"
    cfg = round_config(tiny_bert, out, method={"name": "fedavg", "steps": 2, "lr": 1e-4},
                       rounds={"total": 2, "clients_per_round": 2, "min_clients": 2, "deadline_s": 8,
                               "start_timeout_s": 120},
                       server={"upload_total_s": 0.001})
    cluster = Cluster(tmp_path)
    try:
        cluster.start_server(write_round_yaml(tmp_path / "round.yaml", cfg))
        procs = [cluster.start_client(shards / f"shard{i}", f"shard{i}", ["--reconnect-seconds", "2"])
                 for i in range(2)]
        wait_until(lambda: all(log_events(p.text(), "update_not_delivered") for p in procs)
                   or any(p.popen.poll() is not None for p in procs), 120, "both updates given up")
        assert [p.popen.poll() for p in procs] == [None, None], [p.text()[-2000:] for p in procs]
        for p in procs:
            busy = log_events(p.text(), "server_busy")
            assert busy and {e["code"] for e in busy} == {"DEADLINE_EXCEEDED"}, busy
        # the round went on without them: past its deadline it opens again, and they train it again
        wait_until(lambda: all(len(log_events(p.text(), "training")) >= 2 for p in procs), 120,
                   "a second training round of both clients")
        assert [p.popen.poll() for p in procs] == [None, None]
    finally:
        cluster.stop()
    refused = [e for e in log_events(cluster.server.text(), "request_refused") if e["method"] == "SubmitUpdate"]
    assert refused and {e["code"] for e in refused} == {"DEADLINE_EXCEEDED"}
    assert all("server.upload_total_s=0.001 s" in e["reason"] for e in refused), refused


@pytest.mark.slow
def test_late_joiner_catches_up_to_final_state(tmp_path, tiny_bert, shards):
    out = tmp_path / "out"
    cfg = round_config(tiny_bert, out, rounds={"total": 8, "start_timeout_s": 120},
                       server={"snapshot_after_rounds": 1})  # a client 2+ rounds behind takes a snapshot
    cluster = Cluster(tmp_path)
    try:
        cluster.start_server(write_round_yaml(tmp_path / "round.yaml", cfg))
        early = [cluster.start_client(shards / f"shard{i}", f"shard{i}") for i in range(2)]
        wait_until(lambda: len(metric_rows(out)) >= 2, 120, "two rounds")
        # freeze the early clients so the run cannot finish before the late one has joined
        for p in early:
            p.popen.send_signal(signal.SIGSTOP)
        cluster.start_client(shards / "shard2", "shard2")
        try:
            wait_until(lambda: any(e["client"] == "shard2" for e in log_events(cluster.server.text(), "client_joined")),
                       120, "the late join")
        finally:
            for p in early:
                p.popen.send_signal(signal.SIGCONT)
        run = finish_cluster(cluster, out, 150)
    finally:
        cluster.stop()
    report = run.reports["shard2"]  # holds the final state, like shard0 and shard1 (finish_cluster)
    assert report["have_round"] == 8
    assert report["snapshots"] >= 1  # it joined 2+ rounds behind, past the one delta kept


# the deadline policy itself (replacement of silent clients, quorum at the deadline) is tested
# on a fake clock in test_port.py; test_client_killed_mid_round_quorum_closes above is its
# end-to-end check at a real deadline, with real processes


def test_a_client_dropped_at_a_deadline_is_not_waited_for_at_the_end_until_heard_from_again():
    """The server waits, after its last round, for live clients to take the final model; one
    that missed a deadline and has been silent since (killed) is not waited for, and one that
    speaks again is."""
    from fedkrso.server.registry import ClientRegistry

    reg = ClientRegistry(0)
    for c in ("a", "b"):
        reg.join(c, c, 10)
    assert reg.still_finishing() == ["a", "b"]
    reg.mark_dropped({"b"})
    assert reg.still_finishing() == ["a"]
    reg.touch("b")
    assert reg.still_finishing() == ["a", "b"]
