"""``fedkrso-server --config round.yaml``: run one federated job and exit when it is done.

The run's metrics go to <run.output_dir>/metrics.jsonl (and to run.report_to's trackers), its
state to <run.output_dir>/state (a restart with the same config resumes it), the final model
to <run.output_dir>/final; fedkrso-export rebuilds the model after any round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..common import logs
from ..common.cli import add_log_args, add_placement_args, fail, parser, require_file

if TYPE_CHECKING:
    from ..common.config import RunConfig

log = structlog.get_logger("fedkrso.server")
PROG = "fedkrso-server"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(PROG, __doc__, {0: "the run finished", 2: "bad flags; a missing or invalid config, input "
                               "file or credential; saved state of another run or that does not replay",
                               130: "interrupted"})
    p.add_argument("--config", required=True, help="round.yaml")
    p.add_argument("--listen", help="host:port to bind (overrides server.listen; port 0 = any)")
    p.add_argument("--output-dir", help="overrides run.output_dir")
    p.add_argument("--insecure", action="store_true",
                   help="serve plaintext gRPC even on a non-loopback address (overrides security.insecure)")
    p.add_argument("--port-file", help="write the bound port here once serving (for scripts)")
    p.add_argument("--fresh", action="store_true",
                   help="move saved state of an earlier run aside (<output_dir>/previous-*) instead of resuming")
    p.add_argument("--threads", type=int, default=1, help="torch threads for aggregation/eval")
    add_placement_args(p)
    add_log_args(p)
    return p.parse_args(argv)


def checked_config(args: argparse.Namespace) -> RunConfig:
    """``args``' round.yaml, read, validated and checked against the listen address, with the
    command line's overrides; ``ConfigError`` otherwise. Before transformers, datasets, the
    coordinator and the model load (torch comes in with the methods' settings): a mistake in the
    file answers in about 2 s, not 4.5."""
    from ..common.config import check_inputs, load_config
    from .auth import check_security

    cfg = load_config(args.config)
    check_inputs(cfg)
    if args.output_dir:
        cfg.run.output_dir = Path(args.output_dir)
    if args.insecure:
        cfg.security.insecure = True
    check_security(cfg.security, args.listen or cfg.server.listen)
    return cfg


async def serve(args: argparse.Namespace, cfg: RunConfig, count_bytes: bool = True) -> int:
    """Run the job of ``args`` and its ``checked_config`` ``cfg``; ``count_bytes=False`` serves
    gRPC on the public address with no byte-counting relay in front (the scale bench's
    ``--no-relay`` experiment only: no socket bytes, no per-address connection limits)."""
    from ..common.precision import resolve_placement
    from .coordinator import Coordinator
    from .metrics import format_table
    from .service import run_server

    # this process's device and dtype; cfg keeps round.yaml's, which clients receive as defaults
    placement = resolve_placement(cfg.model.device, cfg.model.dtype, args.device, args.dtype)
    coord = await asyncio.to_thread(Coordinator, cfg, args.fresh, placement=placement)
    # the model, torch and every module loaded so far live as long as the server: keep them out
    # of the cyclic collector's passes (a full pass walked ~280,000 such objects, 0.24 s each).
    # And collect less often: each client's calls allocate objects that outlive a young
    # collection, so with thousands of clients full passes came every few seconds, each
    # walking every client's state for little garbage (5,000 clients, 4 rounds: 59 full
    # passes, 12 s; with these thresholds one, 0.1 s, and no more memory; docs/SCALE.md)
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    async with run_server(coord, args.listen, count_bytes=count_bytes) as port:
        log.info("server_listening", port=port, run_id=coord.run_id)
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)
        await coord.run()
        await coord.wait_for_clients_to_finish(timeout=cfg.server.finish_wait_s)
    rows = coord.metrics.rows()
    print(format_table(rows), flush=True)
    summary = {k: rows[-1].get(k) for k in ("round", "eval_accuracy", "eval_loss")} if rows else {}
    print(json.dumps({"run_id": coord.run_id, "output_dir": str(coord.out), **summary}), flush=True)
    return 0


def main(argv: list[str] | None = None, count_bytes: bool = True) -> None:
    args = parse_args(argv)
    require_file(PROG, args.config, "config")
    logs.configure(args.log_level, args.log_json)
    from ..common.config import ConfigError

    try:
        cfg = checked_config(args)
    except ConfigError as err:
        fail(PROG, err)
    import torch

    from ..common.precision import PlacementError
    from .state import StateError

    torch.set_num_threads(args.threads)
    try:
        sys.exit(asyncio.run(serve(args, cfg, count_bytes)))
    except (ConfigError, StateError, PlacementError) as err:
        fail(PROG, err)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
