"""Server scale bench: one real server process, N lightweight clients in one or more pool processes.

``python -m fedkrso.bench.scale --clients 50,100,200``

For each N a real ``fedkrso.server.main`` subprocess is started (tiny BERT from
``build_tiny``, FedKRSO, ``clients_per_round = min_clients = N``, no eval data, its relay in
front). ``--pool-procs`` pool processes (``bench/scale_pool.py``) share the N clients, one gRPC
channel and TCP connection per client, and submit valid synthetic FedKRSO updates.

Measured per N: updates aggregated per second (sum of clients over sum of round_seconds),
round latency (``round_seconds`` from metrics.jsonl), the server's RSS (VmRSS after start, peak
VmHWM while it ran) and peak open file descriptors, and CPU seconds per update of the server
and of the pool between the first round's first assignment and the last acknowledgement: the
pool and the server share the cores, so the rates are lower bounds and the server's CPU per
update says what it would do alone. A line per round is printed as the server writes it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from .launch import Cluster
from .scale_pool import PoolStats, pool_process


def write_config(path: Path, model: Path, out: Path, n: int, rounds: int, method: dict) -> Path:
    cfg = {
        "run": {"name": f"scale{n}", "seed": 0, "output_dir": str(out)},
        "model": {"name": str(model), "task": "sequence-classification", "num_labels": 2, "max_length": 32},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": n, "min_clients": n, "deadline_s": 300,
                   "start_timeout_s": 300},
        # every client of the pool comes from one address and connects at once: lift the
        # per-address limits, the handshakes pending at once and the client table to N
        "server": {"listen": "127.0.0.1:0", "max_connections_per_peer": n + 16, "join_burst": n,
                   "max_connections": max(1024, n + 256), "max_pending_connections": max(128, n + 16),
                   "max_clients": max(4096, n + 16)},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class RssSampler(threading.Thread):
    """A process's peak memory, sampled every ``every`` seconds until it ends or ``stop``."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = 0
        self.hwm = 0
        self.peak_anon = 0  # anonymous memory only: no file-backed pages (a mapped checkpoint)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            s = _proc_status(self.pid)
            if not s or not self.sample(s):
                return
            self._halt.wait(self.every)

    def sample(self, status: dict[str, int]) -> bool:
        """Take one sample (``status``: ``_proc_status``); False stops sampling."""
        self.peak_rss = max(self.peak_rss, status.get("VmRSS", 0))
        self.hwm = max(self.hwm, status.get("VmHWM", 0))
        self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
        return True

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:  # ended: its last sample stands
        return None


class Sampler(RssSampler):
    """The server's memory and descriptors, and the CPU seconds of the server and the pool
    processes (descriptors once a second: listing thousands costs)."""

    def __init__(self, server: int, pool: list[int], every: float = 0.05):
        super().__init__(server, every)
        self.procs = [psutil.Process(p) for p in (server, *pool)]
        self.peak_fds = 0
        self.cpu: list[tuple[float, float, float]] = []  # (monotonic, server CPU s, pool CPU s)
        self._last: dict[int, float] = {}
        self._fds_at = 0.0

    def _cpu(self, proc: psutil.Process) -> float:
        s = _cpu_seconds(proc)
        if s is not None:
            self._last[proc.pid] = s
        return self._last.get(proc.pid, 0.0)

    def sample(self, status: dict[str, int]) -> bool:
        super().sample(status)
        now = time.monotonic()
        server, *pool = (self._cpu(p) for p in self.procs)
        self.cpu.append((now, server, sum(pool)))
        if now - self._fds_at >= 1.0:
            self._fds_at = now
            try:
                self.peak_fds = max(self.peak_fds, self.procs[0].num_fds())
            except psutil.Error:
                return False
        return True

    def cpu_between(self, t0: float, t1: float) -> tuple[float, float]:
        """(server, pool) CPU seconds from ``t0`` to ``t1``, from the nearest samples."""
        def at(t: float) -> tuple[float, float]:
            best = min(self.cpu, key=lambda row: abs(row[0] - t))
            return best[1], best[2]

        (s0, p0), (s1, p1) = at(t0), at(t1)
        return s1 - s0, p1 - p0


class RoundPrinter(threading.Thread):
    """Prints a line per round as the server appends it to metrics.jsonl."""

    def __init__(self, metrics: Path, n: int):
        super().__init__(daemon=True)
        self.metrics, self.n = metrics, n
        self._seen = 0
        self._halt = threading.Event()

    def _print_new(self) -> None:
        if not self.metrics.exists():
            return
        lines = self.metrics.read_text().splitlines()
        for line in lines[self._seen:]:
            try:
                row = json.loads(line)
            except ValueError:  # being written: read again next time
                return
            print(f"scale clients={self.n} round={row['round']} aggregated={len(row['clients'])} "
                  f"round_s={row['round_seconds']:.2f}", flush=True)
            self._seen += 1

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self._print_new()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self._print_new()


def _run_pools(target: str, n: int, config: Path, rounds: int, procs: int, max_inflight: int, timeout: float,
               on_start) -> list[PoolStats]:
    """``procs`` pool processes (spawned: never fork a process holding gRPC or torch threads),
    each with every ``procs``-th client; ``on_start(pids)`` once they run."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    inflight = -(-max_inflight // procs) if max_inflight > 0 else 0
    pool = [ctx.Process(target=pool_process, daemon=True,
                        args=(target, range(p, n, procs), config, rounds, inflight, timeout, results))
            for p in range(procs)]
    for p in pool:
        p.start()
    try:
        on_start([p.pid for p in pool])
        got = []
        for _ in pool:
            try:
                result = results.get(timeout=timeout + 60)
            except queue.Empty:
                raise TimeoutError(f"a pool process gave no result within {timeout + 60:.0f} s") from None
            if isinstance(result, str):  # the others cannot finish the rounds without its clients
                raise RuntimeError(f"pool process failed: {result}")
            got.append(result)
        return got
    finally:
        for p in pool:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _connections_held(server_log: str) -> int | None:
    """The connections a server lowered ``max_connections`` to (its descriptor limit), if it did."""
    for line in server_log.splitlines():
        if '"max_connections_lowered"' in line:
            return int(json.loads(line)["to"])
    return None


def run_one(n: int, rounds: int, workdir: Path, model: Path, method: dict, timeout: float,
            max_inflight: int = 0, pool_procs: int = 1, server_log: str = "warning", relay: bool = True) -> dict:
    wd = workdir / f"n{n}"
    wd.mkdir(parents=True, exist_ok=True)
    out = wd / "out"
    config = write_config(wd / "round.yaml", model, out, n, rounds, method)
    load = os.getloadavg()
    cluster = Cluster(wd)
    sampler = printer = None
    try:
        port = cluster.start_server(config, ["--log-level", server_log, "--fresh"],  # a reused workdir starts over
                                    module="fedkrso.server.main" if relay else "fedkrso.bench.scale_server")
        pid = cluster.server.popen.pid
        held = _connections_held(cluster.server.text())
        if held is not None and held < n:
            raise RuntimeError(f"the server can hold {held} connections, {n} clients need {n} (its "
                               "file-descriptor limit: 3 descriptors a relayed connection; --no-relay: 1)")
        base = _proc_status(pid).get("VmRSS", 0)
        printer = RoundPrinter(out / "metrics.jsonl", n)
        printer.start()

        def on_start(pids: list[int]) -> None:
            nonlocal sampler
            sampler = Sampler(pid, pids)
            sampler.start()

        stats = _run_pools(f"127.0.0.1:{port}", n, config, rounds, pool_procs, max_inflight, timeout, on_start)
        rc = cluster.wait(120)
        if rc != 0:
            raise RuntimeError(f"server exited {rc}:\n{cluster.server.text()[-3000:]}")
    finally:
        for thread in (sampler, printer):
            if thread is not None:
                thread.stop()
        cluster.stop()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["round_seconds"] for r in rows]
    updates = sum(len(r["clients"]) for r in rows)
    t0 = min(s.first_train[min(s.first_train)] for s in stats)
    t1 = max(s.last_ack for s in stats)
    server_cpu, pool_cpu = sampler.cpu_between(t0, t1)
    return {
        "clients": n,
        "relay": relay,
        "pool_procs": pool_procs,
        "max_inflight": max_inflight,
        "rounds": len(rows),
        "updates": updates,
        "all_clients_each_round": all(len(r["clients"]) == n for r in rows),
        "updates_per_s": updates / sum(secs),
        "round_s_median": statistics.median(secs),
        "round_s_max": max(secs),
        "uplink_payload_per_client": rows[-1]["uplink_payload_bytes_per_client"],
        "server_rss_start_mib": base / 2**20,
        "server_peak_rss_mib": max(sampler.hwm, sampler.peak_rss) / 2**20,
        "server_peak_fds": sampler.peak_fds,
        # from the first round's first assignment to the last acknowledgement: every round's work
        "window_s": t1 - t0,
        "server_cpu_ms_per_update": 1000 * server_cpu / updates,
        "pool_cpu_ms_per_update": 1000 * pool_cpu / updates,
        "pool_seconds": max(s.ended for s in stats) - min(s.started for s in stats),
        "leave_refused": {k: sum(s.leave_refused.get(k, 0) for s in stats)
                          for k in {k for s in stats for k in s.leave_refused}},
        "final_poll_cut": sum(s.final_poll_cut for s in stats),
        "load_avg_before": [round(x, 2) for x in load],
    }


def format_table(results: list[dict]) -> str:
    head = ("| clients | relay | pool procs | rounds | updates | updates/s | round s (median) | round s (max) | "
            "uplink B/client | server RSS start MiB | server peak RSS MiB | server peak fds | "
            "server CPU ms/update | pool CPU ms/update | load before |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        relay = "yes" if r["relay"] else "no"
        lines.append(f"| {r['clients']} | {relay} | {r['pool_procs']} | {r['rounds']} | {r['updates']} | "
                     f"{r['updates_per_s']:.1f} | {r['round_s_median']:.2f} | {r['round_s_max']:.2f} | "
                     f"{r['uplink_payload_per_client']:.0f} | {r['server_rss_start_mib']:.0f} | "
                     f"{r['server_peak_rss_mib']:.0f} | {r['server_peak_fds']} | "
                     f"{r['server_cpu_ms_per_update']:.2f} | {r['pool_cpu_ms_per_update']:.2f} | "
                     f"{r['load_avg_before'][0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-bench-scale", description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="50,100,200", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32, help="tiny BERT hidden size")
    p.add_argument("--pool-procs", type=int, default=1, help="pool processes sharing the clients")
    p.add_argument("--workdir", help="default: a temporary folder")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--max-inflight", type=int, default=0,
                   help="cap on uploads the pool streams at once (0: every client at once)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per N")
    p.add_argument("--server-log-level", default="warning", help="the server's --log-level (info: an event per update)")
    p.add_argument("--no-relay", action="store_true",
                   help="experiment: the server without its byte-counting relay (bench/scale_server.py)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from ..common.models import build_tiny

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedkrso-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny("bert", workdir / "model", 2, hidden=args.hidden)
    method = {"name": "fedkrso", "k": args.k, "rank": args.rank, "intervals": 2, "interval_steps": 2}
    results = []
    for n in (int(x) for x in args.clients.split(",") if x.strip()):
        r = run_one(n, args.rounds, workdir, model, method, args.timeout, args.max_inflight, args.pool_procs,
                    args.server_log_level, relay=not args.no_relay)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(format_table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not all(r["all_clients_each_round"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
