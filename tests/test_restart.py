"""Server crash and restart: the run resumes from ``<output_dir>/state`` (server/state.py).

Unit tests of the on-disk format first, then real processes on loopback (``Cluster``): the
server is SIGKILLed mid-round after an acknowledged update, and between rounds, restarted with
the same config, and the run must end exactly as a run without the crash would.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedkrso.common.config import parse_config
from fedkrso.bench.launch import Cluster
from fedkrso.server import state as state_mod
from fedkrso.server.coordinator import Coordinator
from fedkrso.server.metrics import MetricsWriter
from fedkrso.server.state import RunStore, StateError, atomic_write, read_tensors, write_tensors
from test_reliability import config_dict, metric_rows, shards, tiny_model, wait_until  # noqa: F401


# -- server/state.py ---------------------------------------------------------------------------
def test_atomic_write_leaves_old_or_new_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write(path, b"old")

    def crash(*_):
        raise OSError("simulated crash between the tmp write and the rename")

    monkeypatch.setattr(state_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no tmp file left behind
    monkeypatch.undo()
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"


def test_tensors_round_trip_in_wire_dtype(tmp_path):
    t = {"acc.0.w": torch.randn(3, 2).to(torch.bfloat16), "dense.b": torch.arange(4, dtype=torch.float32)}
    write_tensors(tmp_path / "d.safetensors", t)
    back = read_tensors(tmp_path / "d.safetensors")
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in t.items())


def test_store_commits_rounds_and_refuses_another_run(tmp_path):
    store = RunStore(tmp_path / "state", "run-a")
    assert store.load() is None
    store.start("fp0")
    delta = {"x": torch.ones(2)}
    store.save_open_round({"round": 0, "seeds": [7], "plan_fingerprint": "p", "selected": ["a"], "dropped": [],
                           "deadline_remaining_s": 5.0, "elapsed_s": 1.0, "submissions": {}},
                          ({"x": torch.ones(2, dtype=torch.float64)}, {"kind": "mean", "count": 1}))
    opened = RunStore(tmp_path / "state", "run-a").load()
    assert opened.completed == 0 and opened.open_round["selected"] == ["a"]
    assert torch.equal(opened.open_tensors["x"], torch.ones(2, dtype=torch.float64))
    store.commit_round(0, [7], delta, "fp1", {"a": "d1"}, {"round": 0}, checkpoint={"w": torch.zeros(1)})
    saved = RunStore(tmp_path / "state", "run-a").load()
    assert saved.completed == 1 and saved.open_round is None and saved.checkpoint_round == 1
    assert saved.state_fingerprints == {0: "fp0", 1: "fp1"} and saved.accepted_digests == {(0, "a"): "d1"}
    assert saved.seeds == {0: [7]} and saved.last_row == {"round": 0}
    assert not list((tmp_path / "state").glob("open*"))
    with pytest.raises(StateError, match="--fresh"):
        RunStore(tmp_path / "state", "run-b").load()


def test_resume_refuses_state_that_does_not_replay_to_its_fingerprint(tmp_path, tiny_model):
    cfg = parse_config(config_dict(tiny_model, tmp_path / "out"))
    coord = Coordinator(cfg)
    coord.store.commit_round(0, coord.method.round_seeds(0), {}, "not-the-real-fingerprint", {}, {"round": 0},
                             checkpoint=None)
    with pytest.raises(StateError, match="refusing to resume"):
        Coordinator(cfg)
    fresh = Coordinator(cfg, fresh=True)  # moves the bad state aside and starts over
    assert fresh.completed == 0 and list((tmp_path / "out").glob("previous-*/state/manifest.json"))


def test_metrics_row_is_written_once(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"round": 0, "x": 1})
    again = MetricsWriter(tmp_path / "metrics.jsonl")  # as after a restart
    assert again.has(0)
    again.write({"round": 0, "x": 2})
    again.write({"round": 1, "x": 3})
    assert [(r["round"], r["x"]) for r in again.rows()] == [(0, 1), (1, 3)]


# -- real processes ------------------------------------------------------------------------------

TOTAL = 4
CLIENTS = ("shard0", "shard1")


def free_port() -> int:
    """A port to pin in the config: the restarted server must listen where clients reconnect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, model: Path, out: Path) -> Path:
    cfg = config_dict(model, out, total=TOTAL, clients_per_round=2, min_clients=2, deadline_s=60,
                      start_timeout_s=60)
    cfg["server"].update({"listen": f"127.0.0.1:{free_port()}", "max_chunk_bytes": 1 << 16,
                          "checkpoint_every": 2})  # restarts exercise checkpoint + replay
    path = tmp / "round.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def events(text: str, name: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            e = json.loads(line)
            if e.get("event") == name:
                out.append(e)
    return out


def accepted(cluster: Cluster, round_id: int) -> set[str]:
    return {e["client"] for e in events(cluster.server.text(), "update_accepted") if e["round"] == round_id}


def start_clients(cluster: Cluster, data: Path) -> list:
    return [cluster.start_client(data / name, name, args=["--poll-seconds", "2"]) for name in CLIENTS]


def finish(cluster: Cluster, out: Path) -> tuple[list[dict], str]:
    """Wait for the run to end; every process exits 0. Returns metrics rows, final fingerprint."""
    assert cluster.wait(150) == 0, cluster.server.text()[-3000:]
    for p in cluster.clients:
        assert p.wait(60) == 0, p.text()[-3000:]
    fp = (out / "final_state_fingerprint.txt").read_text().strip()
    for name in CLIENTS:
        assert json.loads((cluster.workdir / f"{name}.json").read_text())["state_fingerprint"] == fp
    rows = metric_rows(out)
    assert [r["round"] for r in rows] == list(range(TOTAL))  # once each: no duplicate, no gap
    return rows, fp


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, shards) -> list[dict]:
    """The same config run without a crash: its metrics rows (training is deterministic)."""
    tmp = tmp_path_factory.mktemp("reference")
    cluster = Cluster(tmp)
    try:
        cluster.start_server(write_config(tmp, tiny_model, tmp / "out"))
        start_clients(cluster, shards)
        rows, _ = finish(cluster, tmp / "out")
    finally:
        cluster.stop()
    return rows


def crash_and_restart(tmp: Path, model: Path, data: Path, stop: tuple[str, ...], want_accepted: int,
                      first: int):
    """Run, and once round ``first - 1`` (or a later one) closed SIGSTOP the ``stop`` clients, wait until ``want_accepted``
    updates of the next round were acknowledged, SIGKILL the server, resume the clients and
    restart the server with the same config. Retries on the next round if a stopped client
    had already submitted (a race with SIGSTOP). Returns (cluster, out, crashed round)."""
    out = tmp / "out"
    config = write_config(tmp, model, out)
    cluster = Cluster(tmp)
    try:
        cluster.start_server(config)
        procs = dict(zip(CLIENTS, start_clients(cluster, data)))
        for r in range(first, TOTAL):
            wait_until(lambda: len(metric_rows(out)) >= r, 120, f"round {r - 1} to close")
            for name in stop:
                procs[name].popen.send_signal(signal.SIGSTOP)
            time.sleep(0.5 if not want_accepted else 0)
            wait_until(lambda: len(accepted(cluster, r)) >= want_accepted, 60, f"{want_accepted} update(s)")
            if not accepted(cluster, r) & set(stop):
                break
            for name in stop:  # lost the race: a stopped client had submitted already
                procs[name].popen.send_signal(signal.SIGCONT)
        else:
            pytest.fail("no round where the stopped clients had not submitted")
        cluster.server.popen.send_signal(signal.SIGKILL)
        cluster.server.wait(30)
        assert len(accepted(cluster, r)) == want_accepted
        for name in stop:
            procs[name].popen.send_signal(signal.SIGCONT)
        cluster.start_server(config, name="server-restarted")
    except BaseException:
        cluster.stop()
        raise
    return cluster, out, r


@pytest.mark.slow
def test_server_killed_mid_round_resumes_without_losing_the_acknowledged_update(
        tmp_path, tiny_model, shards, reference):
    cluster, out, r = crash_and_restart(tmp_path, tiny_model, shards, stop=("shard1",), want_accepted=1,
                                         first=1)
    try:
        rows, fp = finish(cluster, out)
    finally:
        cluster.stop()
    (resumed,) = events(cluster.server.text(), "run_resumed")
    assert resumed["round"] == r and resumed["accepted"] == 1 and resumed["open_round"]
    assert "shard0" in rows[r]["clients"] and sorted(rows[r]["clients"]) == sorted(CLIENTS)
    assert "shard0" not in accepted(cluster, r)  # acknowledged before the crash, not retrained
    assert [row["state_fingerprint"] for row in rows] == [row["state_fingerprint"] for row in reference]
    assert fp == reference[-1]["state_fingerprint"]


@pytest.mark.slow
def test_server_killed_between_rounds_resumes(tmp_path, tiny_model, shards, reference):
    cluster, out, r = crash_and_restart(tmp_path, tiny_model, shards, stop=CLIENTS, want_accepted=0, first=2)
    try:
        rows, fp = finish(cluster, out)
    finally:
        cluster.stop()
    (resumed,) = events(cluster.server.text(), "run_resumed")
    assert resumed["round"] == r and resumed["accepted"] == 0
    assert [row["state_fingerprint"] for row in rows] == [row["state_fingerprint"] for row in reference]
    assert fp == reference[-1]["state_fingerprint"]


def test_run_identity_ignores_listen_credentials_and_output_dir(tmp_path):
    """A restart may bind another port, rotate certificates or move the output folder and
    still resume; any setting that shapes the results makes another run."""
    from fedkrso.server.coordinator import run_identity

    base = config_dict(tmp_path / "m", tmp_path / "out")
    same = json.loads(json.dumps(base))
    same["server"]["listen"] = "0.0.0.0:6000"
    same["run"]["output_dir"] = str(tmp_path / "elsewhere")
    same["security"] = {"insecure": True}
    other = json.loads(json.dumps(base))
    other["method"]["rank"] += 1
    ids = [run_identity(parse_config(c)) for c in (base, same, other)]
    assert ids[0] == ids[1] != ids[2]
