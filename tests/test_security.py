"""Transport security and client credentials against real gRPC servers on loopback.

Certificates are made once per module (``tests/pki.py``): a CA, a server certificate for
``localhost`` only (so clients dialing 127.0.0.1 override the TLS name), a client certificate
with CN ``hospital-1``, and a second, unrelated CA. Servers run in-process (conftest's
``server_factory``, with the byte-counting relay in front, as in production), and one test runs
real ``fedkrso-server`` / ``fedkrso-client`` processes over TLS with a tokens file.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from conftest import InProcServer, round_config, rpc_error, run_cluster, write_round_yaml
from pki import make_pki, server_tls, write_tokens
from fedkrso.client.runner import ClientOptions, CredentialRefused, FedClient
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.server.coordinator import Coordinator
from fedkrso.server.service import run_server
from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

SC = grpc.StatusCode
NAME = (("grpc.ssl_target_name_override", "localhost"),)


# -- certificates ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), [("client", "hospital-1")])


@pytest.fixture
def serve(server_factory) -> Callable[[dict], InProcServer]:
    """``serve(security)``: an in-process server with that ``security`` section."""
    return lambda security: server_factory(security=security)


def tls(pki: Path, ca: str = "ca", client: bool = False) -> grpc.ChannelCredentials:
    key_pair = {"private_key": (pki / "client.key").read_bytes(),
                "certificate_chain": (pki / "client.crt").read_bytes()} if client else {}
    return grpc.ssl_channel_credentials((pki / f"{ca}.crt").read_bytes(), **key_pair)


def stub(srv: InProcServer, creds: grpc.ChannelCredentials | None = None) -> pb_grpc.CoordinatorStub:
    channel = grpc.secure_channel(srv.target, creds, options=NAME) if creds else grpc.insecure_channel(srv.target)
    return pb_grpc.CoordinatorStub(channel)


def join(s: pb_grpc.CoordinatorStub, name: str = "alice", token: str | None = None):
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return s.Join.with_call(pb.JoinRequest(name=name, num_samples=10), metadata=md, timeout=10)


def heartbeat(s: pb_grpc.CoordinatorStub, token: str) -> pb.HeartbeatResponse:
    return s.Heartbeat(pb.HeartbeatRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)


# -- TLS -------------------------------------------------------------------------------------
def test_tls_right_ca_joins_plaintext_and_wrong_ca_fail(serve, pki):
    srv = serve(server_tls(pki))
    resp, _ = join(stub(srv, tls(pki)))
    assert resp.client_id == "alice"
    assert rpc_error(lambda: join(stub(srv)))[0] == SC.UNAVAILABLE
    assert rpc_error(lambda: join(stub(srv, tls(pki, ca="other"))))[0] == SC.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_and_takes_the_id_from_its_cn(serve, pki):
    srv = serve(server_tls(pki, client_ca=str(pki / "ca.crt"), client_id_from_cert=True))
    assert rpc_error(lambda: join(stub(srv, tls(pki))))[0] == SC.UNAVAILABLE
    s = stub(srv, tls(pki, client=True))
    resp, call = join(s, name="someone-else")
    assert resp.client_id == "hospital-1"
    assert "x-fedkrso-token" not in dict(call.initial_metadata()), "the certificate is the credential"
    assert s.Heartbeat(pb.HeartbeatRequest(), timeout=10).current_round == 0


def test_non_loopback_listen_without_tls_refused_unless_insecure(tiny_bert, tmp_path):
    cfg = round_config(tiny_bert, tmp_path / "out")

    async def start(security: dict) -> int:
        coord = Coordinator(parse_config({**cfg, "security": security}))
        async with run_server(coord, "0.0.0.0:0") as port:
            return port

    with pytest.raises(ConfigError, match="without TLS"):
        asyncio.run(start({}))
    assert asyncio.run(start({"insecure": True})) > 0
    path = write_round_yaml(tmp_path / "round.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "fedkrso.server.main", "--config", str(path),
                           "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refusing to listen on 0.0.0.0:0 without TLS" in proc.stderr, proc.stderr


def test_security_config_validation_names_the_field(tiny_bert, tmp_path):
    cfg = round_config(tiny_bert, tmp_path)
    with pytest.raises(ConfigError, match=r"security: .*tls_key is required with tls_cert"):
        parse_config({**cfg, "security": {"tls_cert": "server.crt"}})
    with pytest.raises(ConfigError, match="client_id_from_cert needs client_ca"):
        parse_config({**cfg, "security": {"tls_cert": "a", "tls_key": "b", "client_id_from_cert": True}})
    with pytest.raises(ConfigError, match="security.surprise"):
        parse_config({**cfg, "security": {"surprise": 1}})


# -- tokens file -----------------------------------------------------------------------------
def test_tokens_file_identifies_refuses_and_revokes(serve, pki, tmp_path):
    tokens = {"hospital-0": "a" * 64, "hospital-1": "b" * 64}
    path = write_tokens(tmp_path / "tokens.txt", tokens)
    srv = serve(server_tls(pki, tokens_file=str(path)))
    s = stub(srv, tls(pki))
    resp, call = join(s, name="hospital-1", token=tokens["hospital-0"])
    assert resp.client_id == "hospital-0", "the body's name is only a display name"
    assert "x-fedkrso-token" not in dict(call.initial_metadata())
    assert join(s, token=tokens["hospital-1"])[0].client_id == "hospital-1"
    assert rpc_error(lambda: join(s, token="c" * 64)) == (SC.UNAUTHENTICATED, "unknown or revoked token")
    assert rpc_error(lambda: join(s)) == (SC.UNAUTHENTICATED, "missing bearer token")
    assert rpc_error(lambda: s.Heartbeat(pb.HeartbeatRequest(), timeout=10)) == (SC.UNAUTHENTICATED,
                                                                             "missing bearer token")
    heartbeat(s, tokens["hospital-0"])

    write_tokens(path, {"hospital-1": tokens["hospital-1"]})  # revoke hospital-0
    assert rpc_error(lambda: heartbeat(s, tokens["hospital-0"])) == (SC.UNAUTHENTICATED, "unknown or revoked token")
    heartbeat(s, tokens["hospital-1"])


def test_client_with_a_refused_token_exits_4(serve, pki, tmp_path, shards):
    srv = serve(server_tls(pki, tokens_file=str(write_tokens(tmp_path / "tokens.txt", {"h0": "a" * 64}))))
    (tmp_path / "bad.token").write_text("not-a-token\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedkrso.client.main", "--server", srv.target,
         "--data", str(shards / "shard0"), "--ca", str(pki / "ca.crt"), "--server-name", "localhost",
         "--token-file", str(tmp_path / "bad.token"), "--log-json"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "credential_refused" in proc.stderr and "unknown or revoked token" in proc.stderr


# -- open enrolment --------------------------------------------------------------------------
def test_open_enrolment_rejoin_keeps_the_id_and_kills_the_old_token(serve):
    """A live name is taken again only with its current session token (the same client
    re-joining), which the new token then replaces; without it, ALREADY_EXISTS: no takeover."""
    srv = serve({})
    s = stub(srv)
    first, call = join(s, name="carol")
    old = dict(call.initial_metadata())["x-fedkrso-token"]
    heartbeat(s, old)
    code, details = rpc_error(lambda: join(s, name="carol"))
    assert code == SC.ALREADY_EXISTS and "'carol' belongs to a live session" in details
    code, details = rpc_error(lambda: join(s, name="carol", token="forged"))
    assert code == SC.ALREADY_EXISTS
    heartbeat(s, old)  # the refused takeovers changed nothing
    again, call = join(s, name="carol", token=old)
    new = dict(call.initial_metadata())["x-fedkrso-token"]
    assert first.client_id == again.client_id == "carol" and new != old
    assert rpc_error(lambda: heartbeat(s, old)) == (SC.UNAUTHENTICATED, "unknown or revoked token")
    heartbeat(s, new)


def test_open_enrolment_name_is_free_again_once_its_client_left(serve):
    srv = serve({})
    s = stub(srv)
    token = dict(join(s, name="frank")[1].initial_metadata())["x-fedkrso-token"]
    s.Leave(pb.LeaveRequest(reason="done"), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    assert rpc_error(lambda: heartbeat(s, token)) == (SC.UNAUTHENTICATED, "unknown or revoked token")
    assert join(s, name="frank")[0].client_id == "frank"


def test_client_rejoins_when_its_session_token_is_lost(serve, tmp_path):
    """The server forgets the client's session (here: its Leave, as after a restart): the
    client's next call is UNAUTHENTICATED, it joins again under its name and goes on."""
    srv = serve({})
    client = FedClient(ClientOptions(server=srv.target, data=tmp_path, name="dave"))
    client.dataset = range(10)
    client._enrol()
    before = client.metadata
    client.stub.Leave(pb.LeaveRequest(), metadata=before, timeout=10)
    assert client._call(client.stub.Heartbeat, pb.HeartbeatRequest(), timeout=10).current_round == 0
    assert client.metadata != before and client.client_id == "dave"
    client.channel.close()


def test_token_client_rejoins_when_forgotten_and_stops_when_revoked(serve, pki, tmp_path):
    path = write_tokens(tmp_path / "tokens.txt", {"hospital-0": "a" * 64})
    srv = serve(server_tls(pki, tokens_file=str(path)))
    (tmp_path / "t").write_text("a" * 64)
    client = FedClient(ClientOptions(server=srv.target, data=tmp_path, name="erin",
                                     ca=pki / "ca.crt", server_name="localhost", token_file=tmp_path / "t"))
    client.dataset = range(10)
    assert client._enrol().client_id == "hospital-0"
    client.stub.Leave(pb.LeaveRequest(), metadata=client.metadata, timeout=10)  # the server forgets it
    assert client._call(client.stub.Heartbeat, pb.HeartbeatRequest(), timeout=10).current_round == 0
    write_tokens(path, {})
    with pytest.raises(CredentialRefused, match="unknown or revoked token"):
        client._call(client.stub.Heartbeat, pb.HeartbeatRequest(), timeout=10)
    client.channel.close()


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_processes_over_tls_with_a_tokens_file(tiny_bert, shards, pki, tmp_path):
    tokens = {"hospital-0": "0" * 64, "hospital-1": "1" * 64}
    cfg = round_config(tiny_bert, tmp_path / "out", rounds={"total": 2, "start_timeout_s": 120},
                       security=server_tls(pki, tokens_file=str(write_tokens(tmp_path / "tokens.txt", tokens))))
    args = []
    for i, token in enumerate(tokens.values()):
        (tmp_path / f"t{i}").write_text(token + "\n")
        args.append(["--ca", str(pki / "ca.crt"), "--server-name", "localhost", "--token-file", str(tmp_path / f"t{i}")])
    run = run_cluster(tmp_path, cfg, shards, clients=2, client_args=args)
    for i, client_id in enumerate(tokens):  # each holds the final state (run_cluster) under its token's id
        report = run.reports[f"shard{i}"]
        assert report["client_id"] == client_id and report["rounds_trained"] == [0, 1]
    assert [r["round"] for r in run.rows] == [0, 1]
    assert all(r["uplink_wire_bytes"] > r["uplink_message_bytes"] for r in run.rows), "the relay counts TLS bytes"
