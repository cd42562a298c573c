"""Multi-host over a shaped link: server and clients in two Linux network namespaces.

Two namespaces we create (server, client) are joined by a veth pair with 10.200.0.1/24 and
10.200.0.2/24; both ends get ``netem rate 10mbit delay 50ms``. Where the kernel has no netem,
both ends get ``tbf rate 10mbit`` and the 50 ms each way comes from ``tests/delay_relay.py``, a
delaying TCP relay in the client namespace that the clients dial (the same 100 ms round trip).
Traffic never leaves the namespaces. The real server (``python -m fedkrso.server.main``)
listens on 10.200.0.1, a non-loopback address, in plaintext (``--insecure``: the test is about
the link) and two real clients run in the client namespace. The same tiny BERT (hidden 128) is
trained with FedKRSO and with FedAvg at equal local steps over a 10 Mbit/s link with 100 ms
round trips: both runs must complete with every client on the server's final state, and the
link must carry what each method says it sends. The round times are printed, not asserted: a
test on a shared machine cannot time (docs/BENCH.md has measured figures).

Skips (with the reason) when ``ip``/``tc`` is missing, namespaces cannot be created (no
privileges), or neither netem nor tbf is available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import log_events, round_config, wait_until, write_round_yaml
from fedkrso.bench.launch import child_env

pytestmark = pytest.mark.slow

SERVER_IP, CLIENT_IP = "10.200.0.1", "10.200.0.2"
NETEM = ["netem", "rate", "10mbit", "delay", "50ms"]
# Kernels built without sch_netem (some container/VM kernels) still have tbf: same 10 Mbit/s
# rate; the delay then comes from tests/delay_relay.py. The test says which one it used.
TBF = ["tbf", "rate", "10mbit", "burst", "32kbit", "latency", "400ms"]
DELAY_MS = 50
DELAY_RELAY = Path(__file__).with_name("delay_relay.py")
ROUNDS, CLIENTS = 3, 2


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _shape(ns: str, dev: str) -> str:
    """Shape ``dev`` in ``ns`` with netem (or tbf where netem is missing); the qdisc used."""
    errors = []
    for qdisc in (NETEM, TBF):
        tc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *qdisc],
                            capture_output=True, text=True, timeout=30)
        if tc.returncode == 0:
            return qdisc[0]
        errors.append(f"{qdisc[0]}: {tc.stderr.strip()}")
    pytest.skip(f"cannot shape the link ({'; '.join(errors)})")


@pytest.fixture
def netns():
    """(server namespace, client namespace), linked by a shaped veth pair; removed after."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found (install iproute2)")
    tag = f"{os.getpid() % 100000}"
    srv, cli = f"fksrv{tag}", f"fkcli{tag}"
    va, vb = f"fkva{tag}", f"fkvb{tag}"
    probe = _ip("netns", "add", srv, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
    created = [srv]
    try:
        _ip("netns", "add", cli)
        created.append(cli)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", srv)
        _ip("link", "set", vb, "netns", cli)
        for ns, dev, addr in ((srv, va, SERVER_IP), (cli, vb, CLIENT_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # the server's gRPC binds 127.0.0.1 behind its relay
            shaping = _shape(ns, dev)
        ping = subprocess.run(["ip", "netns", "exec", cli, "ping", "-c", "1", "-W", "2", SERVER_IP],
                              capture_output=True, text=True, timeout=30) if shutil.which("ping") else None
        if ping is not None:
            assert ping.returncode == 0, ping.stdout + ping.stderr
        yield srv, cli, shaping
    finally:
        for ns in reversed(created):  # deleting a namespace removes its end of the veth pair
            _ip("netns", "del", ns, check=False)


def _in_ns(ns: str, module: str, args: list[str], log: Path) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", module, *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env())


def _wait_port(port_file: Path, proc: subprocess.Popen, log: Path, timeout: float = 90) -> int:
    """The port a process bound (port 0) and wrote to ``port_file``; fails if it exits first."""

    def written() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:] if log.exists() else f"exited {proc.returncode}"
        return port_file.exists()

    wait_until(written, timeout, f"a port in {port_file}")
    return int(port_file.read_text())


def _run(tmp: Path, ns: tuple[str, str, str], model: Path, data: Path, method: dict) -> list[dict]:
    srv, cli, qdisc = ns
    name = method["name"]
    wd = tmp / name
    wd.mkdir()
    out = wd / "out"
    cfg = round_config(model, out, run={"name": f"netns-{name}"}, model={"num_labels": 5}, method=method,
                       rounds={"total": ROUNDS, "clients_per_round": CLIENTS, "min_clients": CLIENTS,
                               "deadline_s": 120, "start_timeout_s": 120},
                       training={"batch_size": 4}, server={"listen": f"{SERVER_IP}:0"})
    config = write_round_yaml(wd / "round.yaml", cfg)
    port_file = wd / "server.port"
    procs = [_in_ns(srv, "fedkrso.server.main", ["--config", str(config), "--listen", f"{SERVER_IP}:0",
                                                 "--insecure", "--port-file", str(port_file)], wd / "server.log")]
    try:
        target = f"{SERVER_IP}:{_wait_port(port_file, procs[0], wd / 'server.log')}"
        if qdisc != "netem":  # the 50 ms each way, in the client namespace
            relay_port = wd / "relay.port"
            relay = subprocess.Popen(["ip", "netns", "exec", cli, sys.executable, str(DELAY_RELAY),
                                      "--target", target, "--delay-ms", str(DELAY_MS),
                                      "--port-file", str(relay_port)],
                                     stdout=(wd / "relay.log").open("w"), stderr=subprocess.STDOUT)
            procs.append(relay)
            target = f"127.0.0.1:{_wait_port(relay_port, relay, wd / 'relay.log')}"
        clients = []
        for i in range(CLIENTS):
            clients.append(_in_ns(cli, "fedkrso.client.main",
                                ["--server", target, "--data", str(data / f"shard{i}"), "--name", f"shard{i}",
                                 "--poll-seconds", "10", "--insecure"], wd / f"client{i}.log"))
        procs += clients
        assert procs[0].wait(timeout=150) == 0, (wd / "server.log").read_text()[-3000:]
        # each client caught up to the server's final state, said so, and exited 0
        final = (out / "final_state_fingerprint.txt").read_text().strip()
        for i in range(CLIENTS):
            log = wd / f"client{i}.log"
            assert clients[i].wait(timeout=60) == 0, log.read_text()[-3000:]
            done = log_events(log.read_text(), "run_finished")
            assert done and final.startswith(done[-1]["state_fingerprint"]), log.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedkrso_and_fedavg_train_over_shaped_link(tmp_path, netns, bbc_small, tiny_models):
    model = tiny_models("bert", 5, hidden=128)
    steps = 4  # equal local work: FedAvg 4 Adam steps, FedKRSO 2 intervals x 2 steps
    fedkrso = _run(tmp_path, netns, model, bbc_small,
                   {"name": "fedkrso", "k": 4, "rank": 4, "intervals": 2, "interval_steps": steps // 2, "lr": 1e-3})
    # FedAvg on exactly the matrices FedKRSO reaches (its embeddings frozen): a full model
    # (15 MB of embeddings here) would take minutes per round on this link, and the ratio
    # measured this way is a lower bound for full fine-tuning's
    fedavg = _run(tmp_path, netns, model, bbc_small, {"name": "fedavg", "steps": steps, "train_embeddings": False})
    assert [r["round"] for r in fedkrso] == list(range(ROUNDS))
    assert [r["round"] for r in fedavg] == list(range(ROUNDS))
    k_up = fedkrso[-1]["uplink_wire_bytes_per_client"]
    a_up = fedavg[-1]["uplink_wire_bytes_per_client"]
    shaping = "netem rate 10mbit delay 50ms" if netns[2] == "netem" else \
        f"tbf rate 10mbit + delay_relay {DELAY_MS} ms each way"
    print("netns:", json.dumps({"shaping": shaping,
                                "fedkrso_round_seconds": [r["round_seconds"] for r in fedkrso],
                                "fedavg_round_seconds": [r["round_seconds"] for r in fedavg],
                                "uplink_wire_bytes_per_client": {"fedkrso": k_up, "fedavg": a_up}}))
    # the link carries what the methods say they send: wire bytes track each method's payload,
    # and on this tiny model (hidden 128, dense pooler + head) FedAvg sends ~9x FedKRSO's bytes
    for rows in (fedkrso, fedavg):
        assert rows[-1]["uplink_wire_bytes_per_client"] < 1.05 * rows[-1]["uplink_payload_bytes_per_client"] + 4096
    assert a_up > 5 * k_up, (a_up, k_up)


def test_delay_relay_forwards_every_byte_both_ways(tmp_path):
    """The fallback for kernels without netem relays a connection whole: a single byte, then
    4 MiB sent while the echo streams back (bytes in flight both ways at once). Its delay is
    what it is for, and is not timed here (tests do not time)."""
    import socket
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(1 << 16):
                self.request.sendall(data)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as echo:
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        port_file = tmp_path / "relay.port"
        relay = subprocess.Popen([sys.executable, str(DELAY_RELAY), "--target", f"127.0.0.1:{echo.server_address[1]}",
                                  "--delay-ms", str(DELAY_MS), "--port-file", str(port_file)])
        try:
            port = _wait_port(port_file, relay, tmp_path / "none", timeout=30)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
                blob = os.urandom(4 << 20)
                threading.Thread(target=s.sendall, args=(blob,), daemon=True).start()
                got = bytearray()
                while len(got) < len(blob):
                    got += s.recv(1 << 20)
            assert bytes(got) == blob
        finally:
            echo.shutdown()
            relay.kill()
            relay.wait(timeout=30)
