"""Server scale bench: one real server process, N lightweight clients in one asyncio process.

``python -m fedkrso.bench.scale --clients 50,100,200``

For each N a real ``fedkrso.server.main`` subprocess is started (tiny BERT from
``build_tiny``, FedKRSO, ``clients_per_round = min_clients = N``, no eval data). One pool
process (this one) joins N clients over N gRPC channels (N connections) on loopback, long-polls
``StartRound`` for each, and submits a valid synthetic FedKRSO update per selected client:
``acc.{k}.{module}`` (d_m, rank) for the seeds the client's interval RNG draws (the same
``seed_choices`` a real client uses) plus every ``dense.{param}``, with the right
``update_digest`` and ``num_samples``. No client loads a model or trains; the spec comes
from loading the tiny model once here with the run's method config.

Measured per N: updates aggregated per second (sum of clients over sum of round_seconds),
round latency (``round_seconds`` from metrics.jsonl), and the server's RSS (VmRSS after
start, peak VmHWM while it ran). Uplink aggregation is streamed (flat in N); the downlink
fan-out when a round opens is not (docs/SCALE.md). ``--max-inflight`` caps the uploads the
pool streams at once, to tell the two apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from .launch import Cluster

# Each pool client on its own TCP connection, as separate client processes are: channels of one
# process with the same target and options otherwise share one connection (gRPC's global
# subchannel pool), and past ``server.max_streams_per_connection`` concurrent long-polls the
# rest wait in the pool, so no round opens until polls time out (the regression of issue 26).
POOL_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def write_config(path: Path, model: Path, out: Path, n: int, rounds: int, method: dict) -> Path:
    cfg = {
        "run": {"name": f"scale{n}", "seed": 0, "output_dir": str(out)},
        "model": {"name": str(model), "task": "sequence-classification", "num_labels": 2, "max_length": 32},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": n, "min_clients": n, "deadline_s": 300,
                   "start_timeout_s": 300},
        # every client of the pool comes from one address: lift the per-address limits to N
        "server": {"listen": "127.0.0.1:0", "max_connections_per_peer": n + 16, "join_burst": n,
                   "max_connections": max(1024, 2 * n)},
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
            if not s:
                return
            self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
            self.hwm = max(self.hwm, s.get("VmHWM", 0))
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class UpdateFactory:
    """Valid synthetic FedKRSO updates for the run: spec from the tiny model, loaded once."""

    def __init__(self, config: Path):
        import torch

        from ..common.config import load_config
        from ..common.methods.fedkrso import FedKRSO
        from ..common.models import load_model
        from ..common.tensors import DTYPES

        self.cfg = load_config(config)
        # FedKRSO itself, not any method: the update carries the accumulators of the seeds a
        # client's interval RNG draws (``seed_choices``), which only FedKRSO has
        self.method = FedKRSO(self.cfg.method, self.cfg.run.seed)
        m = self.cfg.model
        self.model = load_model(m.name, m.task, m.num_labels, self.cfg.run.seed)
        self.method.prepare(self.model)
        self.dtype = DTYPES[self.cfg.method.wire_dtype]
        self.torch = torch
        self._cache: dict[int, tuple[dict, set]] = {}

    def spec(self, seeds: list[int]):
        key = hash(tuple(seeds))
        if key not in self._cache:
            spec = self.method.update_spec(self.model, seeds)
            self._cache[key] = (spec, self.method.required_names(self.model, seeds))
        return self._cache[key]

    def make(self, round_id: int, seeds: list[int], name: str, salt: int):
        from ..common.wire import update_digest

        spec, required = self.spec(seeds)
        used = sorted(set(self.method.seed_choices(round_id, name)))
        g = self.torch.Generator().manual_seed(salt)
        tensors = {}
        for tname, shape in spec.items():
            if tname in required or any(tname.startswith(f"acc.{k}.") for k in used):
                tensors[tname] = (self.torch.randn(shape, generator=g) * 1e-3).to(self.dtype)
        return tensors, [seeds[k] for k in used], update_digest(tensors)


async def client_task(i: int, target: str, factory: UpdateFactory, stats: dict, samples: int,
                      chunk_default: int, total_rounds: int):
    import grpc

    from fedkrso.v1 import coordinator_pb2 as pb
    from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

    from ..common.protocol import TOKEN_HEADER, bearer
    from ..common.wire import tensor_batches

    name = f"pool{i:04d}"
    async with grpc.aio.insecure_channel(target, options=POOL_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        call = stub.Join(pb.JoinRequest(name=name, num_samples=samples, software_version="bench"))
        resp = await call
        md = bearer(dict(await call.initial_metadata()).get(TOKEN_HEADER))
        run_id, chunk = resp.run_id, resp.max_chunk_bytes or chunk_default
        stats["joined"] += 1
        have = int(resp.current_round)
        last_submitted = -1
        while True:
            header = None
            try:
                async for msg in stub.StartRound(pb.StartRoundRequest(run_id=run_id, have_round=have,
                                                                      wait_seconds=30.0), metadata=md):
                    if msg.WhichOneof("body") == "header":
                        header = msg.header
            except grpc.aio.AioRpcError as err:
                # after the last round the server stops once every client was *sent* FINISHED
                # (2 s grace): a final poll still streaming may be cut off. Not an error here.
                if last_submitted == total_rounds - 1 and err.code() in (
                        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    stats["final_poll_cut"] += 1
                    return
                raise
            if header.status == pb.ROUND_STATUS_WAIT:
                continue
            have = int(header.target_round)  # deltas are not applied: no model here
            if header.status == pb.ROUND_STATUS_FINISHED:
                try:  # the server may already be stopping once every client has seen FINISHED
                    await stub.Leave(pb.LeaveRequest(run_id=run_id, reason="finished"), metadata=md)
                except grpc.aio.AioRpcError as err:
                    stats["leave_refused"][err.code().name] = stats["leave_refused"].get(err.code().name, 0) + 1
                return
            rnd, seeds = int(header.round), list(header.seeds)
            stats["first_train"].setdefault(rnd, time.monotonic())
            tensors, seeds_used, digest = factory.make(rnd, seeds, name, salt=rnd * 100003 + i)
            uh = pb.UpdateHeader(run_id=run_id, round=rnd, num_samples=samples, loss=1.0, steps=4,
                                 seeds_used=seeds_used, num_tensors=len(tensors), update_digest=digest)

            def requests():
                yield pb.SubmitUpdateRequest(header=uh)
                for batch in tensor_batches(tensors, None, chunk):
                    yield pb.SubmitUpdateRequest(tensors=batch)

            async with stats["gate"]:
                r = await stub.SubmitUpdate(requests(), metadata=md)
            if not r.accepted:
                raise RuntimeError(f"{name}: update for round {rnd} not accepted")
            stats["submitted"] += 1
            last_submitted = rnd
            stats["payload"] = r.payload_bytes


async def run_pool(target: str, n: int, factory: UpdateFactory, rounds: int, max_inflight: int = 0) -> dict:
    gate = asyncio.Semaphore(max_inflight) if max_inflight > 0 else contextlib.nullcontext()
    stats = {"gate": gate, "joined": 0, "submitted": 0, "first_train": {}, "payload": 0, "leave_refused": {}, "final_poll_cut": 0}
    t0 = time.monotonic()
    await asyncio.gather(*(client_task(i, target, factory, stats, samples=10 + i % 7, chunk_default=1 << 20,
                                       total_rounds=rounds)
                           for i in range(n)))
    stats["pool_seconds"] = time.monotonic() - t0
    return stats


def run_one(n: int, rounds: int, workdir: Path, model: Path, method: dict, timeout: float,
            max_inflight: int = 0) -> dict:
    wd = workdir / f"n{n}"
    wd.mkdir(parents=True, exist_ok=True)
    out = wd / "out"
    config = write_config(wd / "round.yaml", model, out, n, rounds, method)
    factory = UpdateFactory(config)
    cluster = Cluster(wd)
    try:
        port = cluster.start_server(config, ["--log-level", "warning"])
        pid = cluster.server.popen.pid
        base = _proc_status(pid).get("VmRSS", 0)
        sampler = RssSampler(pid)
        sampler.start()
        stats = asyncio.run(asyncio.wait_for(run_pool(f"127.0.0.1:{port}", n, factory, rounds, max_inflight), timeout))
        rc = cluster.wait(120)
        sampler.stop()
        if rc != 0:
            raise RuntimeError(f"server exited {rc}:\n{cluster.server.text()[-3000:]}")
    finally:
        cluster.stop()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["round_seconds"] for r in rows]
    updates = sum(len(r["clients"]) for r in rows)
    return {
        "clients": n,
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
        "pool_seconds": stats["pool_seconds"],
        "leave_refused": stats["leave_refused"],
        "final_poll_cut": stats["final_poll_cut"],
    }


def format_table(results: list[dict]) -> str:
    head = ("| clients | rounds | updates | updates/s | round s (median) | round s (max) | "
            "uplink B/client | server RSS start MiB | server peak RSS MiB |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        lines.append(f"| {r['clients']} | {r['rounds']} | {r['updates']} | {r['updates_per_s']:.1f} | "
                     f"{r['round_s_median']:.2f} | {r['round_s_max']:.2f} | {r['uplink_payload_per_client']:.0f} | "
                     f"{r['server_rss_start_mib']:.0f} | {r['server_peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-bench-scale", description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="50,100,200", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32, help="tiny BERT hidden size")
    p.add_argument("--workdir", help="default: a temporary folder")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--max-inflight", type=int, default=0,
                   help="cap on uploads the pool streams at once (0: every client at once)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per N")
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
        r = run_one(n, args.rounds, workdir, model, method, args.timeout, args.max_inflight)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(format_table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not all(r["all_clients_each_round"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
