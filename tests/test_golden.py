"""Golden run: a fixed tiny federated job, through real server and client processes and through
the in-process simulator (``fedkrso-sim``), reaches recorded state fingerprints after every round.

The fingerprints in ``tests/golden/fingerprints.json`` were first recorded before the
restructuring of issue 10 (one client-side round, the coordinator split, methods that describe
themselves), so this test proves that behaviour did not move: the same config, data and seeds
give the same weights, bit for bit, round after round. The simulator must reach the
fingerprints of the processes' run after every round (same config, data and torch thread
count), and for FedKRSO its metrics rows carry the same payload and message bytes, with socket
bytes marked not measured.

Float kernels differ between CPU generations, so each recording holds a probe: the hash of a
few fixed float computations on the machine it was made on. The processes' run is compared
with the recording of this CPU's probe; where there is none, it is not (a warning says so) and
the simulator is still compared with it. The first recording was made before the restructuring
on a machine this project no longer has; the second on the 2-core development machine (AMD
EPYC) the fresh-clone CI runs are made on (2026-12-07), so from then on the behaviour is pinned
there too; the third on a later sitting's machine, also an AMD EPYC but with other float kernels
(2026-12-08). ``FEDKRSO_RECORD_GOLDEN=1`` adds this CPU's recording or replaces it (only ever on
purpose: it is the reference; run it without xdist workers).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import round_config, run_cluster, word_csv
from fedkrso.bench import launch

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "fingerprints.json"
RECORD = os.environ.get("FEDKRSO_RECORD_GOLDEN") == "1"
ROUNDS = 3
# The recorded runs' own settings, not tests/method_cases.py's: the fingerprints were recorded
# with exactly these, so they never move.
METHODS = {  # train_biases: false where the knob came later (issue 11): the recorded behaviour
    "fedkrso": {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 2, "lr": 1e-3,
                "train_biases": False},
    "fedavg": {"name": "fedavg", "steps": 3, "lr": 1e-3},
    "fedit": {"name": "fedit", "steps": 3, "rank": 2, "lr": 1e-3, "train_biases": False},
}


def float_probe() -> str:
    """Hash of fixed float computations (the kernels a training step uses, single thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(33, 65, generator=g), torch.randn(65, 17, generator=g)
        x = torch.randn(4, 9, 32, generator=g)
        outs = [a @ b, torch.addmm(torch.ones(17), a, b), torch.softmax(a, -1),
                torch.nn.functional.gelu(a), torch.nn.functional.layer_norm(x, (32,)), torch.tanh(a),
                torch.exp(a).sum(0), x.sum(), torch.nn.functional.scaled_dot_product_attention(x, x, x)]
        h = hashlib.sha256()
        for t in outs:
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> Path:
    """The recorded run's data: 80 csv rows of 10 words, split over 2 clients (no skew)."""
    from fedkrso.common.data import load_source, make_partition, save_partition

    root = tmp_path_factory.mktemp("golden")
    src = word_csv(root / "d.csv", 80, "good bad film plot actor boring great awful story music dull fine".split(), 10)
    part = make_partition(load_source(f"csv:{src}"), 2, source="csv", alpha=None, seed=0, min_size=10)
    save_partition(part, root / "data")
    return root / "data"


def golden_config(model: Path, out: Path, method: dict) -> dict:
    """The recorded job: seed 7, 3 rounds of 2 clients on ``tiny_bert``."""
    return round_config(model, out, run={"name": "golden", "seed": 7}, method=method,
                        rounds={"total": ROUNDS, "deadline_s": 300})


def run_golden(tmp: Path, model: Path, data: Path, method: dict) -> list[dict]:
    """The recorded job through real server and client processes: its metrics rows."""
    run = run_cluster(tmp, golden_config(model, tmp / "out", method), data, clients=2)
    assert [r["round"] for r in run.rows] == list(range(ROUNDS))
    return run.rows


def recordings() -> list[dict]:
    """The golden file's recordings: ``{"probe", "note", "runs": {method: fingerprints}}`` each."""
    return json.loads(GOLDEN.read_text())["recordings"] if GOLDEN.exists() else []


def recorded_runs() -> dict[str, list[str]] | None:
    """The fingerprints recorded on a CPU whose float kernels are this one's; None if none was."""
    probe = float_probe()
    return next((r["runs"] for r in recordings() if r["probe"] == probe), None)


def run_sim(tmp: Path, model: Path, data: Path, method: dict) -> list[dict]:
    """The recorded job through ``fedkrso-sim``: its metrics rows."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "round.yaml"
    config.write_text(yaml.safe_dump(golden_config(model, tmp / "out", method)))
    proc = launch.run("fedkrso.sim.main", ["--config", str(config), "--data-root", str(data), "--threads", "1"],
                      tmp, "sim", 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["clients"] == 2 and summary["round"] == ROUNDS - 1
    return [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


def record(method: str, fps: list[str]) -> None:
    """Add ``method``'s fingerprints to this CPU's recording (made if there is none)."""
    probe, all_recordings = float_probe(), recordings()
    mine = next((r for r in all_recordings if r["probe"] == probe), None)
    if mine is None:
        mine = {"probe": probe, "note": "", "runs": {}}
        all_recordings.append(mine)
    mine["runs"][method] = fps
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"recordings": all_recordings}, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_golden_job_in_processes_and_in_the_simulator(tmp_path, tiny_bert, golden_data, method):
    (tmp_path / "dist").mkdir()
    dist = run_golden(tmp_path / "dist", tiny_bert, golden_data, METHODS[method])
    fps = [r["state_fingerprint"] for r in dist]
    if RECORD:
        record(method, fps)
        return
    recorded = recorded_runs()
    if recorded is None:
        probes = ", ".join(r["probe"][:12] for r in recordings())
        warnings.warn(f"golden: no recording for this CPU's float kernels (probe {float_probe()[:12]}; recorded: "
                      f"{probes}), so the processes' fingerprints are not compared with one; "
                      "FEDKRSO_RECORD_GOLDEN=1 adds one", stacklevel=1)
    else:
        assert method in recorded, f"no golden record for {method} on this CPU; record with FEDKRSO_RECORD_GOLDEN=1"
        assert fps == recorded[method], f"{method}: state fingerprints moved from the golden run"
    rows = run_sim(tmp_path / "sim", tiny_bert, golden_data, METHODS[method])
    assert len(rows) == ROUNDS and [r["state_fingerprint"] for r in rows] == fps
    if method != "fedkrso":
        return
    for s, d in zip(rows, dist):
        assert s["clients"] == d["clients"]
        for key in ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes",
                    "downlink_message_bytes", "fedavg_equivalent_bytes"):
            assert s[key] == d[key], (s["round"], key)
        assert s["uplink_wire_bytes"] is None and s["downlink_wire_bytes"] is None and s["wire_efficiency"] is None
        assert d["uplink_wire_bytes"] > d["uplink_message_bytes"]
