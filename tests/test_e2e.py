"""End to end: a real server and real client processes over real gRPC on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedkrso.common.accounting import fedkrso_uplink_bytes
from fedkrso.bench.launch import Cluster
from fedkrso.common.methods.base import out_in
from fedkrso.common.models import build_tiny, load_model
from fedkrso.common.methods import build_method
from fedkrso.common.config import parse_config

pytestmark = pytest.mark.slow


def write_config(path: Path, model: Path, data: Path, out: Path, method: dict, rounds: int = 3,
                 clients: int = 2) -> Path:
    cfg = {
        "run": {"name": "e2e", "seed": 3, "output_dir": str(out)},
        "model": {"name": str(model), "task": "sequence-classification", "num_labels": 5, "max_length": 48},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": clients, "min_clients": clients, "deadline_s": 300},
        "training": {"batch_size": 8},
        "eval": {"data": str(data / "eval")},
        "server": {"listen": "127.0.0.1:0"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cluster(tmp: Path, config: Path, data: Path, clients: int, timeout: float = 420) -> Cluster:
    cluster = Cluster(tmp)
    try:
        cluster.start_server(config)
        for i in range(clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}")
        assert cluster.wait(timeout) == 0, cluster.server.text()[-3000:]
        for c in cluster.clients:
            assert c.wait(60) == 0, c.text()[-3000:]
    finally:
        cluster.stop()
    return cluster


def test_fedkrso_three_rounds_two_clients(tmp_path, bbc_small):
    model = build_tiny("bert", tmp_path / "model", num_labels=5)
    out = tmp_path / "out"
    method = {"name": "fedkrso", "k": 4, "rank": 4, "intervals": 2, "interval_steps": 3, "lr": 1e-3}
    config = write_config(tmp_path / "round.yaml", model, bbc_small, out, method)
    cluster = run_cluster(tmp_path, config, bbc_small, clients=2)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("clients", "uplink_payload_bytes", "uplink_wire_bytes", "downlink_payload_bytes",
                "downlink_wire_bytes", "wire_efficiency", "eval_loss", "eval_accuracy",
                "round_seconds", "fedavg_equivalent_bytes"):
        assert all(key in r for r in rows), key
    assert all(len(r["clients"]) == 2 for r in rows)

    # uplink payload per client equals ALGORITHM.md section 6 exactly
    cfg = parse_config(yaml.safe_load(config.read_text()))
    m = load_model(str(model), "sequence-classification", 5, cfg.run.seed)
    meth = build_method(cfg.method, cfg.run.seed)
    meth.prepare(m)
    sum_dm = sum(out_in(mod)[0] for mod in meth.targets(m).values())
    dense = sum(p.numel() for p in meth.dense(m).values())
    for r in rows:
        for cid, c in r["per_client"].items():
            want = fedkrso_uplink_bytes(sum_dm, c["seeds_used"], 4, dense, 4)
            assert c["uplink_payload_bytes"] == want, (r["round"], cid)
            assert c["uplink_wire_bytes"] > c["uplink_payload_bytes"]
        assert r["uplink_wire_bytes"] >= r["uplink_payload_bytes"]
        assert r["downlink_wire_bytes"] >= r["downlink_payload_bytes"]

    # every client ends on the server's final weights, bit for bit
    server_fp = (out / "final_state_fingerprint.txt").read_text().strip()
    for c in cluster.clients:
        report = json.loads((tmp_path / f"{c.name}.json").read_text())
        assert report["state_fingerprint"] == server_fp
        assert report["have_round"] == 3 and report["rounds_trained"] == [0, 1, 2]

    # the saved model loads with plain transformers and carries the trained weights
    from transformers import AutoModelForSequenceClassification

    final = AutoModelForSequenceClassification.from_pretrained(out / "final")
    meth.prepare(final)
    assert meth.state_fingerprint(final) == server_fp
    assert "round" in cluster.server.text() and "eval acc" in cluster.server.text()


def test_wire_efficiency_for_megabyte_payloads(tmp_path, bbc_small):
    """Uplink and downlink payloads of 1 MB or more reach at least 0.99 payload/wire."""
    model = build_tiny("bert", tmp_path / "model", num_labels=5, hidden=256)
    out = tmp_path / "out"
    method = {"name": "fedkrso", "k": 2, "rank": 64, "intervals": 2, "interval_steps": 1, "lr": 1e-3}
    config = write_config(tmp_path / "round.yaml", model, bbc_small, out, method, rounds=2)
    run_cluster(tmp_path, config, bbc_small, clients=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checked = 0
    for r in rows:
        for c in r["per_client"].values():
            for direction in ("uplink", "downlink"):
                payload, wire = c[f"{direction}_payload_bytes"], c[f"{direction}_wire_bytes"]
                if payload >= 1_000_000:
                    assert payload / wire >= 0.99, (direction, payload, wire)
                    checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"method": {"name": "fedkrso", "rank": 0}}, "method.fedkrso.rank"),
        ({"method": {"name": "nope"}}, "method"),
        ({"rounds": {"clients_per_round": 1, "min_clients": 3}}, "min_clients=3 exceeds"),
        ({"model": {"name": "x", "num_labels": 2, "labels": ["a"]}}, "labels has 1 names"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_server_rejects_bad_config_naming_the_field(tmp_path, patch, message):
    cfg = {"model": {"name": "minilm"}, "method": {"name": "fedkrso"}}
    for key, value in patch.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) and key != "method" else value
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "fedkrso.server.main", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
