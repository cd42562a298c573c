"""End to end: a real server and real client processes over real gRPC on loopback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import round_config, run_cluster
from fedkrso.common.config import parse_config
from fedkrso.common.methods import build_method
from fedkrso.common.methods.base import out_in
from fedkrso.common.models import load_model

pytestmark = pytest.mark.slow

# The end-of-run table's columns, in order, and the metrics.jsonl key each one shows.
TABLE = [("round", "round"), ("clients", "clients"), ("up payload/client", "uplink_payload_bytes_per_client"),
         ("up wire/client", "uplink_wire_bytes_per_client"), ("down payload/client", "downlink_payload_bytes_per_client"),
         ("down wire/client", "downlink_wire_bytes_per_client"), ("wire eff", "wire_efficiency"),
         ("fedavg bytes", "fedavg_equivalent_bytes"), ("train loss", "train_loss"), ("eval loss", "eval_loss"),
         ("eval acc", "eval_accuracy"), ("secs", "round_seconds")]


def e2e_config(model, data, out, method: dict, rounds: int = 3) -> dict:
    return round_config(model, out, run={"name": "e2e", "seed": 3}, model={"num_labels": 5, "max_length": 48},
                        method=method, rounds={"total": rounds, "deadline_s": 300},
                        eval={"data": str(data / "eval")})


def printed_table(log: str) -> list[list[str]]:
    """The end-of-run table in a server log: its header and data rows, split into cells (cells
    are right-aligned and separated by two or more spaces; no cell holds two spaces)."""
    lines = log.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip() and set(line.strip()) <= {"-", " "})
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[rule - 1:]]
    table = [rows[0]]
    for cells in rows[2:]:
        if len(cells) != len(rows[0]) or not cells[0].isdigit():
            break
        table.append(cells)
    return table


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_fedkrso_three_rounds_two_clients(tmp_path, tiny_models, bbc_small):
    model = tiny_models("bert", 5)
    method = {"name": "fedkrso", "k": 4, "rank": 4, "intervals": 2, "interval_steps": 3, "lr": 1e-3}
    cfg = e2e_config(model, bbc_small, tmp_path / "out", method)
    run = run_cluster(tmp_path, cfg, bbc_small, clients=2, timeout=420)

    rows = run.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("clients", "uplink_payload_bytes", "uplink_wire_bytes", "downlink_payload_bytes",
                "downlink_wire_bytes", "wire_efficiency", "eval_loss", "eval_accuracy",
                "round_seconds", "fedavg_equivalent_bytes"):
        assert all(key in r for r in rows), key
    assert all(len(r["clients"]) == 2 for r in rows)

    # uplink payload per client is docs/algorithm.md section 6 exactly: the accumulators of the seeds
    # the client drew (K_used x r x sum of d_m) and the dense deltas, 4 bytes each (float32)
    parsed = parse_config(cfg)
    m = load_model(str(model), "sequence-classification", 5, parsed.run.seed)
    meth = build_method(parsed.method, parsed.run.seed)
    meth.prepare(m)
    sum_dm = sum(out_in(mod)[0] for mod in meth.targets(m).values())
    dense = sum(p.numel() for p in meth.dense(m).values())
    for r in rows:
        for cid, c in r["per_client"].items():
            assert 1 <= c["seeds_used"] <= 2  # at most one seed per interval
            assert c["uplink_payload_bytes"] == (c["seeds_used"] * 4 * sum_dm + dense) * 4, (r["round"], cid)
            assert c["uplink_wire_bytes"] > c["uplink_payload_bytes"]
        assert r["uplink_wire_bytes"] >= r["uplink_payload_bytes"]
        assert r["downlink_wire_bytes"] >= r["downlink_payload_bytes"]

    for name, report in run.reports.items():  # and each holds the server's final state (run_cluster)
        assert report["have_round"] == 3 and report["rounds_trained"] == [0, 1, 2], name

    # the saved model loads with plain transformers and carries the trained weights
    from transformers import AutoModelForSequenceClassification

    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "final")
    meth.prepare(final)
    assert meth.state_fingerprint(final) == run.final_fingerprint

    # the end-of-run table: one row per round, every column, the values of metrics.jsonl
    header, *table = printed_table(run.cluster.server.text())
    assert header == [h for h, _ in TABLE]
    assert len(table) == len(rows)
    for cells, row in zip(table, rows):
        shown = dict(zip((key for _, key in TABLE), cells))
        assert int(shown["round"]) == row["round"] and int(shown["clients"]) == len(row["clients"])
        # each cell is its value rounded to the column's precision: bytes to 1, ratios and
        # losses to 1e-4, seconds to 0.1 (the tolerance is that half-step, and a hair)
        for key in ("uplink_payload_bytes_per_client", "uplink_wire_bytes_per_client",
                    "downlink_payload_bytes_per_client", "downlink_wire_bytes_per_client", "fedavg_equivalent_bytes"):
            assert number(shown[key]) == pytest.approx(row[key], abs=0.501), key
        for key in ("wire_efficiency", "train_loss", "eval_loss", "eval_accuracy"):
            assert number(shown[key]) == pytest.approx(row[key], abs=5.01e-5), key
        assert number(shown["round_seconds"]) == pytest.approx(row["round_seconds"], abs=0.0501)


def test_wire_efficiency_for_megabyte_payloads(tmp_path, tiny_models, bbc_small):
    """Uplink and downlink payloads of 1 MB or more reach at least 0.99 payload/wire."""
    model = tiny_models("bert", 5, hidden=256)
    method = {"name": "fedkrso", "k": 2, "rank": 64, "intervals": 2, "interval_steps": 1, "lr": 1e-3}
    run = run_cluster(tmp_path, e2e_config(model, bbc_small, tmp_path / "out", method, rounds=2), bbc_small,
                      clients=2, timeout=420)
    checked = 0
    for r in run.rows:
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
        ({"method": {"name": "fedkrso", "rank": 0}}, "method.fedkrso.rank: Input should be greater than or equal to 1"),
        ({"method": {"name": "nope"}}, "method: Input tag 'nope' found using 'name' does not match"),
        ({"rounds": {"clients_per_round": 1, "min_clients": 3}}, "rounds: Value error, min_clients=3 exceeds"),
        ({"model": {"name": "x", "num_labels": 2, "labels": ["a"]}}, "model: Value error, labels has 1 names"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
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


def test_fedkseed_sends_its_candidates_once_and_catches_up_laggards_with_one_vector(tmp_path, tiny_bert, shards):
    """Real processes, 3 clients, 1 per round: FedKSeed's K candidate seeds travel only in the
    header of a client holding none (its StartRound says so: holds_run_seeds); a client behind by R rounds downloads R
    deltas of K scalars and the head, or one snapshot (the per-candidate sums, K float64, and
    the head: one summed vector) when that is smaller; every client ends on the server's state
    fingerprint."""
    k = 16
    cfg = round_config(tiny_bert, tmp_path / "out", rounds={"total": 5, "clients_per_round": 1, "min_clients": 1},
                       method={"name": "fedkseed", "k": k, "steps": 4, "lr": 1e-4})
    run = run_cluster(tmp_path, cfg, shards, clients=3)
    meth = parse_config(cfg).build_method()
    model = load_model(str(tiny_bert), "sequence-classification", 2, cfg["run"]["seed"])
    meth.prepare(model)
    head = sum(p.numel() for p in meth.head(model).values())
    delta, snapshot = 4 * (k + head), 8 * k + 4 * head
    have: dict[str, int] = {}
    for row in run.rows:
        (client,) = row["clients"]
        r, held = row["round"], have.get(client, 0)
        behind = r - held
        expected = (8 * k if client not in have else 0) + (min(behind * delta, snapshot) if behind else 0)
        assert row["per_client"][client]["downlink_payload_bytes"] == expected, (r, client, held)
        have[client] = r  # it trained round r from W^r and holds W^r
    assert sum(rep["snapshots"] for rep in run.reports.values()) >= 1, run.reports
