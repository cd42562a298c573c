"""``python -m fedkrso.bench.sim_vs_processes --config round.yaml --data-root DIR``: one run
of a round.yaml twice, in the simulator (one process) and as a real server with one client
process per shard, side by side: wall time, the peak of the summed resident memory of every
process of the run (sampled every 0.2 s with psutil), and whether both reached the same state
fingerprints after every round (they must, with one torch thread per process).

Exit codes: 0 done (fingerprints equal), 1 fingerprints differ, 2 a bad flag or missing file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from .launch import Cluster, child_env
from .report import fmt_bytes


class TreeMemory:
    """Peak of the summed RSS of ``root`` and all its descendants, sampled in a thread."""

    def __init__(self, root: int, every: float = 0.2):
        self.root, self.every, self.peak = psutil.Process(root), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def fingerprints(out: Path) -> list[str]:
    return [json.loads(line)["state_fingerprint"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def write_config(base: dict, out: Path) -> Path:
    cfg = json.loads(json.dumps(base))
    cfg.setdefault("run", {})["output_dir"] = str(out)
    cfg.setdefault("server", {})["listen"] = "127.0.0.1:0"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "round.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def simulate(base: dict, data: Path, out: Path) -> dict:
    config = write_config(base, out)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "fedkrso.sim.main", "--config", str(config), "--data-root",
                             str(data), "--threads", "1"], stdout=(out / "sim.log").open("w"),
                            stderr=subprocess.STDOUT, env=child_env())
    memory = TreeMemory(proc.pid)
    code = proc.wait()
    peak = memory.stop()
    if code != 0:
        raise SystemExit(f"fedkrso-sim exited {code}; see {out / 'sim.log'}")
    return {"seconds": time.monotonic() - started, "peak_rss_bytes": peak, "fingerprints": fingerprints(out)}


def distributed(base: dict, data: Path, out: Path) -> dict:
    config = write_config(base, out)
    shards = sorted((p for p in data.glob("shard*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    started = time.monotonic()
    cluster = Cluster(out)
    memory = TreeMemory(psutil.Process().pid)  # the server and clients are this process's children
    try:
        cluster.start_server(config)
        for shard in shards:
            cluster.start_client(shard, shard.name)
        code = cluster.wait(24 * 3600)
        for c in cluster.clients:
            c.wait(120)
    finally:
        peak = memory.stop()
        cluster.stop()
    if code != 0:
        raise SystemExit(f"fedkrso-server exited {code}; see {out / 'server.log'}")
    own = psutil.Process().memory_info().rss  # this driver's own share of the sampled tree
    return {"seconds": time.monotonic() - started, "peak_rss_bytes": peak - own, "fingerprints": fingerprints(out)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedkrso.bench.sim_vs_processes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="round.yaml (its output_dir and listen are replaced)")
    p.add_argument("--data-root", required=True, help="folder of shard0..N-1 (one client each)")
    p.add_argument("--out", default="results/sim-vs-processes")
    args = p.parse_args(argv)
    if not Path(args.config).is_file() or not Path(args.data_root).is_dir():
        p.error("--config must be a file and --data-root a folder")
    base = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out).resolve()
    sim = simulate(base, Path(args.data_root).resolve(), out / "sim")
    dist = distributed(base, Path(args.data_root).resolve(), out / "processes")
    same = sim["fingerprints"] == dist["fingerprints"]
    result = {"sim": sim, "processes": dist, "same_fingerprints": same,
              "time_ratio": dist["seconds"] / sim["seconds"], "memory_ratio": dist["peak_rss_bytes"] / sim["peak_rss_bytes"]}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| runner | wall time | peak RSS (all processes) |\n|---|---|---|\n"
          f"| simulator (1 process) | {sim['seconds']:.0f} s | {fmt_bytes(sim['peak_rss_bytes'])} |\n"
          f"| server + {len(list(Path(args.data_root).glob('shard*')))} client processes | {dist['seconds']:.0f} s | "
          f"{fmt_bytes(dist['peak_rss_bytes'])} |\n"
          f"processes / simulator: time {result['time_ratio']:.2f}x, memory {result['memory_ratio']:.2f}x; "
          f"same state fingerprints after every round: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
