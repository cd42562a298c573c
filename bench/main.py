"""``fedkrso-bench --config bench/sst2.yaml [--quick]``: compare federated methods end to end.

For every method of the config (and every learning rate of its sweep) the bench writes a
round.yaml and runs a *real* federated job: one ``fedkrso-server`` process and one
``fedkrso-client`` process per shard, talking gRPC on loopback (``bench.launch.Cluster``).
All runs share one Dirichlet partition of the data (written once). Unselected clients just
long-poll the server, so many clients fit on a small host.

Learning-rate sweep: when a method lists several ``lrs``, each is run for ``sweep_rounds``
rounds and the best one (highest final eval accuracy; lowest eval loss for a causal LM) is
then run for the full ``rounds`` (the sweep run is reused when ``sweep_rounds == rounds``).

Output under ``<output_dir>`` (default ``results/<name>``): ``results.md`` (the table, the
sweep table and the three targets with pass/fail), ``results.json``, ``accuracy_vs_bytes.png``
and one folder per run (round.yaml, metrics.jsonl, server and client logs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from ..common.precision import DTYPE_NAMES
from .config import DEFAULT_CONFIG, ModelSpec, load_bench_config
from .runner import run_bench, write_report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="bench YAML")
    p.add_argument("--quick", action="store_true", help="apply the config's quick preset")
    p.add_argument("--out", help="results folder (default: output_dir or results/<name>[-quick])")
    p.add_argument("--methods", help="comma-separated subset of the config's methods")
    p.add_argument("--rounds", type=int, help="override rounds")
    p.add_argument("--device", help="model.device of every run: cpu, cuda, cuda:N, mps, auto (overrides the config)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="model.dtype of every run (overrides the config)")
    p.add_argument("--report-only", metavar="DIR",
                   help="rewrite DIR/results.md and the plot from DIR/results.json, running nothing")
    args = p.parse_args(argv)
    if args.report_only:
        out = Path(args.report_only)
        write_report(json.loads((out / "results.json").read_text()), out)
        print((out / "results.md").read_text())
        return

    cfg = load_bench_config(args.config)
    if args.quick:
        cfg = cfg.apply_quick()
    if args.methods:
        keep = args.methods.split(",")
        unknown = set(keep) - {m.tag for m in cfg.methods}
        if unknown:
            raise SystemExit(f"fedkrso-bench: methods not in the config: {sorted(unknown)}")
        cfg.methods = [m for m in cfg.methods if m.tag in keep]
    if args.device or args.dtype:
        try:
            cfg.model = ModelSpec.model_validate(cfg.model.model_dump() | {
                k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v})
        except ValidationError as err:
            raise SystemExit(f"fedkrso-bench: --device {args.device!r}: {err.errors()[0]['msg']}") from None
    if args.rounds:
        cfg.rounds = args.rounds
        cfg.sweep_rounds = min(cfg.sweep_rounds, args.rounds)
    out = Path(args.out) if args.out else (cfg.output_dir or Path("results") / (cfg.name + ("-quick" if args.quick else "")))
    command = "fedkrso-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_bench(cfg, out.resolve(), command, log=lambda s: print(s, flush=True))
    print((out / "results.md").read_text())
    print(f"fedkrso-bench: {len(report['results'])} method(s) in {report['runtime_s']:.0f} s; "
          f"results in {out}")


if __name__ == "__main__":
    main()
