"""Each method's gap to the centralized ceiling (``ceiling.py``) in a protocol's blocks.

A block's federated runs and its ceiling's runs share their partitions seed by seed (the same
shards, validation and eval splits), so the gap is paired: per seed, the method's final-round
metric on the eval split minus the ceiling's eval metric at its best validation step, then the
mean and 95% t-interval over the seeds both have (negative: below the ceiling). A block whose
ceiling is another block's (SST-2 Dirichlet reads the SST-2 ceiling: the same rows in one
place) names it after a colon. Writes ``<out>/gaps.json`` and prints the tables. With
``--raw FILE`` it also gathers every finished result under ``--out`` into one JSON file (the
raw figures a page cites: docs/quality-converged.json): per block, its ceiling's summary and
every ceiling run's curve, its sizing curves, each finished federated run's per-round figures
(``runs``: a block's finished cells, so a sweep's runs are there before its block reports), its
bench ``results.json``, its gaps, what its finished runs cost (``cost``: runs, their seconds
added up, and the wall time the federated runs' sittings covered together, which with
``fedkrso-bench --ray`` on two cores is about half their sum); and the budget (``budget.json``).
A run's entry holds every figure of each round but who took part, its sittings' spans and its
settings, so ``restore.py`` can bring the file's finished runs back on another machine.
With ``--tables`` it prints, per block, the figures a page shows while a block is under way, so
they are pasted from a command, not copied by hand: its ceiling's runs seed by seed, and its
finished federated runs round by round (the block's metric x 100, the mean of the last 3
rounds: a sweep's score, and the wall time).

    python -m fedkrso.bench.gaps --out results/converged --blocks sst2-iid:sizing sst2-dirichlet:sizing stsb-iid cola-iid \
        --raw docs/quality-converged.json --tables
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..common import cli
from .stats import mean_std, paired_interval


def gaps(results: dict, ceiling: dict) -> list[dict]:
    """Per method of a bench's ``results.json``: its final metric, the ceiling's, and the paired gap."""
    ceil = {int(s): r["best"]["eval"] for s, r in ceiling["seeds"].items()}
    rows = []
    for tag, entry in results["results"].items():
        final = {int(s): c["final"] for s, c in entry["seeds"].items()}
        rows.append({"method": tag, "lr": entry["lr"], "final": mean_std(list(final.values())),
                     "ceiling": mean_std([ceil[s] for s in final if s in ceil]),
                     "gap": paired_interval(final, ceil)})
    return rows


def _pm(stats: dict) -> str:
    if stats.get("mean") is None:
        return "n/a"
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}" if stats.get("n", 0) > 1 else f"{100 * stats['mean']:.2f}"


def _gap(g: dict) -> str:
    if g["mean"] is None:
        return "n/a"
    if g["low"] is None:
        return f"{100 * g['mean']:+.2f} (1 seed)"
    return f"{100 * g['mean']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"


def render(block: str, metric: str, rows: list[dict]) -> str:
    """A block's gaps as a markdown table (metric x 100)."""
    lines = [f"### {block}: gap to the centralized ceiling ({metric})", "",
             "| method | lr | final | ceiling (same seeds) | gap [95% CI] | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {_pm(r['final'])} | {_pm(r['ceiling'])} | {_gap(r['gap'])} "
                     f"| {r['gap']['n']} |")
    return "\n".join(lines) + "\n"


def _x100(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def ceiling_table(ceiling: dict, whose: str = "") -> str:
    """A ceiling's runs seed by seed (``ceiling.json``, metric x 100) as a markdown table."""
    metric = ceiling.get("metric", "metric")
    lines = [f"ceiling{whose} at lr {ceiling['lr']:g} ({metric} x 100; at_best_val {_pm(ceiling['at_best_val'])}, "
             f"at_last {_pm(ceiling['at_last'])}):", "",
             f"| seed | best validation {metric} | at step (epoch) | eval {metric} there | last eval {metric} (step) "
             "| stopped | minutes |", "|---|---|---|---|---|---|---|"]
    for seed, run in sorted(ceiling["seeds"].items(), key=lambda kv: int(kv[0])):
        best, last = run["best"], run["last"]
        lines.append(f"| {seed} | {_x100(best['val'])} | {best['step']:,} ({best['epoch']:.1f}) | {_x100(best['eval'])} "
                     f"| {_x100(last['eval'])} ({last['step']:,}) | {run['stopped']} | {run['seconds'] / 60:.0f} |")
    return "\n".join(lines) + "\n"


def runs_table(cells: list[tuple[Path, dict]], metric: str) -> str:
    """A block's finished federated runs round by round (``eval_<metric>`` x 100 on the run's
    split), the mean of their last 3 rounds and their wall time, as a markdown table."""
    if not cells:
        return ""
    rounds = max(len(c["rows"]) for _, c in cells)
    lines = [f"finished runs ({metric} x 100 after each round on the run's split):", "",
             "| run | " + " | ".join(str(r + 1) for r in range(rounds)) + " | last 3 | minutes (sittings) |",
             "|---" * (rounds + 3) + "|"]
    for path, cell in cells:
        values = [r.get(f"eval_{metric}") for r in cell["rows"]]
        shown = [f"{100 * v:.1f}" if isinstance(v, (int, float)) else "n/a" for v in values]
        tail = [v for v in values[-3:] if isinstance(v, (int, float))]
        last3 = f"{100 * sum(tail) / len(tail):.2f}" if tail else "n/a"
        timing = (f"{cell['seconds'] / 60:.0f} ({cell.get('sittings', 1)})" if "replayed_from" not in cell
                  else f"replayed from {cell['replayed_from']}")
        lines.append(f"| {path.parent.name} | " + " | ".join(shown + [""] * (rounds - len(shown)))
                     + f" | {last3} | {timing} |")
    return "\n".join(lines) + "\n"


def tables(out: Path, block: str, source: str) -> str:
    """``--tables``' figures of ``block`` (module docstring); the metric is its ceiling's (or
    its bench's, or accuracy where it has neither yet)."""
    ceiling, results = _load(out / source / "ceiling" / "ceiling.json"), _load(out / block / "results.json")
    metric = (ceiling or {}).get("metric") or (results or {}).get("metric") or "accuracy"
    parts = [f"### {block}", ""]
    if ceiling is not None:
        parts.append(ceiling_table(ceiling, f" ({source}'s)" if source != block else ""))
    parts.append(runs_table(_finished(out / block), metric) or "no federated run finished yet\n")
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = cli.parser("python -m fedkrso.bench.gaps", __doc__, {0: "every block named has its gaps", 2: "usage error"})
    p.add_argument("--out", required=True, type=Path, help="the protocol's output folder")
    p.add_argument("--blocks", nargs="+", required=True, help="BLOCK or BLOCK:CEILING_BLOCK (whose ceiling it reads)")
    p.add_argument("--raw", type=Path, help="also gather every finished result under --out into this JSON file")
    p.add_argument("--tables", action="store_true", help="also print each block's ceiling runs and finished "
                   "federated runs as markdown tables (a page's figures while a block is under way)")
    return p.parse_args(argv)


def _load(path: Path):
    """The JSON document at ``path``; None where there is no such file (not yet written)."""
    return json.loads(path.read_text()) if path.is_file() else None


def _yaml(path: Path):
    """The YAML document at ``path``; None where there is no such file."""
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


SETTINGS_PATHS = (("run", "output_dir"), ("eval", "data"))  # where a run's files were: not a setting


def settings(round_yaml: dict) -> dict:
    """A cell's round.yaml without the paths of the machine it ran on (``SETTINGS_PATHS``): what
    ``restore.py`` compares with the round.yaml the bench would write now."""
    kept = {k: dict(v) if isinstance(v, dict) else v for k, v in round_yaml.items()}
    for section, key in SETTINGS_PATHS:
        kept.get(section, {}).pop(key, None)
    return kept


def run_curves(cell: dict, sittings: list[dict] | None = None, round_yaml: dict | None = None) -> dict:
    """A finished federated run's figures (``cells.py``'s cell.json) without its per-client
    detail (each row's lists and objects: who took part and each client's own figures): what it
    was, how long it took, every figure of each round (``per_round``), its sittings' spans and
    its settings (``settings``) where known, so ``restore.py`` can bring it back on another
    machine."""
    rows = cell["rows"]
    keys = sorted({k for r in rows for k, v in r.items() if v is None or isinstance(v, (int, float, str))}
                  - {k for r in rows for k, v in r.items() if isinstance(v, (list, dict))})
    doc = {**{k: v for k, v in cell.items() if k != "rows"}, "per_round": {k: [r.get(k) for r in rows] for k in keys}}
    if sittings is not None:
        doc["sitting_spans"] = [[s["start"], s["end"]] for s in sittings]
    if round_yaml is not None:
        doc["settings"] = settings(round_yaml)
    return doc


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``(start, end)`` spans (runs side by side count once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def cost(cells: list[tuple[Path, dict]], ceilings: list[dict], spans: list[tuple[float, float]],
         carried: float = 0.0) -> dict | None:
    """What a block's finished runs took (module docstring), from its finished federated runs
    (``_finished``), its ceiling runs and the federated runs' sittings (``_spans``); None where
    none has finished. Each run computes on one core (``threads: 1``), so run seconds are
    core-seconds. A reported run made from its sweep twin (``replayed_from``) costs its replay,
    not its twin's training again. ``carried``: the wall time of runs restored without their
    sittings' spans (``restore.py``), added to what the spans cover."""
    if not cells and not ceilings:
        return None
    trained = [c for _, c in cells if "replayed_from" not in c]
    return {"federated_runs": len(trained), "federated_run_seconds": sum(c["seconds"] for c in trained),
            "replayed_runs": len(cells) - len(trained),
            "replay_seconds": sum(c["replay_seconds"] for _, c in cells if "replayed_from" in c),
            "federated_wall_seconds": covered(spans) + carried,
            "ceiling_runs": len(ceilings), "ceiling_run_seconds": sum(c["seconds"] for c in ceilings)}


def _finished(block: Path) -> list[tuple[Path, dict]]:
    """A block's finished federated runs: each cell.json's path and content, read once."""
    return [(p, _load(p)) for p in sorted(block.glob("cells/*/cell.json"))]


def _spans(cells: list[tuple[Path, dict]]) -> list[tuple[float, float]]:
    """The sittings (``cells.py``'s sittings.json) of finished federated runs; a run from before
    sittings were kept counts as one sitting that ended when its cell.json was written; one
    restored without its spans counts none (its wall time is carried: ``restore.py``)."""
    spans = []
    for done, cell in cells:
        sittings = _load(done.parent / "sittings.json")
        if sittings is None and "replayed_from" not in cell and "restored" not in cell:
            end = done.stat().st_mtime
            sittings = [{"start": end - cell["seconds"], "end": end}]
        spans += [(s["start"], s["end"]) for s in sittings or [] if s.get("end") is not None]
    return spans


def raw(out: Path, gaps_by_block: dict) -> dict:
    """Every finished result of a protocol's output folder (module docstring), block by block."""
    doc = {"what": "a quality protocol's finished results, per block: the centralized ceiling (bench/ceiling.py: "
                   "its summary and every run's curve), the sizing (bench/sizing.py: every variant's validation "
                   "curve), every finished federated run's per-round figures (runs), the federated bench's "
                   "results.json, the gaps to the ceiling (bench/gaps.py) and what the finished runs cost (cost: "
                   "run seconds are core-seconds, one core per run; federated_wall_seconds is the time the "
                   "federated runs' sittings covered together)",
           "blocks": {}}
    every_span = []
    carried = _load(out / "restored.json") or {}
    for block in sorted(p for p in out.iterdir() if p.is_dir()):
        c = block / "ceiling"
        cells = _finished(block)
        ceiling_cells = {p.stem: _load(p) for p in sorted((c / "cells").glob("*.json"))}
        spans = _spans(cells)
        every_span += spans
        entry = {
            "ceiling": _load(c / "ceiling.json"),
            "ceiling_cells": ceiling_cells or None,
            "sizing": _load(block / "sizing.json"),
            "runs": {p.parent.name: run_curves(cell, _load(p.parent / "sittings.json"), _yaml(p.parent / "round.yaml"))
                     for p, cell in cells} or None,
            "results": _load(block / "results.json"),
            "gaps": gaps_by_block.get(block.name),
            "cost": cost(cells, list(ceiling_cells.values()), spans,
                         carried.get("blocks", {}).get(block.name, 0.0))}
        entry = {k: v for k, v in entry.items() if v is not None}
        if entry:
            doc["blocks"][block.name] = entry
    blocks = [b["cost"] for b in doc["blocks"].values() if "cost" in b]
    if blocks:
        doc["cost"] = {**{k: sum(b[k] for b in blocks) for k in blocks[0]},
                       "federated_wall_seconds": covered(every_span) + carried.get("federated_wall_seconds", 0.0)}
    if (budget := _load(out / "budget.json")) is not None:
        doc["budget"] = budget
    return doc


def main(argv: list[str] | None = None) -> None:
    """Print and write the gaps of every named block that has both its results and a ceiling."""
    args = parse_args(argv)
    answer = {}
    for spec in args.blocks:
        block, _, source = spec.partition(":")
        results, ceiling = args.out / block / "results.json", args.out / (source or block) / "ceiling" / "ceiling.json"
        r, c = _load(results), _load(ceiling)
        if r is None or c is None:
            print(f"{block}: not yet ({', '.join(str(p) for p, d in ((results, r), (ceiling, c)) if d is None)} missing)")
            continue
        rows = gaps(r, c)
        answer[block] = {"metric": r["metric"], "ceiling_block": source or block, "methods": rows}
        print(render(block, r["metric"], rows))
    if args.tables:
        for spec in args.blocks:
            block, _, source = spec.partition(":")
            print(tables(args.out, block, source or block))
    (args.out / "gaps.json").write_text(json.dumps(answer, indent=2) + "\n")
    doc = raw(args.out, answer)
    if "cost" in doc:
        c = doc["cost"]
        print(f"cost so far: federated runs {c['federated_runs']} ({c['federated_run_seconds'] / 3600:.1f} core-hours, "
              f"{c['federated_wall_seconds'] / 3600:.1f} hours of wall time), ceiling runs {c['ceiling_runs']} "
              f"({c['ceiling_run_seconds'] / 3600:.1f} core-hours)")
    if args.raw:
        args.raw.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"raw results: {args.raw}")


if __name__ == "__main__":
    main()
