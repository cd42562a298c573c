"""Figures that stay true across a server restart, found by killing and restarting a real server.

* A client that downloaded a round before the crash and submits after it keeps its downlink
  bytes (the open round's record saves each finished download).
* Wire bytes are measured or marked not measured (None), never silently copied from message
  bytes: the crashed round's client whose connection died has no wire figure, every client of
  a later round has a measured one.
* A torn last line in metrics.jsonl (power loss) is cut off on restart and the row written
  again; the file ends with one row per round.
* A restored open round waits at least ``rounds.resume_grace_s`` for clients still
  reconnecting with backoff, however close to its deadline the crash came.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from fedkrso.bench.launch import Cluster
from test_reliability import config_dict, metric_rows, shards, tiny_model, wait_until  # noqa: F401
from test_restart import events, free_port

pytestmark = pytest.mark.slow
TOTAL = 4
CLIENTS = ("shard0", "shard1")


def write_config(tmp: Path, model: Path, out: Path, **rounds) -> Path:
    cfg = config_dict(model, out, total=TOTAL, clients_per_round=2, min_clients=1, deadline_s=60,
                      start_timeout_s=60, **rounds)
    cfg["method"].update({"intervals": 2, "interval_steps": 60})  # training lasts long enough to stop it
    cfg["server"].update({"listen": f"127.0.0.1:{free_port()}", "checkpoint_every": 2})
    path = tmp / "round.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def client_events(proc, name: str) -> list[dict]:
    return events(proc.text(), name)


def crash_while_training(tmp: Path, model: Path, data: Path, **rounds):
    """Run until shard1 starts training a round (its download complete) and shard0's update of
    that round is acknowledged, with shard1 SIGSTOPped meanwhile; then SIGKILL the server,
    resume shard1 and restart the server. Returns (cluster, out, crashed round, config)."""
    out = tmp / "out"
    config = write_config(tmp, model, out, **rounds)
    cluster = Cluster(tmp)
    cluster.start_server(config)
    procs = {n: cluster.start_client(data / n, n, args=["--poll-seconds", "2"]) for n in CLIENTS}
    for r in range(1, TOTAL):
        wait_until(lambda: any(e["round"] == r for e in client_events(procs["shard1"], "training")), 120,
                   f"shard1 training round {r}")
        procs["shard1"].popen.send_signal(signal.SIGSTOP)
        if any(e["round"] == r for e in client_events(procs["shard1"], "update_submitted")):
            procs["shard1"].popen.send_signal(signal.SIGCONT)  # too late: try the next round
            continue
        wait_until(lambda: any(e["round"] == r and e["client"] == "shard0"
                               for e in events(cluster.server.text(), "update_accepted")), 60, "shard0's update")
        break
    else:
        pytest.fail("shard1 always submitted before it could be stopped")
    cluster.server.popen.send_signal(signal.SIGKILL)
    cluster.server.wait(30)
    procs["shard1"].popen.send_signal(signal.SIGCONT)  # it reconnects with backoff meanwhile
    return cluster, out, r, config


def finish(cluster: Cluster) -> None:
    assert cluster.wait(180) == 0, cluster.server.text()[-3000:]
    for p in cluster.clients:
        assert p.wait(60) == 0, p.text()[-3000:]


def test_downloads_before_a_crash_keep_their_bytes_and_wire_is_never_faked(tmp_path, tiny_model, shards):
    cluster, out, r, config = crash_while_training(tmp_path, tiny_model, shards, resume_grace_s=60)
    try:
        cluster.start_server(config, name="server-restarted")
        finish(cluster)
    finally:
        cluster.stop()
    rows = metric_rows(out)
    assert [row["round"] for row in rows] == list(range(TOTAL))
    crashed = rows[r]
    assert sorted(crashed["clients"]) == list(CLIENTS), crashed["dropped"]
    late = crashed["per_client"]["shard1"]
    # downloaded before the crash, submitted after it: its downlink bytes were kept ...
    assert late["downlink_payload_bytes"] == crashed["per_client"]["shard0"]["downlink_payload_bytes"] > 0
    # ... and its connection died with the server: no socket figure, rather than a made-up one
    assert late["uplink_wire_bytes"] is None and late["downlink_wire_bytes"] is None
    assert crashed["uplink_wire_clients"] == 1 and crashed["downlink_wire_clients"] == 1
    assert crashed["uplink_wire_bytes"] == crashed["per_client"]["shard0"]["uplink_wire_bytes"]
    # every later round is measured on the new connections, above the message bytes
    for row in rows[r + 1:]:
        assert row["uplink_wire_clients"] == row["downlink_wire_clients"] == 2
        assert row["uplink_wire_bytes"] > row["uplink_message_bytes"]
        assert row["downlink_wire_bytes"] > row["downlink_message_bytes"]
    (resumed,) = events(cluster.server.text(), "run_resumed")
    assert resumed["round"] == r and resumed["deadline_remaining_s"] >= 59


def test_a_torn_metrics_line_is_repaired_on_restart(tmp_path, tiny_model, shards):
    cluster, out, r, config = crash_while_training(tmp_path, tiny_model, shards)
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    metrics.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])  # the last row torn
    try:
        cluster.start_server(config, name="server-restarted")
        finish(cluster)
    finally:
        cluster.stop()
    assert events(cluster.server.text(), "metrics_repaired")
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(TOTAL))  # each once, all parse
