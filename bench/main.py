"""``fedkrso-bench --config bench/sst2.yaml [--quick]``: compare federated methods end to end.

For every method of the config the bench writes a round.yaml per run and runs it through the
in-process simulator (``fedkrso-sim``: the coordinator, client round and byte accounting of a
distributed run, every client in one process; ``--runner processes`` starts a real server and
one client process per shard instead). Each seed of ``seeds`` is a repetition with its own run
seed and partition seed.

Learning-rate sweep: when a method lists several ``lrs``, each runs ``sweep_rounds`` rounds on
the first ``sweep_seeds`` seeds, scored on a validation split carved from the training rows
(never on the reported split); the best then runs ``rounds`` rounds on every seed, scored on
the eval split. The report gives the task's own metric per method (mean and std over seeds of
the final, best and last-3 values), paired differences to FedAvg and FedIT with 95%
intervals, and the answers to the questions the bench exists for.

Finished runs are kept (``<out>/cells/*/cell.json``) and not run again: a stopped bench resumes.
``--ray`` runs the runs of each phase (the sweeps, then the reported runs) as Ray tasks, as many
at once as the cluster has CPUs for, a protocol's blocks side by side (an earlier block's runs
first, a later one's on the CPUs it leaves idle); the results are the same files. Either way the bench
prints the runs done and left, and each run's rounds as they close.
``--protocol bench/quality.yaml`` runs several benches (blocks of one base config) and writes
their combined report (``QUALITY.md``, ``quality.json``).

Output under ``<output_dir>`` (default ``results/<name>``): ``results.md``, ``results.json``,
``metric_vs_bytes.png``, ``data/seed*/`` and one folder per run under ``cells/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import ValidationError

from ..common.cli import DTYPE_NAMES, fail, parser, require_file
from ..common.logs import quiet_libraries
from .config import DEFAULT_CONFIG, BenchConfigError, ModelSpec, load_bench_config

PROG = "fedkrso-bench"


def main(argv: list[str] | None = None) -> None:
    p = parser(PROG, __doc__, {0: "every run finished and the report is written",
                               1: "a run failed (its server or a client exited non-zero)",
                               2: "bad flags; a missing or invalid bench config or results folder"})
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="bench YAML")
    p.add_argument("--quick", action="store_true", help="apply the config's quick preset")
    p.add_argument("--out", help="results folder (default: output_dir or results/<name>[-quick])")
    p.add_argument("--methods", help="comma-separated subset of the config's methods")
    p.add_argument("--rounds", type=int, help="override rounds")
    p.add_argument("--seeds", help="override seeds, comma-separated")
    p.add_argument("--runner", choices=["sim", "processes"], help="override runner")
    p.add_argument("--protocol", metavar="YAML", help="run a protocol (blocks of benches) and write QUALITY.md")
    p.add_argument("--blocks", help="with --protocol: comma-separated subset of its blocks")
    p.add_argument("--device", help="model.device of every run: cpu, cuda, cuda:N, mps, auto (overrides the config)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="model.dtype of every run (overrides the config)")
    p.add_argument("--ray", action="store_true",
                   help="run the cells of each phase as Ray tasks, several at once (a local Ray unless --address)")
    p.add_argument("--address", help="with --ray: the Ray cluster to join (auto, or the head's HOST:PORT); "
                   "--out must then be a folder every node sees at the same path")
    p.add_argument("--report-only", metavar="DIR",
                   help="rewrite DIR/results.md and the plot from DIR/results.json, running nothing")
    args = p.parse_args(argv)
    quiet_libraries()  # no datasets bar per saved partition in a log file
    if args.report_only:
        out = Path(args.report_only)
        results = require_file(PROG, out / "results.json", "bench results")
        from .runner import write_report

        write_report(json.loads(results.read_text()), out)
        print((out / "results.md").read_text())
        return

    if args.address and not args.ray:
        fail(PROG, "--address needs --ray")
    from .ray_cells import CellPool, RayCellPool

    pool = CellPool
    if args.ray:
        from ..sim.ray_connect import RayUnavailable, connect

        try:
            connect(args.address)
        except RayUnavailable as err:
            fail(PROG, err)
        pool = RayCellPool

    if args.protocol:
        from .protocol import run_protocol

        require_file(PROG, args.protocol, "protocol")
        out = Path(args.out or "results/quality").resolve()
        command = "fedkrso-bench " + " ".join(sys.argv[1:] if argv is None else argv)
        try:
            run_protocol(Path(args.protocol), out, args.blocks.split(",") if args.blocks else None, command, args.quick,
                         cell_pool=pool)
        except BenchConfigError as err:
            fail(PROG, err)
        except RuntimeError as err:  # a run failed; its log tail is in the message
            fail(PROG, err, 1)
        print((out / "QUALITY.md").read_text())
        return

    require_file(PROG, args.config, "bench config")
    try:
        cfg = load_bench_config(args.config)
    except BenchConfigError as err:
        fail(PROG, err)
    if args.quick:
        cfg = cfg.apply_quick()
    if args.methods:
        keep = args.methods.split(",")
        unknown = set(keep) - {m.tag for m in cfg.methods}
        if unknown:
            fail(PROG, f"methods not in the config: {sorted(unknown)}")
        cfg.methods = [m for m in cfg.methods if m.tag in keep]
    if args.device or args.dtype:
        try:
            cfg.model = ModelSpec.model_validate(cfg.model.model_dump() | {
                k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v})
        except ValidationError as err:
            fail(PROG, f"--device {args.device!r}: {err.errors()[0]['msg']}")
    if args.rounds:
        cfg.rounds = args.rounds
        cfg.sweep_rounds = min(cfg.sweep_rounds, args.rounds)
    if args.seeds:
        cfg.seeds = [int(s) for s in args.seeds.split(",")]
    if args.runner:
        cfg.runner = args.runner
    out = Path(args.out) if args.out else (cfg.output_dir or Path("results") / (cfg.name + ("-quick" if args.quick else "")))
    command = "fedkrso-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    from .runner import run_bench

    try:
        report = run_bench(cfg, out.resolve(), command, log=lambda s: print(s, flush=True), pool=pool)
    except RuntimeError as err:  # a server or client of a run failed; its log tail is in the message
        fail(PROG, err, 1)
    print((out / "results.md").read_text())
    print(f"fedkrso-bench: {len(report['results'])} method(s) in {report['runtime_s']:.0f} s; "
          f"results in {out}")


if __name__ == "__main__":
    main()
