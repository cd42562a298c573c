"""Sizing a quality protocol's budget by measurement: how many rounds of how many local steps
FedAvg (federated full fine-tuning) needs before its validation metric stops moving.

For each FedAvg variant of a block (``label``led rows that differ in ``steps``), one seed runs
``rounds`` rounds on the block's validation split (never the reported split) at the variant's
first lr; its curve is read for the first round at which the mean of the last ``--window``
rounds improved by less than ``--tolerance`` points (x100) on the mean of the ``--window``
rounds before them: the plateau, whose value is that last window's mean. (Means of windows,
not single rounds: on a validation split of 500 rows one example is 0.2 points, and a
settled run's rounds still move by about a point, so no window of single rounds spans under
0.3 points.) The budget is the variant with the fewest local steps in all (rounds x steps)
whose plateau value is within ``--tolerance`` of the highest level any variant reached (an
unsettled variant's last window counts: one that settled below a variant still climbing is
not converged). Several ``--blocks`` (e.g. a longer sizing added after a first that did not
settle) are answered together as well, in ``<out>/budget.json``. The cells are the bench's own (``cells.py``), so a
stopped sizing resumes; the answer is ``<out>/<block>/sizing.json`` with every curve. With
``--ray`` the variants run at once as Ray tasks (``ray_cells.RayCellPool``, one per core).

    python -m fedkrso.bench.sizing --protocol bench/converged.yaml --out results/converged --blocks sizing --ray
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..common import cli
from ..common.logs import quiet_libraries
from .cells import Cell
from .config import BenchConfig, load_protocol
from .protocol import block_config
from .ray_cells import CellPool, Progress, RayCellPool
from .report import higher_is_better, summarise
from .runner import partition, task_metric

METHOD = "fedavg"


def window_mean(values: list[float | None], r: int, window: int) -> float | None:
    """The mean of the ``window`` values ending at 1-based round ``r`` (None: one is missing)."""
    part = values[r - window:r]
    return None if len(part) < window or any(v is None for v in part) else sum(part) / window


def plateau(values: list[float | None], window: int, tolerance: float, sign: int = 1) -> int | None:
    """The first 1-based round r >= 2 ``window`` at which the mean of the last ``window``
    values improved (x100, ``sign`` -1 where lower is better) by less than ``tolerance``
    points on the mean of the ``window`` before them; None when the curve never settles."""
    for r in range(2 * window, len(values) + 1):
        last, before = window_mean(values, r, window), window_mean(values, r - window, window)
        if last is not None and before is not None and 100 * sign * (last - before) < tolerance:
            return r
    return None


def sizing(cfg: BenchConfig, out: Path, window: int, tolerance: float, log=print,
           pool: type[CellPool] = CellPool) -> dict:
    """Every FedAvg variant's curve and plateau under ``out`` (the block's folder), and the budget;
    ``pool``: where the variants run (``RayCellPool``: at once)."""
    variants = [m for m in cfg.methods if m.name == METHOD]
    if not variants:
        raise SystemExit(f"python -m fedkrso.bench.sizing: block {cfg.name} runs no {METHOD}")
    seed = cfg.seeds[0]
    data = out / "data" / f"seed{seed}"
    info = partition(cfg, seed, data)
    if not info.get("val_rows"):
        raise SystemExit("python -m fedkrso.bench.sizing: the block has no validation split (val_fraction)")
    metric = task_metric(cfg, info)
    num_labels = cfg.model.num_labels or info.get("num_labels") or 2
    sign = 1 if higher_is_better(metric) else -1
    cells = []
    for spec in variants:
        lr = spec.lrs[0] if spec.lrs else spec.model_extra.get("lr")
        log(f"  sizing {spec.tag}: {cfg.rounds} rounds of {spec.knobs().get('steps')} local steps at lr {lr:g}, "
            f"seed {seed}, on val")
        cells.append(Cell(spec, lr, seed, cfg.rounds, "val"))
    results = pool(Progress(len(cells), log)).run(cfg, cells, {seed: data}, out, num_labels)
    found = []
    for spec, cell, result in zip(variants, cells, results):
        steps = spec.knobs().get("steps")
        summary = summarise(result, metric)
        values = [p["metric"] for p in summary["curve"]]
        at = plateau(values, window, tolerance, sign)
        last = window_mean(values, len(values), window)
        found.append({"block": cfg.name, "method": spec.tag, "steps": steps, "rounds": cfg.rounds, "lr": cell.lr,
                      "plateau_round": at, "plateau_value": window_mean(values, at, window) if at else None,
                      "last_window": last, "best": summary["best"],
                      "local_steps_to_plateau": at * steps if at and steps else None,
                      "curve": values, "seconds": summary["seconds"]})
        log(f"  sizing {spec.tag}: plateau at round {at} ({found[-1]['plateau_value']}), last {window} rounds' mean "
            f"{last}, best {summary['best']}")
    answer = {"block": cfg.name, "metric": metric, "seed": seed, "split": "val", "rounds": cfg.rounds,
              "window": window, "tolerance_points": tolerance, "clients": cfg.clients,
              "clients_per_round": cfg.clients_per_round, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
              "variants": found, **budget_of(found, tolerance, sign)}
    (out / "sizing.json").write_text(json.dumps(answer, indent=2) + "\n")
    return answer


def budget_of(variants: list[dict], tolerance: float, sign: int = 1) -> dict:
    """The budget among ``variants`` (of one block or several): the settled variant with the
    fewest local steps to its plateau whose plateau value is within ``tolerance`` points of the
    highest level any variant reached (a settled one's plateau value, an unsettled one's last
    window), so a variant that settled lower than another still climbing is not a budget;
    ``{"budget": None, "why": ...}`` when there is none."""
    def level(v: dict) -> float | None:
        return v["plateau_value"] if v["plateau_round"] else v["last_window"]

    known = [v for v in variants if level(v) is not None]
    if not known:
        return {"budget": None, "why": "no variant has a full window of evaluated rounds"}
    top = max(known, key=lambda v: sign * level(v))
    near = [v for v in known if v["plateau_round"] and 100 * sign * (level(top) - v["plateau_value"]) < tolerance]
    if not near:
        settled = [f"{v['block']}/{v['method']} at round {v['plateau_round']} ({100 * v['plateau_value']:.2f})"
                   for v in known if v["plateau_round"]]
        return {"budget": None, "why": f"{top['block']}/{top['method']} reached {100 * level(top):.2f} (mean of its "
                f"last rounds) and " + ("had not settled after its " + str(top["rounds"]) + " rounds"
                                        if not top["plateau_round"] else "settled")
                + "; " + (", ".join(settled) + f" settled more than {tolerance:g} points below it"
                          if settled else "no variant settled") + ": raise the rounds or the local steps"}
    b = min(near, key=lambda v: v["local_steps_to_plateau"])
    return {"budget": {"rounds": b["plateau_round"], "steps": b["steps"], "method": b["method"], "block": b["block"]},
            "why": f"{b['block']}/{b['method']} settled at round {b['plateau_round']} ({100 * b['plateau_value']:.2f}), "
                   f"within {tolerance:g} points of the highest level reached ({100 * level(top):.2f}, "
                   f"{top['block']}/{top['method']})"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = cli.parser("python -m fedkrso.bench.sizing", __doc__, {0: "sized (or said that nothing settled)"})
    p.add_argument("--protocol", required=True, type=Path, help="the protocol YAML holding the sizing block")
    p.add_argument("--out", required=True, type=Path, help="the protocol's output folder")
    p.add_argument("--blocks", nargs="+", required=True, help="the sizing block(s): FedAvg variants, one seed")
    p.add_argument("--window", type=int, default=5, help="rounds per window (the plateau compares the means of two)")
    p.add_argument("--tolerance", type=float, default=0.3, help="points (metric x 100) a window's mean may gain on the window before")
    p.add_argument("--ray", action="store_true", help="run the variants at once as Ray tasks (a local cluster "
                   "unless --address)")
    p.add_argument("--address", help="with --ray: the Ray cluster to join (auto, or the head's HOST:PORT)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Size every named block, resumable."""
    args = parse_args(argv)
    quiet_libraries()  # no datasets bar per saved partition in a log file
    pool = CellPool
    if args.ray:
        from ..sim.ray_connect import RayUnavailable, connect

        try:
            connect(args.address)
        except RayUnavailable as err:
            raise SystemExit(f"python -m fedkrso.bench.sizing: {err}") from None
        pool = RayCellPool
    elif args.address:
        raise SystemExit("python -m fedkrso.bench.sizing: --address needs --ray")
    protocol = load_protocol(args.protocol)
    variants, sign = [], 1
    for name in args.blocks:
        cfg = block_config(protocol, name, args.out, strict=False)
        print(f"block {name}: sizing {cfg.rounds} rounds of FedAvg on {cfg.data.source}", flush=True)
        a = sizing(cfg, args.out / name, args.window, args.tolerance, pool=pool)
        sign = 1 if higher_is_better(a["metric"]) else -1
        variants += a["variants"]
        print(f"block {name}: budget {a['budget']} ({a['why']})", flush=True)
    if len(args.blocks) > 1:  # the budget over every variant of the blocks named
        answer = {"blocks": args.blocks, "window": args.window, "tolerance_points": args.tolerance,
                  **budget_of(variants, args.tolerance, sign)}
        (args.out / "budget.json").write_text(json.dumps(answer, indent=2) + "\n")
        print(f"blocks {', '.join(args.blocks)}: budget {answer['budget']} ({answer['why']})", flush=True)


if __name__ == "__main__":
    main()
