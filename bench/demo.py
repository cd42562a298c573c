"""``make demo``: a local federated run on a real pretrained model and real data.

Partitions the packaged BBC News corpus into 3 Dirichlet shards (alpha 0.5), starts one
server and 3 client processes on loopback, runs FedKRSO on the packaged MiniLM for the
rounds in ``bench/demo.yaml``, and prints the per-round table (bytes, accuracy, time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from ..common.data import load_source, make_partition, save_partition
from .launch import Cluster

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="run folder (data, logs, metrics, model)")
    p.add_argument("--config", default=str(HERE / "demo.yaml"))
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, help="override rounds.total")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    started = time.monotonic()
    print(f"partitioning BBC News into {args.clients} shards (Dirichlet alpha={args.alpha}) ...", flush=True)
    save_partition(make_partition(load_source("bbc"), args.clients, source="bbc", alpha=args.alpha,
                                  seed=0, min_size=50), data)
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["run"]["output_dir"] = str(out)
    cfg["eval"]["data"] = str(data / "eval")
    cfg["rounds"]["clients_per_round"] = args.clients
    if args.rounds:
        cfg["rounds"]["total"] = args.rounds
    config = out / "round.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    cluster = Cluster(out)
    try:
        port = cluster.start_server(config, args=["--fresh"])  # a new demo, not a resume
        print(f"server on 127.0.0.1:{port}; starting {args.clients} clients (logs in {out}) ...", flush=True)
        for i in range(args.clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}")
        code = cluster.wait(timeout=3600)
    finally:
        cluster.stop()
    text = cluster.server.text()
    table = text[text.find("round  "):] if "round  " in text else text[-3000:]
    print(table)
    print(f"demo finished in {time.monotonic() - started:.0f} s; final model in {out / 'final'}")
    sys.exit(code)


if __name__ == "__main__":
    main()
