"""``fedkrso-sim --backend ray``: the clients' rounds on a pool of Ray actors against the
in-process simulator.

For the same config, data and torch threads the Ray backend must write the simulator's
metrics (state fingerprint after every round, payload and message bytes, evaluation) on a
two-node Ray cluster on loopback (Ray's own ``cluster_utils.Cluster``, each node with its own
CPU, one actor on each), and again, on the same cluster, after one of its two actors is killed
mid-round (the lost client's round is run again on the other actor). Without Ray, or without
a cluster at ``--address``, the command exits 2 naming the fix.

Kept few and small (tiny BERT, the golden job's 3 rounds of 2 clients, one cluster for both
runs): Ray's start costs tens of seconds on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedkrso.bench.launch import child_env
from test_golden import METHODS, ROUNDS, golden_config, golden_data  # noqa: F401

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray backend tests need ray (requirements.lock)")

# what differs between two runs of the same job by design: time, memory, the run's clock
VARYING = {"round_seconds", "train_seconds", "eval_seconds", "aggregate_seconds", "client_peak_rss_bytes",
           "server_peak_rss_bytes", "peak_rss_bytes", "timestamp", "time", "wall_seconds", "started_unix",
           "finished_unix", "client_train_seconds", "accelerator_peak_bytes", "client_accelerator_peak_bytes"}


def sim(tmp: Path, model: Path, data: Path, *extra: str, method: str = "fedkrso") -> tuple[list[dict], dict]:
    """``fedkrso-sim`` on the golden job: (metrics rows, the summary line)."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "round.yaml"
    config.write_text(yaml.safe_dump(golden_config(model, tmp / "out", METHODS[method])))
    proc = subprocess.run([sys.executable, "-m", "fedkrso.sim.main", "--config", str(config), "--data-root",
                           str(data), "--threads", "1", *extra], capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()], summary


def steady(rows: list[dict]) -> list[dict]:
    """The figures of each row that do not depend on timing."""
    return [{k: v for k, v in r.items() if k not in VARYING and not k.endswith(("_seconds", "_rss_bytes", "_unix"))}
            for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert, golden_data) -> list[dict]:
    """The in-process simulator's rows of the golden FedKRSO job (the state fingerprints it
    shares with a distributed run: tests/test_golden.py)."""
    rows, _ = sim(tmp_path_factory.mktemp("inprocess"), tiny_bert, golden_data)
    assert len(rows) == ROUNDS
    return rows


def test_two_node_cluster_reaches_the_simulators_metrics_also_when_an_actor_is_killed(
        tmp_path, tiny_bert, golden_data, reference):
    """``fedkrso-sim --backend ray --address`` on a two-node cluster writes the simulator's
    rows; then a driver on the same cluster kills an actor (``ray.kill``) while it holds a
    client's round: the round is run on the other actor and the run still ends with the
    simulator's state fingerprints."""
    from ray.cluster_utils import Cluster

    from fedkrso.common.config import parse_config
    from fedkrso.sim.ray_backend import PoolSpec, RaySimulation, connect

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    killed: list[int] = []
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rows, summary = sim(tmp_path / "cli", tiny_bert, golden_data, "--backend", "ray", "--address",
                            cluster.address, "--actors", "2", "--cpus-per-actor", "1")
        assert steady(rows) == steady(reference)
        actors = summary["actors"]
        assert [a["alive"] for a in actors] == [True, True]
        assert len({a["node"] for a in actors}) == 2, "one actor on each node (each node has one CPU)"
        assert all(a["threads"] == 1 for a in actors), "torch threads = the CPUs granted"
        assert sum(a["clients_trained"] for a in actors) == 2 * ROUNDS
        # the base model is loaded once per actor: its clients (2 shards) are kept, the state moves by deltas
        assert all(a["clients_held"] <= 2 and a["deltas_applied"] >= 1 and a["snapshots"] == 0 for a in actors)
        print(f"two-node Ray run: {time.monotonic() - started:.1f} s")

        cfg = parse_config(golden_config(tiny_bert, tmp_path / "killed" / "out", METHODS["fedkrso"]))
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            connect(cluster.address)  # the driver joined above
            run = RaySimulation(cfg, golden_data, PoolSpec(actors=2, cpus=1.0))

            async def go() -> list[dict]:
                task = asyncio.create_task(run.run())
                while not task.done():  # the first dispatch of round 1: actor 0 holds a client's round
                    if not killed and run.port.completed == 1 and run.members and run.members[0].queued:
                        ray.kill(run.members[0].handle)  # round 1 is open: round 0 completed
                        killed.append(1)
                    # a client's round takes a tenth of a second or more; polling faster (a spin)
                    # took one of the two cores the actors train on
                    await asyncio.sleep(0.002)
                return await task

            rows = asyncio.run(go())
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
    assert killed == [1]
    assert [r["state_fingerprint"] for r in rows] == [r["state_fingerprint"] for r in reference]
    assert steady(rows) == steady(reference)
    dead, live = run.actor_stats
    assert dead == {"actor": 0, "alive": False}
    assert live["alive"] and live["clients_trained"] == 2 * ROUNDS - 1  # its own three, then actor 0's rerun and round 2
    print(f"two-node Ray runs, one with a killed actor: {time.monotonic() - started:.1f} s")


def test_no_ray_or_no_cluster_exits_2_naming_the_fix(tmp_path, tiny_bert, golden_data):
    config = tmp_path / "round.yaml"
    config.write_text(yaml.safe_dump(golden_config(tiny_bert, tmp_path / "out", METHODS["fedkrso"])))
    args = ["--config", str(config), "--data-root", str(golden_data), "--backend", "ray"]
    hide = "import sys; sys.modules['ray'] = None; from fedkrso.sim.main import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == 2 and "pip install ray==" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "fedkrso.sim.main", *args, "--address", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2 and "no Ray cluster at '127.0.0.1:9'" in proc.stderr, proc.stderr[-2000:]
    assert "ray start --head" in proc.stderr
    from fedkrso.sim.ray_connect import RAY_PIN

    assert RAY_PIN in (Path(__file__).parents[1] / "requirements.lock").read_text().splitlines()
