"""The in-process simulator (``fedkrso-sim``) against the distributed run.

For the same config, data and torch thread count, a simulated run must reach the state
fingerprints of a distributed run after every round. The distributed fingerprints of the
golden run (``tests/golden/fingerprints.json``, real server and client processes) are the
reference, so the simulator is checked against what real processes produced, for FedKRSO and
two peers (on a CPU whose float kernels differ from the recording machine's, against a
distributed run of the same job made there), and its metrics rows carry the same payload and message bytes as a distributed run
of the same config, with socket bytes marked not measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedkrso.bench.launch import child_env
from test_golden import METHODS, ROUNDS, golden_config, golden_data, recorded_runs, run_golden  # noqa: F401

pytestmark = pytest.mark.slow


def run_sim(tmp: Path, model: Path, data: Path, method: dict) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "round.yaml"
    config.write_text(yaml.safe_dump(golden_config(model, tmp / "out", method)))
    proc = subprocess.run([sys.executable, "-m", "fedkrso.sim.main", "--config", str(config), "--data-root", str(data),
                           "--threads", "1"], capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["clients"] == 2 and summary["round"] == ROUNDS - 1
    return [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_simulated_run_reaches_the_distributed_fingerprints(tmp_path, tiny_bert, golden_data, method):
    """Every round's state fingerprint; for FedKRSO also every round's payload and message bytes
    per client, from the same messages as a distributed run of the same job (wire not measured)."""
    recorded = recorded_runs()
    dist = None
    if recorded is None or method == "fedkrso":  # a distributed run made here
        (tmp_path / "dist").mkdir()
        dist = run_golden(tmp_path / "dist", tiny_bert, golden_data, METHODS[method])
    # on a CPU with no recording of its float kernels, the run made here
    expected = recorded[method] if recorded is not None else [r["state_fingerprint"] for r in dist]
    rows = run_sim(tmp_path / "sim", tiny_bert, golden_data, METHODS[method])
    assert len(rows) == ROUNDS and [r["state_fingerprint"] for r in rows] == expected
    if method != "fedkrso":
        return
    assert len(dist) == ROUNDS
    for s, d in zip(rows, dist):
        assert s["clients"] == d["clients"]
        for key in ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes",
                    "downlink_message_bytes", "fedavg_equivalent_bytes"):
            assert s[key] == d[key], (s["round"], key)
        assert s["uplink_wire_bytes"] is None and s["downlink_wire_bytes"] is None and s["wire_efficiency"] is None
        assert d["uplink_wire_bytes"] > d["uplink_message_bytes"]
