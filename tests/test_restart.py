"""Server crash and restart: the run resumes from ``<output_dir>/state`` (server/state.py).

Unit tests of the on-disk format first, then real processes on loopback (``Cluster``): the
server is SIGKILLed mid-round after an acknowledged update, and between rounds, restarted with
the same config, and the run must end exactly as a run without the crash would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ClusterRun, finish_cluster, log_events, metric_rows, round_config, wait_until, write_round_yaml
from fedkrso.bench.launch import Cluster, Proc
from fedkrso.common.accounting import Traffic
from fedkrso.common.aggregate import StreamingAggregator
from fedkrso.common.config import parse_config
from fedkrso.server import state as state_mod
from fedkrso.server.coordinator import Coordinator, run_identity
from fedkrso.server.metrics import MetricsWriter
from fedkrso.server.open_round import OpenSave
from fedkrso.server.rounds import RoundState, Submission
from fedkrso.server.state import RunStore, StateError, atomic_write, read_tensors, write_tensors


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
    store.write_open(OpenSave(0, record={"round": 0, "seeds": [7], "plan_fingerprint": "p", "selected": ["a"],
                                         "dropped": [], "deadline_remaining_s": 5.0, "elapsed_s": 1.0,
                                         "submissions": {}},
                              aggregator=({"x": torch.ones(2, dtype=torch.float64)}, {"kind": "mean", "count": 1})))
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


def test_resume_refuses_state_that_does_not_replay_to_its_fingerprint(tmp_path, tiny_bert):
    cfg = parse_config(round_config(tiny_bert, tmp_path / "out"))
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



def test_metrics_writer_repairs_a_torn_last_line(tmp_path):
    """A row torn by power loss is cut off (its round is not counted as written, so it is
    written again); a whole row that lost only its newline is kept and terminated."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0, "x": 1}\n{"round": 1, "x"')
    writer = MetricsWriter(path)
    assert writer.has(0) and not writer.has(1)
    writer.write({"round": 1, "x": 2})
    assert [r["x"] for r in writer.rows()] == [1, 2]
    path.write_text('{"round": 0, "x": 1}\n{"round": 1, "x": 2}')
    assert MetricsWriter(path).has(1) and path.read_text().endswith("}\n")


# -- the open round: a whole record, then a journal of what changed (server/open_round.py) ---------
def open_round(n: int) -> RoundState:
    rs = RoundState(0, [7], "p", {f"c{i:04d}" for i in range(n)}, time.monotonic() + 60,
                    aggregator=StreamingAggregator())
    rs.declared = {c: 10 for c in rs.selected}
    return rs


def accept(rs: RoundState, client: str) -> None:
    """What ``UpdateIntake.accept`` records of an update."""
    rs.aggregator.add({"x": torch.ones(2)}, 1.0)
    rs.traffic_of(client).up_payload = 8
    rs.submissions[client] = Submission(client, f"d-{client}", 10, 0.5, 4, 1.0, 0, 0, [7], weight=1.0)


def test_the_open_round_is_journaled_and_resumes_from_record_and_journal(tmp_path):
    """The round's first save writes the whole record; a save after an update appends one
    line holding only what changed (its size does not grow with the round's clients); a load
    merges record and lines, leaving out a line a crash tore; the first save after a load
    writes the whole record again, with a fresh journal."""
    store = RunStore(tmp_path / "state", "run-a")
    store.start("fp0")
    rs = open_round(500)
    store.write_open(store.plan_open(rs, with_aggregate=False))
    record_bytes = (tmp_path / "state" / "open_round.json").stat().st_size
    for group in (["c0001", "c0002"], ["c0003"]):
        for c in group:
            accept(rs, c)
        store.write_open(store.plan_open(rs, with_aggregate=True))
    (journal,) = (tmp_path / "state").glob("open-*.jsonl")
    lines = journal.read_bytes().splitlines()
    assert [sorted(json.loads(line)["submissions"]) for line in lines] == [["c0001", "c0002"], ["c0003"]]
    assert b"c0001" not in lines[1] and len(lines[1]) * 10 < record_bytes  # not the 500 clients

    with journal.open("ab") as f:  # a crash in the middle of the next line
        f.write(b'{"submissions": {"c0004": ')
    saved = RunStore(tmp_path / "state", "run-a").load()
    assert sorted(saved.open_round["submissions"]) == ["c0001", "c0002", "c0003"]
    assert saved.open_round["traffic"]["c0003"]["up_payload"] == 8
    assert torch.equal(saved.open_tensors["x"], torch.full((2,), 3.0, dtype=torch.float64))

    reopened = RunStore(tmp_path / "state", "run-a")
    reopened.load()
    assert reopened.plan_open(rs, with_aggregate=False).record is not None  # never appended after a torn line
    reopened.write_open(reopened.plan_open(rs, with_aggregate=False))
    assert journal.name not in [p.name for p in (tmp_path / "state").glob("open-*.jsonl")]


def test_a_selection_change_writes_the_whole_record(tmp_path):
    """A line holds submissions and traffic only: a client dropped or added, or a new deadline,
    goes into a whole record."""
    store = RunStore(tmp_path / "state", "run-a")
    store.start("fp0")
    rs = open_round(3)
    store.write_open(store.plan_open(rs, with_aggregate=False))
    accept(rs, "c0000")
    assert store.plan_open(rs, with_aggregate=True).line is not None
    rs.selected.discard("c0002")
    rs.dropped.add("c0002")
    save = store.plan_open(rs, with_aggregate=False)
    assert save.record is not None and save.record["dropped"] == ["c0002"]


def test_the_open_round_is_read_on_the_event_loop_never_in_a_worker_thread(tmp_path, tiny_bert, monkeypatch):
    """The record used to be built in the worker thread that writes it while the event loop
    went on changing the round: a download starting meanwhile added to ``rs.traffic`` in the
    middle of the iteration ("dictionary changed size during iteration"), and every update of
    that group commit was refused with INTERNAL (seen at 1,000 clients). It is taken on the
    loop, while ``fold_lock`` is held; the thread only writes it."""
    coord = Coordinator(parse_config(round_config(tiny_bert, tmp_path / "out")))
    rs = open_round(2)
    accept(rs, "c0000")
    readers = set()
    numbers = Traffic.numbers
    monkeypatch.setattr(Traffic, "numbers", lambda t: readers.add(threading.get_ident()) or numbers(t))

    async def save() -> int:
        async with coord.fold_lock:
            await coord.save_open(rs, with_aggregate=True)
        return threading.get_ident()

    assert readers == {asyncio.run(save())}


def test_a_state_written_before_the_journal_still_resumes(tmp_path):
    """Format 2 (no journal): its open round is read as it is, and the store writes format 3."""
    store = RunStore(tmp_path / "state", "run-a")
    store.start("fp0")
    manifest = json.loads(store.manifest_path.read_text())
    store.manifest_path.write_text(json.dumps({**manifest, "format": 2}))
    store.open_path.write_text(json.dumps({"round": 0, "seeds": [7], "plan_fingerprint": "p", "selected": ["a"],
                                           "dropped": [], "deadline_remaining_s": 5.0, "elapsed_s": 1.0,
                                           "submissions": {}, "traffic": {}, "run_id": "run-a", "tensors": None,
                                           "aggregator": None}))
    reopened = RunStore(tmp_path / "state", "run-a")
    saved = reopened.load()
    assert saved.open_round["selected"] == ["a"] and reopened.manifest["format"] == 3


# -- real processes ------------------------------------------------------------------------------
# The first server binds port 0; a restarted one listens on the port the first one got
# (``--listen``), where the clients reconnect.
TOTAL = 4
CLIENTS = ("shard0", "shard1")


def write_config(tmp: Path, model: Path) -> Path:
    cfg = round_config(model, tmp / "out", rounds={"total": TOTAL},
                       server={"checkpoint_every": 2})  # restarts exercise checkpoint + replay
    return write_round_yaml(tmp / "round.yaml", cfg)


def accepted(cluster: Cluster, round_id: int) -> set[str]:
    """Clients whose update of ``round_id`` the current server acknowledged (its log)."""
    return {e["client"] for e in log_events(cluster.server.text(), "update_accepted") if e["round"] == round_id}


def start_clients(cluster: Cluster, data: Path) -> dict[str, Proc]:
    return {name: cluster.start_client(data / name, name, args=["--poll-seconds", "2"]) for name in CLIENTS}


def finish(cluster: Cluster, out: Path) -> ClusterRun:
    """The run ends with every process exiting 0 and every round's row written exactly once."""
    run = finish_cluster(cluster, out, 150)
    assert [r["round"] for r in run.rows] == list(range(TOTAL))  # once each: no duplicate, no gap
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert, shards) -> list[dict]:
    """The same config run without a crash: its metrics rows (training is deterministic)."""
    tmp = tmp_path_factory.mktemp("reference")
    cluster = Cluster(tmp)
    try:
        cluster.start_server(write_config(tmp, tiny_bert))
        start_clients(cluster, shards)
        return finish(cluster, tmp / "out").rows
    finally:
        cluster.stop()


def crash_and_restart(tmp: Path, model: Path, data: Path, stop: tuple[str, ...], want_accepted: int,
                      first: int) -> tuple[Cluster, Path, int]:
    """Run; once round ``r - 1`` closed (``r`` from ``first`` on), SIGSTOP the ``stop``
    clients, wait until ``want_accepted`` updates of round ``r`` were acknowledged, freeze the
    server (SIGSTOP: its log and state can no longer move) and SIGKILL it, resume the clients
    and restart the server on the same port with the same config. Where a stopped client had
    submitted round ``r`` already (it raced the SIGSTOP), the server is resumed and the next
    round tried instead. Returns (cluster, output dir, crashed round)."""
    out = tmp / "out"
    config = write_config(tmp, model)
    cluster = Cluster(tmp)
    try:
        port = cluster.start_server(config)
        procs = start_clients(cluster, data)
        for r in range(first, TOTAL):
            wait_until(lambda: len(metric_rows(out)) >= r, 120, f"round {r - 1} to close")
            for name in stop:
                procs[name].popen.send_signal(signal.SIGSTOP)
            wait_until(lambda: len(accepted(cluster, r)) >= want_accepted, 60, f"{want_accepted} update(s)")
            cluster.server.popen.send_signal(signal.SIGSTOP)
            if not accepted(cluster, r) & set(stop):
                break
            for p in (cluster.server, *(procs[name] for name in stop)):  # lost the race: next round
                p.popen.send_signal(signal.SIGCONT)
        else:
            pytest.fail("no round where the stopped clients had not submitted")
        cluster.server.popen.send_signal(signal.SIGKILL)
        cluster.server.wait(30)
        for name in stop:
            procs[name].popen.send_signal(signal.SIGCONT)
        cluster.start_server(config, args=["--listen", f"127.0.0.1:{port}"], name="server-restarted")
    except BaseException:
        cluster.stop()
        raise
    return cluster, out, r


@pytest.mark.slow
def test_server_killed_mid_round_resumes_without_losing_the_acknowledged_update(
        tmp_path, tiny_bert, shards, reference):
    cluster, out, r = crash_and_restart(tmp_path, tiny_bert, shards, stop=("shard1",), want_accepted=1,
                                         first=1)
    try:
        run = finish(cluster, out)
    finally:
        cluster.stop()
    before = log_events((tmp_path / "server.log").read_text(), "update_accepted")
    assert {e["client"] for e in before if e["round"] == r} == {"shard0"}  # the crash point
    (resumed,) = log_events(cluster.server.text(), "run_resumed")
    assert resumed["round"] == r and resumed["accepted"] == 1 and resumed["open_round"]
    assert sorted(run.rows[r]["clients"]) == sorted(CLIENTS)
    assert "shard0" not in accepted(cluster, r)  # acknowledged before the crash, not retrained
    assert [row["state_fingerprint"] for row in run.rows] == [row["state_fingerprint"] for row in reference]
    assert run.final_fingerprint == reference[-1]["state_fingerprint"]


@pytest.mark.slow
def test_server_killed_between_rounds_resumes(tmp_path, tiny_bert, shards, reference):
    cluster, out, r = crash_and_restart(tmp_path, tiny_bert, shards, stop=CLIENTS, want_accepted=0, first=2)
    try:
        run = finish(cluster, out)
    finally:
        cluster.stop()
    (resumed,) = log_events(cluster.server.text(), "run_resumed")
    assert resumed["round"] == r and resumed["accepted"] == 0
    assert [row["state_fingerprint"] for row in run.rows] == [row["state_fingerprint"] for row in reference]
    assert run.final_fingerprint == reference[-1]["state_fingerprint"]


def test_run_identity_ignores_listen_credentials_and_output_dir(tmp_path):
    """A restart may bind another port, rotate certificates, move the output folder or change
    a limit that shapes no result (how long it waits for clients to leave) and still resume;
    any setting that shapes the results makes another run."""
    base = round_config(tmp_path / "m", tmp_path / "out")
    same = json.loads(json.dumps(base))
    same["server"]["listen"] = "0.0.0.0:6000"
    same["run"]["output_dir"] = str(tmp_path / "elsewhere")
    same["security"] = {"insecure": True}
    same["server"]["finish_wait_s"] = 5
    other = json.loads(json.dumps(base))
    other["method"]["rank"] += 1
    ids = [run_identity(parse_config(c)) for c in (base, same, other)]
    assert ids[0] == ids[1] != ids[2]


# -- figures that stay true across a restart ------------------------------------------------------
def crash_while_training(tmp: Path, model: Path, data: Path, **rounds) -> tuple[Cluster, Path, int, Path, int]:
    """Run until shard1 starts training a round (its download complete) and, with shard1
    SIGSTOPped meanwhile, shard0's update of that round is acknowledged; then SIGKILL the
    server and resume shard1, which reconnects with backoff. Returns (cluster, output dir,
    crashed round, config, port); the caller restarts the server."""
    out = tmp / "out"
    cfg = round_config(model, out, rounds={"total": TOTAL, "min_clients": 1, **rounds},
                       method={"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 60,
                               "lr": 1e-3},  # training lasts long enough to stop it
                       server={"checkpoint_every": 2})
    config = write_round_yaml(tmp / "round.yaml", cfg)
    cluster = Cluster(tmp)
    port = cluster.start_server(config)
    procs = start_clients(cluster, data)

    def shard1_did(event: str, r: int) -> bool:
        return any(e["round"] == r for e in log_events(procs["shard1"].text(), event))

    for r in range(1, TOTAL):
        wait_until(lambda: shard1_did("training", r), 120, f"shard1 training round {r}")
        procs["shard1"].popen.send_signal(signal.SIGSTOP)
        if not shard1_did("update_submitted", r):
            break
        procs["shard1"].popen.send_signal(signal.SIGCONT)  # it submitted already: the next round
    else:
        pytest.fail("shard1 always submitted before it could be stopped")
    wait_until(lambda: "shard0" in accepted(cluster, r), 60, "shard0's update")
    cluster.server.popen.send_signal(signal.SIGKILL)
    cluster.server.wait(30)
    procs["shard1"].popen.send_signal(signal.SIGCONT)
    return cluster, out, r, config, port


@pytest.mark.slow
def test_downloads_before_a_crash_keep_their_bytes_and_wire_is_never_made_up(tmp_path, tiny_bert, shards):
    """shard1 downloads round r, the server dies, shard1 submits to the restarted server: its
    downlink bytes survive (the open round saves finished downloads), its socket figures are
    unmeasured (None: its connection died) rather than copied from message bytes, and every
    later round is measured again. The restored round waits ``resume_grace_s`` for it."""
    cluster, out, r, config, port = crash_while_training(tmp_path, tiny_bert, shards, resume_grace_s=60)
    try:
        cluster.start_server(config, args=["--listen", f"127.0.0.1:{port}"], name="server-restarted")
        rows = finish(cluster, out).rows
    finally:
        cluster.stop()
    crashed = rows[r]
    assert sorted(crashed["clients"]) == sorted(CLIENTS), crashed["dropped"]
    late, early = crashed["per_client"]["shard1"], crashed["per_client"]["shard0"]
    assert late["downlink_payload_bytes"] == early["downlink_payload_bytes"] > 0
    assert late["uplink_wire_bytes"] is None and late["downlink_wire_bytes"] is None
    assert crashed["uplink_wire_clients"] == crashed["downlink_wire_clients"] == 1
    assert crashed["uplink_wire_bytes"] == early["uplink_wire_bytes"] > early["uplink_payload_bytes"]
    for row in rows[r + 1:]:
        assert row["uplink_wire_clients"] == row["downlink_wire_clients"] == 2
        assert row["uplink_wire_bytes"] > row["uplink_message_bytes"]
        assert row["downlink_wire_bytes"] > row["downlink_message_bytes"]
    (resumed,) = log_events(cluster.server.text(), "run_resumed")
    assert resumed["round"] == r and resumed["deadline_remaining_s"] >= 59


@pytest.mark.slow
def test_a_torn_metrics_line_is_cut_and_written_again_on_restart(tmp_path, tiny_bert, shards):
    cluster, out, r, config, port = crash_while_training(tmp_path, tiny_bert, shards)
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    metrics.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])  # power loss mid-row
    try:
        cluster.start_server(config, args=["--listen", f"127.0.0.1:{port}"], name="server-restarted")
        finish(cluster, out)
    finally:
        cluster.stop()
    assert log_events(cluster.server.text(), "metrics_repaired")
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == list(range(TOTAL))
