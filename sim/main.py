"""``fedkrso-sim --config round.yaml --data-root DIR``: every client of a run in one process.

One client per ``shardN`` folder under ``--data-root`` (as written by fedkrso-partition), the
same coordinator, client-side round and message accounting as a distributed run; metrics,
state and the final model go where ``run.output_dir`` says, as for ``fedkrso-server``.
Socket bytes are not measured (``*_wire_bytes`` is null).

``--backend ray`` trains the clients on a pool of Ray actors instead, each holding one copy of
the base model (``ray_backend.py``); the coordinator stays in this process. Without
``--address`` a local Ray is started; ``--address auto`` joins the cluster ``ray start`` made
on this machine, ``--address HOST:PORT`` a remote head (docs/guides/simulate.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from ..common import logs
from ..common.cli import add_log_args, add_placement_args, fail, parser, require_dir, require_file

PROG = "fedkrso-sim"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(PROG, __doc__, {0: "the run finished", 1: "the run could not go on: every update of a round "
                               "was refused (the message gives the server's reason)",
                               2: "bad flags; a missing or invalid config or data; "
                               "saved state that cannot be resumed", 130: "interrupted"})
    p.add_argument("--config", required=True, help="round.yaml")
    p.add_argument("--data-root", required=True, help="folder holding shard0..shardN-1 (fedkrso-partition --out)")
    p.add_argument("--output-dir", help="overrides run.output_dir")
    p.add_argument("--resume", action="store_true", help="resume saved state of this run instead of starting over")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a distributed client uses 1: the same count gives the same weights)")
    ray = p.add_argument_group("Ray backend")
    ray.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess",
                     help="where the clients train: in this process, or on a pool of Ray actors")
    ray.add_argument("--address", help="with --backend ray: the cluster to join (auto, or the head's HOST:PORT); "
                     "default: start a local Ray")
    ray.add_argument("--actors", type=int, default=2, help="with --backend ray: actors in the pool, each one model copy")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0,
                     help="with --backend ray: CPUs each actor is granted; it computes with that many torch threads")
    ray.add_argument("--gpus-per-actor", type=float, default=0.0,
                     help="with --backend ray: share of a GPU per actor (0.25: four actors per GPU); on a GPU it is "
                     "also the process's memory fraction")
    add_placement_args(p)
    add_log_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_file(PROG, args.config, "config")
    require_dir(PROG, args.data_root, "data root")
    logs.configure(args.log_level, args.log_json)
    if args.backend != "ray" and (args.address or args.gpus_per_actor):
        fail(PROG, "--address and --gpus-per-actor need --backend ray")
    if args.backend == "ray":  # before anything heavy: no Ray, or nobody at --address, answers at once
        from .ray_connect import RayUnavailable, connect

        try:
            connect(args.address, cpus=max(1, math.ceil(args.actors * args.cpus_per_actor)))
        except RayUnavailable as err:
            fail(PROG, err)
    import torch

    from ..common.config import ConfigError, check_inputs, load_config
    from ..common.precision import PlacementError, resolve_placement
    from ..server.port import StateError, format_table
    from .ray_connect import RayUnavailable
    from .runner import Simulation, SimulationError

    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config)
        check_inputs(cfg)
        if args.output_dir:
            cfg.run.output_dir = Path(args.output_dir)
        placement = resolve_placement(cfg.model.device, cfg.model.dtype, args.device, args.dtype)
        started = time.monotonic()
        if args.backend == "ray":
            from .ray_backend import PoolSpec, RaySimulation

            sim = RaySimulation(cfg, Path(args.data_root), PoolSpec(args.actors, args.cpus_per_actor,
                                args.gpus_per_actor, args.device, args.dtype), fresh=not args.resume,
                                placement=placement)
        else:
            sim = Simulation(cfg, Path(args.data_root), fresh=not args.resume, placement=placement)
        rows = asyncio.run(sim.run())
    except RayUnavailable as err:
        fail(PROG, err)
    except (ConfigError, StateError, PlacementError, FileNotFoundError) as err:
        fail(PROG, err)
    except SimulationError as err:
        fail(PROG, err, code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    print(format_table(rows), flush=True)
    keys = ("round", "eval_accuracy", "eval_loss", "eval_perplexity", "client_eval_accuracy", "client_eval_loss",
            "client_eval_perplexity")
    summary = {k: rows[-1][k] for k in keys if k in rows[-1]} if rows else {}
    extra = {"backend": "ray", "actors": sim.actor_stats} if args.backend == "ray" else {}
    print(json.dumps({"run_id": sim.port.run_id, "output_dir": str(sim.port.output_dir),
                      "clients": len(sim.clients if args.backend == "ray" else sim.participants),
                      "seconds": round(time.monotonic() - started, 1), **summary, **extra}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
