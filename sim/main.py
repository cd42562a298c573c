"""``fedkrso-sim --config round.yaml --data-root DIR``: every client of a run in one process.

One client per ``shardN`` folder under ``--data-root`` (as written by fedkrso-partition), the
same coordinator, client-side round and message accounting as a distributed run; metrics,
state and the final model go where ``run.output_dir`` says, as for ``fedkrso-server``.
Socket bytes are not measured (``*_wire_bytes`` is null).

Exit codes: 0 the run finished, 2 a bad config, flag or missing data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from ..common import logs
from ..common.config import ConfigError, load_config
from ..common.precision import PlacementError, add_placement_args, resolve_placement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedkrso-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="round.yaml")
    p.add_argument("--data-root", required=True, help="folder holding shard0..shardN-1 (fedkrso-partition --out)")
    p.add_argument("--output-dir", help="overrides run.output_dir")
    p.add_argument("--resume", action="store_true", help="resume saved state of this run instead of starting over")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a distributed client uses 1: the same count gives the same weights)")
    add_placement_args(p)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-json", action="store_true", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_json)
    import torch

    from ..server.metrics import format_table
    from ..server.state import StateError
    from .runner import Simulation

    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config)
        if args.output_dir:
            cfg.run.output_dir = Path(args.output_dir)
        placement = resolve_placement(cfg.model.device, cfg.model.dtype, args.device, args.dtype)
        started = time.monotonic()
        sim = Simulation(cfg, Path(args.data_root), fresh=not args.resume, placement=placement)
        rows = asyncio.run(sim.run())
    except (ConfigError, StateError, PlacementError, FileNotFoundError) as err:
        print(f"fedkrso-sim: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(format_table(rows), flush=True)
    summary = {k: rows[-1].get(k) for k in ("round", "eval_accuracy", "eval_loss")} if rows else {}
    print(json.dumps({"run_id": sim.coord.run_id, "output_dir": str(sim.coord.out), "clients": len(sim.participants),
                      "seconds": round(time.monotonic() - started, 1), **summary}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
