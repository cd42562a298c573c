"""Bring a protocol's finished results back from its committed raw file onto a new machine.

A converged protocol takes many sittings and a sitting's machine may not be the next one's:
what carries over is what was committed, the raw file ``gaps.py --raw`` writes
(docs/quality-converged.json). This is its inverse: under ``--out`` it writes, for every block
of the raw file that the protocol has, what the bench, the ceiling and ``gaps.py`` read as
finished, so they go on where the committed results stop instead of running them again:

- each finished federated run as a finished cell (``cells.py``): its round.yaml as the bench
  would write it now on this machine, its rows (every round's figures, without the per-client
  detail the raw file leaves out), its sittings where the raw file has their spans, and
  ``restored`` in its cell.json (where from, and whether its settings were checked);
- each ceiling's summary and runs, each sizing's curves and the budget, the block's
  ``results.json``.

A run is restored only when the settings it ran with (``settings`` in the raw file) are the
settings the bench would run now; one that differs is left to run again, and a run from a raw
file written before settings were kept is restored with ``settings_checked: false`` and a line
saying so. What is already under ``--out`` is kept: restoring twice, or into a folder whose
runs go on, changes nothing that is there. A restored sweep run has no run state, so the
reported run that would have been replayed from it is trained instead (the same rounds: the
training does not depend on the split it is scored on).

What the runs cost carries over too: a run restored without its sittings' spans has no span
to add up, so the wall time the raw file counted for such runs is written to
``<out>/restored.json`` and ``gaps.py`` adds it to what the spans cover.

    python -m fedkrso.bench.restore --raw docs/quality-converged.json --protocol bench/converged.yaml \\
        --out results/converged
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from ..common import cli
from ..common.logs import quiet_libraries
from .cells import Cell, round_yaml, save_json
from .gaps import covered, settings
from .protocol import block_config
from .config import load_protocol
from .runner import partition


def rows_of(run: dict) -> list[dict]:
    """A raw run's rows from its ``per_round`` columns; ``round`` numbered from 1 where a raw file
    written before every figure was kept has no such column (its rows are its rounds, in order)."""
    columns = run["per_round"]
    n = max((len(v) for v in columns.values()), default=0)
    rows = [{k: v[i] for k, v in columns.items() if i < len(v)} for i in range(n)]
    for i, row in enumerate(rows):
        row.setdefault("round", i + 1)
    return rows


def _restored(workdir: Path) -> bool:
    """The cell under ``workdir`` was restored from a raw file (not run on this machine)."""
    try:
        return "restored" in json.loads((workdir / "cell.json").read_text())
    except (OSError, ValueError):
        return False


def restore_run(cfg, tag: str, run: dict, out: Path, raw_path: Path) -> str:
    """One raw run as a finished cell of the block under ``out`` (module docstring); what was
    done: ``restored``, ``kept`` (there already), or why it was not."""
    spec = next((m for m in cfg.methods if m.tag == run.get("method")), None)
    if spec is None:
        return f"not restored: the protocol's block has no method {run.get('method')!r}"
    cell = Cell(spec, run["lr"], run["seed"], run["rounds"], run["split"])
    if cell.tag != tag:
        return f"not restored: its figures make the cell {cell.tag}, not {tag}"
    workdir = out / "cells" / tag
    if (workdir / "cell.json").is_file():
        return "kept (finished here already)"
    data = out / "data" / f"seed{cell.seed}"
    info = partition(cfg, cell.seed, data)  # the bench's partition of that seed, made as the bench makes it
    num_labels = cfg.model.num_labels or info.get("num_labels") or 2
    wanted = round_yaml(cfg, cell, data, workdir, num_labels)
    # a run restored before without its settings checked keeps saying so (the settings a raw
    # file holds for it are the ones it was restored with, not the ones it ran with)
    checked = "settings" in run and (run.get("restored") or {}).get("settings_checked", True)
    if checked and run["settings"] != settings(wanted):
        return "not restored: it ran with other settings than the protocol's now (it runs again)"
    if workdir.exists():  # a run cut off here: the finished one replaces it
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    rows = rows_of(run)
    (workdir / "round.yaml").write_text(yaml.safe_dump(wanted, sort_keys=False))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if run.get("sitting_spans"):
        save_json(workdir / "sittings.json", [{"start": a, "end": b} for a, b in run["sitting_spans"]])
    kept = {k: v for k, v in run.items() if k not in ("per_round", "sitting_spans", "settings")}
    save_json(workdir / "cell.json", {**kept, "tag": tag, "rows": rows,
                                        "restored": {"from": str(raw_path), "settings_checked": checked}})
    return "restored" if checked else "restored (settings_checked false: its settings were not recorded when it ran)"


def restore(raw_path: Path, protocol_path: Path, out: Path, log=print) -> dict:
    """Everything of the raw file the protocol has, under ``out`` (module docstring); per block,
    what happened to each of its runs."""
    doc = json.loads(raw_path.read_text())
    protocol = load_protocol(protocol_path)
    names = {b.name for b in protocol.blocks}
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, str]] = {}
    carried: dict = {"from": str(raw_path), "blocks": {}}
    spans_everywhere, whole = [], True
    for block, entry in doc.get("blocks", {}).items():
        if block not in names:
            log(f"{block}: not in {protocol_path}: left out")
            continue
        where = out / block
        for name, content in (("ceiling/ceiling.json", entry.get("ceiling")), ("sizing.json", entry.get("sizing")),
                              ("results.json", entry.get("results"))):
            if content is not None and not (where / name).is_file():
                save_json(where / name, content)
        for stem, content in (entry.get("ceiling_cells") or {}).items():
            if not (where / "ceiling" / "cells" / f"{stem}.json").is_file():
                save_json(where / "ceiling" / "cells" / f"{stem}.json", content)
        runs = entry.get("runs") or {}
        if runs:
            cfg = block_config(protocol, block, out, strict=False)
            done[block] = {tag: restore_run(cfg, tag, run, where, raw_path) for tag, run in runs.items()}
            for tag, what in done[block].items():
                log(f"{block}/{tag}: {what}")
        spans = [tuple(s) for run in runs.values() for s in run.get("sitting_spans") or []]
        spans_everywhere += spans
        wall = (entry.get("cost") or {}).get("federated_wall_seconds", 0.0)
        spanless = [tag for tag, run in runs.items() if not run.get("sitting_spans")]
        if not all(_restored(where / "cells" / tag) for tag in spanless):
            whole = False  # the runs of this machine's own sittings: their files count them
        elif wall - covered(spans) > 0:  # the runs without spans: older than the raw file's spans
            carried["blocks"][block] = wall - covered(spans)
    wall = (doc.get("cost") or {}).get("federated_wall_seconds", 0.0)
    if whole and wall - covered(spans_everywhere) > 0:
        carried["federated_wall_seconds"] = wall - covered(spans_everywhere)
    if carried["blocks"] or "federated_wall_seconds" in carried:
        save_json(out / "restored.json", carried)
    if doc.get("budget") is not None and not (out / "budget.json").is_file():
        save_json(out / "budget.json", doc["budget"])
    return done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = cli.parser("python -m fedkrso.bench.restore", __doc__,
                   {0: "every run of the raw file is restored, kept or reported as not restored", 2: "usage error"})
    p.add_argument("--raw", required=True, type=Path, help="the raw file gaps.py --raw wrote (committed)")
    p.add_argument("--protocol", required=True, type=Path, help="the protocol YAML the runs belong to")
    p.add_argument("--out", required=True, type=Path, help="the protocol's output folder on this machine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_libraries()  # no datasets bar per saved partition in a log file
    done = restore(args.raw, args.protocol, args.out)
    runs = [w for block in done.values() for w in block.values()]
    print(f"{sum(w.startswith('restored') for w in runs)} runs restored, {sum(w.startswith('kept') for w in runs)} "
          f"kept, {sum(w.startswith('not') for w in runs)} not restored, under {args.out}")


if __name__ == "__main__":
    main()
