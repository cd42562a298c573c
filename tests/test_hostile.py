"""Hostile clients against a real server, under every credential mode (issue 12).

The main test is a table: each row an attack an authenticated client ("mallory") makes on a
real ``fedkrso-server`` process while two honest ``fedkrso-client`` processes run the job,
the status the attack must get, and what must still hold. It runs once per credential mode
(open enrolment, a tokens file over TLS, mutual TLS with the id from the certificate's CN).
The first row is a connection flood before authentication (``tests/flood.py``: thousands of
connections from 40 loopback addresses, idle TCP or stalled TLS handshakes) that goes on
under the rows after it, with the server's resident memory and open descriptors sampled.
After every row of a mode: the run completes, every honest update of every round is accepted
(none dropped, none lost) while the flood and the stalled uploads were on, mallory's weight
stays bounded (``max_weight_share``, or pinned under the tokens file), no flooded name is ever
selected, the server's descriptors and memory stay within its limits, and its log holds no
line a client inflated and no UNKNOWN or crashed handler.

Smaller in-process tests (conftest's ``InProcServer``) cover what a process adds nothing to:
a Leave during the same client's own long-poll, and the bound of the client table.
"""

from __future__ import annotations

import concurrent.futures
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import pytest
import torch

from conftest import finish_cluster, log_events, round_config, wait_until, write_round_yaml
from flood import PARTIAL_CLIENT_HELLO, Flood, Usage
from pki import make_pki, server_tls, write_tokens
from fedkrso.bench.launch import Cluster
from fedkrso.common.config import parse_config
from fedkrso.common.methods import build_method
from fedkrso.common.models import load_model
from fedkrso.common.protocol import TOKEN_HEADER, bearer
from fedkrso.common.wire import tensor_batches, update_digest
from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

MODES = ["open", "tokens", "mtls"]
HONEST = ["shard0", "shard1"]
DECLARED = 10**9  # what mallory claims its shard holds
MB = 1 << 20
STALLS = 6  # SubmitUpdate streams per stall batch: more than the 2 upload slots and the turn queue


# -- who connects how ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    names = [*HONEST, "mallory", "eve"]
    return make_pki(tmp_path_factory.mktemp("pki"), [(n, n) for n in names])


@dataclass
class Credentials:
    """How a party proves who it is in one credential mode."""

    mode: str
    pki: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def security(self, tmp: Path) -> dict:
        if self.mode == "open":
            return {}
        if self.mode == "tokens":
            self.tokens = {n: f"{n}-token-{'x' * 40}" for n in [*HONEST, "mallory", "eve"]}
            return server_tls(self.pki, tokens_file=str(write_tokens(tmp / "tokens.txt", self.tokens)))
        return server_tls(self.pki, client_ca=str(self.pki / "ca.crt"), client_id_from_cert=True)

    def client_args(self, name: str, tmp: Path) -> list[str]:
        """Flags of a real ``fedkrso-client`` named ``name``."""
        if self.mode == "open":
            return []
        args = ["--ca", str(self.pki / "ca.crt"), "--server-name", "localhost"]
        if self.mode == "tokens":
            (tmp / f"{name}.token").write_text(self.tokens[name])
            return [*args, "--token-file", str(tmp / f"{name}.token")]
        return [*args, "--cert", str(self.pki / f"{name}.crt"), "--key", str(self.pki / f"{name}.key")]

    def channel(self, target: str, name: str) -> tuple[grpc.Channel, tuple]:
        """A channel of ``name`` and the metadata its calls carry (open enrolment: none yet)."""
        if self.mode == "open":
            return grpc.insecure_channel(target), ()
        key_pair = {} if self.mode == "tokens" else {
            "private_key": (self.pki / f"{name}.key").read_bytes(),
            "certificate_chain": (self.pki / f"{name}.crt").read_bytes()}
        creds = grpc.ssl_channel_credentials((self.pki / "ca.crt").read_bytes(), **key_pair)
        channel = grpc.secure_channel(target, creds, options=(("grpc.ssl_target_name_override", "localhost"),))
        return channel, bearer(self.tokens[name]) if self.mode == "tokens" else ()


def status(call: Callable[[], object]) -> tuple[str, str]:
    """(status code name, details) of an RPC; ("OK", "") when it succeeds."""
    try:
        call()
        return "OK", ""
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""


# -- the attacker ---------------------------------------------------------------------------------
class Attacker:
    """A client built from the .proto that lies: mallory, with the run's method and model, so
    it can make updates the server's spec accepts and then break one rule at a time."""

    def __init__(self, creds: Credentials, target: str, cfg: dict, name: str = "mallory"):
        self.creds, self.name = creds, name
        self.channel, self.md = creds.channel(target, name)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        rc = parse_config(cfg)
        self.method = build_method(rc.method, rc.run.seed)
        self.model = load_model(rc.model.name, rc.model.task, rc.model.num_labels, rc.run.seed)
        self.method.prepare(self.model)
        self.run_id, self.client_id = "", name

    def join(self, name: str | None = None, num_samples: int = DECLARED, version: str = "") -> pb.JoinResponse:
        resp, call = self.stub.Join.with_call(pb.JoinRequest(name=name or self.name, num_samples=num_samples,
                                                             software_version=version), metadata=self.md, timeout=20)
        token = dict(call.initial_metadata()).get(TOKEN_HEADER)
        if token:
            self.md = bearer(token)
        self.run_id, self.client_id = resp.run_id, resp.client_id
        return resp

    def poll(self, wait: float = 5.0, run_id: str | None = None) -> pb.RoundHeader:
        stream = self.stub.StartRound(pb.StartRoundRequest(run_id=self.run_id if run_id is None else run_id,
                                                           wait_seconds=wait), metadata=self.md, timeout=wait + 30)
        return [m.header for m in stream if m.WhichOneof("body") == "header"][0]

    def poll_train(self) -> pb.RoundHeader:
        give_up = time.monotonic() + 120
        while (header := self.poll()).status != pb.ROUND_STATUS_TRAIN:
            assert time.monotonic() < give_up, "mallory was never selected"
        return header

    def update(self, h: pb.RoundHeader, value: float = 1e-4, stray: bool = False) -> dict[str, torch.Tensor]:
        """An update of every tensor mallory may send (``stray``: plus an accumulator of a
        seed index its key did not draw), all ``value``."""
        seeds = list(h.seeds)
        spec = self.method.update_spec(self.model, seeds)
        allowed = self.method.allowed_update_names(self.model, seeds, h.round, self.client_id)
        if stray:
            drawn = {int(n.split(".")[1]) for n in allowed if n.startswith("acc.")}
            k = min(set(range(len(seeds))) - drawn)
            allowed |= {n for n in spec if n.startswith(f"acc.{k}.")}
        return {n: torch.full(s, value) for n, s in spec.items() if n in allowed}

    def messages(self, h: pb.RoundHeader, tensors, num_samples: int = DECLARED,
                 chunk: int = 1 << 16) -> list[pb.SubmitUpdateRequest]:
        seeds = list(h.seeds)
        used = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("acc.")})
        header = pb.UpdateHeader(run_id=self.run_id, round=h.round, num_samples=num_samples, loss=0.5, steps=1,
                                 seeds_used=[seeds[k] for k in used], num_tensors=len(tensors),
                                 update_digest=update_digest(tensors))
        return [pb.SubmitUpdateRequest(header=header),
                *(pb.SubmitUpdateRequest(tensors=b) for b in tensor_batches(tensors, None, chunk))]

    def submit(self, msgs) -> tuple[str, str]:
        return status(lambda: self.stub.SubmitUpdate(iter(msgs), metadata=self.md, timeout=60))

    def stalled(self, first: list, stop: threading.Event) -> grpc.Future:
        """A SubmitUpdate stream that sends ``first`` and then nothing until ``stop``."""
        def requests():
            yield from first
            stop.wait(60)

        return self.stub.SubmitUpdate.future(requests(), metadata=self.md, timeout=60)

    def close(self) -> None:
        self.channel.close()


def code_of(future: grpc.Future) -> str:
    try:
        future.result()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


@dataclass
class World:
    """What the rows act on and record."""

    cluster: Cluster
    cfg: dict
    attacker: Attacker
    header: pb.RoundHeader
    honest: list
    notes: dict = field(default_factory=dict)
    flood: Flood | None = None
    usage: Usage | None = None

    def end_flood(self) -> None:
        if self.flood is not None:
            self.flood.wait()
            self.flood.__exit__(None, None, None)
            self.usage.__exit__(None, None, None)
            self.notes["flood_ended"] = time.time()


# -- the rows: (attack, what it does -> observed status, expected statuses, what must still hold) ----
def connection_flood(w: World) -> str:
    """Thousands of connections before any authentication, from 40 loopback addresses (each
    up to 100 at once, every one the server closes opened again) for 8 s, with the server's
    default connection limits: idle TCP (open enrolment) or TLS handshakes stalled after the
    first bytes (TLS modes). It runs on through the rows that follow; a new client joins
    in the middle of it."""
    w.usage = Usage(w.cluster.server.popen.pid)
    w.notes["rss0"], w.notes["fds0"] = w.usage.sample()
    payload = b"" if w.attacker.creds.mode == "open" else PARTIAL_CLIENT_HELLO
    w.flood = Flood(w.cluster.port, payload=payload).__enter__()
    w.usage.__enter__()
    w.notes["flood_started"] = time.time()
    wait_until(lambda: w.flood.attempts >= 2000, 60, "2000 flood connections")
    newcomer = Attacker(w.attacker.creds, f"127.0.0.1:{w.cluster.port}", w.cfg, name="eve")
    code = status(lambda: newcomer.join(num_samples=10))[0]
    newcomer.stub.Leave(pb.LeaveRequest(reason="only checking the door"), metadata=newcomer.md, timeout=20)
    newcomer.close()  # (a client that joins and stays silent holds the run's end for 30 s at most)
    return code


def stalled_uploads(w: World) -> set[str]:
    """More SubmitUpdate streams than upload slots, each stalling after a valid header, batch
    after batch, while the honest clients (stopped until the stall saturates) train and upload."""
    a, h = w.attacker, w.header
    first = a.messages(h, a.update(h))[:1]
    stop, codes, saturated = threading.Event(), set(), threading.Event()

    def attack() -> None:
        while not stop.is_set():
            batch = [a.stalled(first, stop) for _ in range(STALLS)]
            for f in batch:
                code = code_of(f)
                if not stop.is_set():  # once stopped, the streams end early: incomplete updates
                    codes.add(code)
                if code == "RESOURCE_EXHAUSTED":  # the turn queue is full: the stall is in place
                    saturated.set()

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    wait_until(saturated.is_set, 30, "the stalled streams to fill mallory's turn queue")
    w.notes["stall_saturated"] = time.time()
    for p in w.honest:
        p.popen.send_signal(signal.SIGCONT)
    try:
        wait_until(lambda: honest_accepted(w), 120, "both honest updates of round 0, while mallory stalls")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{honest_story(w)}") from None
    w.notes["stall_ended"] = time.time()
    stop.set()
    thread.join(60)
    return codes


def honest_accepted(w: World) -> bool:
    """Both honest updates of round 0 accepted; an honest client that exited fails at once
    (not after the wait's whole timeout)."""
    if any(p.popen.poll() is not None for p in w.honest):
        raise AssertionError("an honest client exited during mallory's stall")
    return {e["client"] for e in accepted(w.cluster, 0)} >= set(HONEST)


def honest_story(w: World) -> str:
    """What the honest clients and the server logged about them: a failed wait says why."""
    about = [line for line in w.cluster.server.text().splitlines()
             if any(f'"client": "{name}"' in line for name in HONEST)]
    return "\n".join([*(f"== {p.name} (status {p.popen.poll()}):\n{p.text()[-2000:]}" for p in w.honest),
                      "== the server about them:", *about[-15:]])


def silent_stream(w: World) -> str:
    stop = threading.Event()
    code = code_of(w.attacker.stalled([], stop))
    stop.set()
    return code


def takeover(w: World) -> str:
    """Join under an honest client's name: no session token for it (open enrolment); with a
    credential, the name is only a display name and the id stays mallory's."""
    code, _ = status(lambda: w.attacker.join(name="shard0"))
    assert code != "OK" or w.attacker.client_id == "mallory"
    return code


def huge_name(w: World) -> str:
    code, details = status(lambda: w.attacker.join(name="x" * MB))
    assert len(details) < 300, len(details)
    return code


def rejoin_inflated(w: World) -> str:
    """Join again in the middle of the round declaring 1000 x more samples, with a 1 MB
    software_version; the round's weight was frozen when mallory was selected."""
    return status(lambda: w.attacker.join(num_samples=DECLARED * 1000, version="v" * MB))[0]


def huge_run_id(w: World) -> str:
    code, details = status(lambda: w.attacker.poll(wait=0, run_id="r" * MB))
    assert len(details) < 300, len(details)
    return code


def inflated_header(w: World) -> str:
    a, h = w.attacker, w.header
    return a.submit(a.messages(h, a.update(h), num_samples=DECLARED * 1000))[0]


def stray_seed(w: World) -> str:
    a, h = w.attacker, w.header
    code, details = a.submit(a.messages(h, a.update(h, stray=True)))
    assert "did not draw" in details, details
    return code


def huge_values(w: World) -> str:
    a, h = w.attacker, w.header
    code, details = a.submit(a.messages(h, a.update(h, value=1e38)))
    assert "exceeds server.max_update_norm" in details, details
    return code


def valid_update(w: World) -> str:
    a, h = w.attacker, w.header
    return a.submit(a.messages(h, a.update(h)))[0]


def join_flood(w: World) -> dict[str, int]:
    """1000 Joins from one address within seconds (open enrolment: 1000 names)."""
    a, counts = w.attacker, {}
    for i in range(1000):
        request = pb.JoinRequest(name=f"flood-{i}" if a.creds.mode == "open" else a.name, num_samples=10)
        code, _ = status(lambda: a.stub.Join(request, metadata=a.md, timeout=20))
        counts[code] = counts.get(code, 0) + 1
    return counts


def huge_leave_reason(w: World) -> str:
    a = w.attacker
    return status(lambda: a.stub.Leave(pb.LeaveRequest(run_id=a.run_id, reason="r" * MB), metadata=a.md, timeout=20))[0]


@dataclass
class Attack:
    name: str
    run: Callable[[World], object]
    expect: Callable[[object, str], bool]
    holds: str


def one_of(*codes: str) -> Callable[[object, str], bool]:
    return lambda got, mode: got in codes


ATTACKS = [
    Attack("connection flood (>= 3000 from 40 addresses, 8 s)", connection_flood, one_of("OK"),
           "a new client joins mid-flood; descriptors bounded"),
    Attack("stalled uploads (6 streams > 2 slots)", stalled_uploads,
           lambda got, mode: got == {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
           "honest uploads accepted while the stall held"),
    Attack("stream that never sends a message", silent_stream, one_of("DEADLINE_EXCEEDED"), "slot freed"),
    Attack("Join under an honest client's name", takeover,
           lambda got, mode: got == ("ALREADY_EXISTS" if mode == "open" else "OK"), "no takeover"),
    Attack("Join with a 1 MB name", huge_name, one_of("INVALID_ARGUMENT"), "details < 300 chars"),
    Attack("re-join mid-round declaring 1000x samples, 1 MB version", rejoin_inflated, one_of("OK"),
           "round weight unchanged"),
    Attack("StartRound with a 1 MB run id", huge_run_id, one_of("FAILED_PRECONDITION"), "details < 300 chars"),
    Attack("update header claiming 1000x its declared samples", inflated_header, one_of("INVALID_ARGUMENT"),
           "nothing folded"),
    Attack("accumulator of a seed index not drawn", stray_seed, one_of("INVALID_ARGUMENT"), "nothing folded"),
    Attack("update of 1e38-valued tensors", huge_values, one_of("INVALID_ARGUMENT"), "nothing folded"),
    Attack("1000 Joins within seconds", join_flood,
           lambda got, mode: got.get("RESOURCE_EXHAUSTED", 0) >= 900 and got.get("OK", 0) <= 40,
           "no flooded name selected"),
    Attack("mallory's own valid update", valid_update, one_of("OK"), "weight capped / pinned"),
    Attack("Leave with a 1 MB reason", huge_leave_reason, one_of("OK"), "log line bounded"),
]


def accepted(cluster: Cluster, round_id: int) -> list[dict]:
    return [e for e in log_events(cluster.server.text(), "update_accepted") if e["round"] == round_id]


def stamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_attack_table_against_a_real_server(mode, tiny_bert, shards, pki, tmp_path):
    creds = Credentials(mode, pki)
    out = tmp_path / "out"
    cfg = round_config(
        tiny_bert, out, rounds={"total": 2, "clients_per_round": 3, "min_clients": 2, "deadline_s": 120,
                                "start_timeout_s": 120},
        # finish_wait_s: the Joins the flood got through (join_burst) never leave, and the server
        # would wait the default 30 s for them after the last round
        server={"max_concurrent_uploads": 2, "upload_idle_s": 2, "upload_total_s": 6, "join_burst": 8,
                "join_rate_per_s": 2, "finish_wait_s": 8},
        training={"client_weights": {"mallory": 1.0}} if mode == "tokens" else {},
        security=creds.security(tmp_path))
    cluster = Cluster(tmp_path)
    outcomes = []
    try:
        cluster.start_server(write_round_yaml(tmp_path / "round.yaml", cfg))
        honest = [cluster.start_client(shards / f"shard{i}", name, creds.client_args(name, tmp_path))
                  for i, name in enumerate(HONEST)]
        attacker = Attacker(creds, f"127.0.0.1:{cluster.port}", cfg)
        attacker.join()
        header = attacker.poll_train()  # round 0 opened: the honest clients are selected too
        for p in honest:  # hold them until the stall is in place
            p.popen.send_signal(signal.SIGSTOP)
        world = World(cluster, cfg, attacker, header, honest)
        try:
            for attack in ATTACKS:
                got = attack.run(world)
                outcomes.append((attack.name, got, attack.holds))
                assert attack.expect(got, mode), (mode, attack.name, got)
        finally:
            world.end_flood()
        run = finish_cluster(cluster, out, timeout=180)
        attacker.close()
    finally:
        for p in cluster.clients:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGCONT)
        cluster.stop()
    flood, usage, notes = world.flood, world.usage, world.notes
    print(f"\n{mode}:", *(f"  {name:58} {got!s:42} {holds}" for name, got, holds in outcomes), sep="\n")
    print(f"  flood: {flood.attempts} connections, {flood.peak_open} open at once at most, {flood.closed_by_server} "
          f"closed by the server; server RSS {notes['rss0'] / MB:.0f} -> peak {usage.rss_peak / MB:.0f} MiB, open "
          f"fds {notes['fds0']} -> peak {usage.fds_peak}")

    rows = run.rows
    assert [r["round"] for r in rows] == [0, 1]
    if mode == "open":  # the flood's admitted names never left: the server waited finish_wait_s, no more
        over = log_events(cluster.server.text(), "finish_wait_over")
        assert len(over) == 1 and over[0]["waited_s"] == 8, over
        assert over[0]["first"] and all(c.startswith("flood-") for c in over[0]["first"]), over
    for r in rows:  # no honest update lost, no honest client dropped, no flooded name anywhere
        assert set(HONEST) <= set(r["clients"]) and not set(HONEST) & set(r["dropped"]), r["round"]
        assert not any(c.startswith("flood-") for c in r["clients"] + r["dropped"])
    weights = {c: v["weight"] for c, v in rows[0]["per_client"].items()}
    assert set(weights) == {*HONEST, "mallory"}
    if mode == "tokens":  # pinned by the operator: mallory's claims do not matter
        assert weights["mallory"] == 1.0
    else:  # frozen at selection (the re-join changed nothing) and capped at half the round
        assert weights["mallory"] / sum(weights.values()) <= 0.5 + 1e-9
    # honest updates were accepted while mallory's stalled streams held its turn and a slot, and
    # while the flood ran, whose cost the default limits bound: max_pending_connections (128)
    # connections of at most 3 descriptors each (plus the ones gRPC has yet to close), a few
    # tens of MB of memory
    during = [stamp(e) for e in accepted(cluster, 0) if e["client"] in HONEST]
    assert any(notes["stall_saturated"] <= t <= notes["stall_ended"] for t in during), during
    assert any(notes["flood_started"] <= t <= notes["flood_ended"] for t in during), during
    assert flood.attempts >= 3000 and flood.closed_by_server >= 2000
    assert usage.fds_peak - notes["fds0"] <= 3 * 128 + 192  # + honest connections, gRPC's closes in flight
    assert usage.rss_peak - notes["rss0"] < 200 * MB
    text = cluster.server.text()
    assert max(len(line) for line in text.splitlines()) < 4096  # 1 MB names and reasons stay out
    assert "rpc_failed" not in text and "UNKNOWN" not in text


# -- in-process: what a server process adds nothing to --------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_leave_during_the_clients_own_long_poll_ends_it_with_a_precise_status(mode, server_factory, pki, tmp_path):
    """eve long-polls (not selected: the round waits for a second client) and leaves meanwhile:
    her poll ends UNAUTHENTICATED saying she left, never UNKNOWN with a Python class name."""
    creds = Credentials(mode, pki)
    srv = server_factory(security=creds.security(tmp_path), rounds={"clients_per_round": 2, "min_clients": 2})
    eve = Attacker(creds, srv.target, srv.cfg.model_dump(mode="json"), name="eve")
    eve.join(num_samples=10)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        polled = pool.submit(status, lambda: eve.poll(wait=30))
        pending = lambda: srv.coord.registry.get("eve").polled and not polled.done()  # noqa: E731
        wait_until(pending, what="eve's long-poll to reach the server")
        leave = status(lambda: eve.stub.Leave(pb.LeaveRequest(run_id=eve.run_id), metadata=eve.md, timeout=10))
        assert leave == ("OK", "")
        assert polled.result(timeout=30) == ("UNAUTHENTICATED", "client 'eve' left the run; join again to take part")
    assert srv.alive()
    eve.close()


def test_client_table_is_bounded_and_forgets_who_left_first(server_factory):
    """``server.max_clients`` entries: a new name in a full table of live clients is refused
    (RESOURCE_EXHAUSTED); once one leaves, its entry is the one forgotten."""
    srv = server_factory(server={"max_clients": 4, "join_burst": 100})
    channel = grpc.insecure_channel(srv.target)
    stub = pb_grpc.CoordinatorStub(channel)
    tokens = {}
    for i in range(4):
        _, call = stub.Join.with_call(pb.JoinRequest(name=f"c{i}", num_samples=10), timeout=10)
        tokens[f"c{i}"] = bearer(dict(call.initial_metadata())[TOKEN_HEADER])
    code, details = status(lambda: stub.Join(pb.JoinRequest(name="c4", num_samples=10), timeout=10))
    assert code == "RESOURCE_EXHAUSTED" and "client table is full" in details
    stub.Leave(pb.LeaveRequest(), metadata=tokens["c2"], timeout=10)
    assert stub.Join(pb.JoinRequest(name="c4", num_samples=10), timeout=10).client_id == "c4"
    assert sorted(srv.coord.registry.clients) == ["c0", "c1", "c3", "c4"]
    channel.close()


def test_trickling_upload_is_cut_at_its_total_time_and_frees_the_only_slot(server_factory):
    """With one upload slot, mallory trickles a valid update (a message every 0.4 s: never
    idle for ``upload_idle_s``) past ``upload_total_s``; bob's upload, waiting for the slot
    meanwhile, is accepted once mallory's stream is cut."""
    srv = server_factory(server={"max_concurrent_uploads": 1, "upload_idle_s": 1, "upload_total_s": 3,
                                 "max_chunk_bytes": 1024})
    cfg = srv.cfg.model_dump(mode="json")
    mallory, bob = (Attacker(Credentials("open", Path()), srv.target, cfg, name) for name in ("mallory", "bob"))
    for c in (mallory, bob):
        c.join(num_samples=10)
        c.poll(wait=0)
    hm, hb = mallory.poll_train(), bob.poll_train()
    slow = mallory.messages(hm, mallory.update(hm), num_samples=10, chunk=512)
    assert len(slow) * 0.4 > 3 * 1.5, "the trickle must outlast upload_total_s"
    sent = threading.Event()

    def trickle():
        for i, m in enumerate(slow):
            if i == 1:
                sent.set()  # the header went through: mallory holds its turn and the slot
            yield m
            time.sleep(0.4)  # the attack's pace, not a synchronisation

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        cut = pool.submit(status, lambda: mallory.stub.SubmitUpdate(trickle(), metadata=mallory.md, timeout=30))
        assert sent.wait(10)
        assert bob.submit(bob.messages(hb, bob.update(hb), num_samples=10)) == ("OK", "")
        code, details = cut.result(timeout=30)
    assert code == "DEADLINE_EXCEEDED" and "server.upload_total_s=3" in details, details
    assert set(srv.coord.current.submissions) == {"bob"}
    for c in (mallory, bob):
        c.close()


def test_weights_are_frozen_capped_and_pinned():
    """``share_cap`` water-fills: no weight above the share of the total; below 1/n every
    client counts the same. ``frozen`` takes a pin first, then the samples cap."""
    from fedkrso.common.config import TrainingSection
    from fedkrso.server.weights import RoundWeights, share_cap

    assert share_cap([40, 40], 0.5) == math.inf  # already within: golden runs are unchanged
    assert share_cap([10, 30], 0.5) == 10
    cap = share_cap([1, 1, 1, 100], 0.5)
    assert cap == 3 and cap / (3 + cap) == 0.5
    assert share_cap([5, 7, 9], 0.2) == 5  # 3 clients cannot each hold at most 20 %: all equal
    assert share_cap([5, 1e12], None) == math.inf
    w = RoundWeights(TrainingSection(max_samples_per_client=100, client_weights={"pinned": 2.5}))
    assert (w.frozen("a", 50), w.frozen("b", 10**9), w.frozen("pinned", 10**9)) == (50, 100, 2.5)
    assert RoundWeights(TrainingSection(weighting="uniform")).frozen("a", 10**9) == 1.0
