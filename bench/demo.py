"""``make demo``: a local federated run on a real pretrained model and real data.

Partitions the packaged BBC News corpus into 3 Dirichlet shards (alpha 0.5), starts one
server and 3 client processes on loopback, runs FedKRSO on the packaged MiniLM for the
rounds in ``bench/demo.yaml``, and prints each round's row (bytes, accuracy, time) as that
round closes. The run folder keeps the logs, metrics.jsonl, metrics.csv, metrics.png (the
metrics and bytes by round) and the final model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..common.cli import fail, parser, require_file

HERE = Path(__file__).resolve().parent
PROG = "fedkrso-demo"


def new_rows(path: Path, offset: int) -> tuple[list[dict], int]:
    """The rows appended to ``path`` (metrics.jsonl) since byte ``offset``, whole lines only
    (a line still being written is read next time), and the offset after them."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def follow(cluster, metrics: Path, timeout: float) -> int:
    """Print each round's row as the server writes it, until the server exits; its exit code."""
    from ..server.metrics import RowPrinter

    printer, offset = RowPrinter(), 0
    give_up = time.monotonic() + timeout
    while True:
        code = cluster.server.popen.poll()
        rows, offset = new_rows(metrics, offset)
        for row in rows:
            print("\n".join(printer.lines(row)), flush=True)
        if code is not None:
            return code
        if time.monotonic() > give_up:
            raise TimeoutError(f"the demo did not finish in {timeout:.0f} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    p = parser(PROG, __doc__, {0: "the demo run finished", 1: "the server or a client failed (log tail shown)",
                               130: "interrupted"})
    p.add_argument("--out", default="runs/demo", help="run folder (data, logs, metrics, model)")
    p.add_argument("--config", default=str(HERE / "demo.yaml"))
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, help="override rounds.total")
    args = p.parse_args(argv)
    require_file(PROG, args.config, "config")

    import yaml

    from ..common.data import load_source, make_partition, save_partition
    from .launch import Cluster

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
        print(f"server on 127.0.0.1:{port}; starting {args.clients} clients (logs in {out}); "
              f"each round's row prints as the round closes ...", flush=True)
        for i in range(args.clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}")
        code = follow(cluster, out / "metrics.jsonl", timeout=3600)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        cluster.stop()
    if code != 0:
        print(cluster.server.text()[-3000:], file=sys.stderr)
        fail(PROG, f"the server exited {code}; its log is {cluster.server.log}", 1)
    print(f"demo finished in {time.monotonic() - started:.0f} s; metrics in {out / 'metrics.jsonl'} "
          f"(and metrics.csv, metrics.png); final model in {out / 'final'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
