"""A protocol: several benches (blocks) of one base config, run one after another, each
resumable cell by cell, and their combined report: ``QUALITY.md`` and ``quality.json``.

The combined report is rewritten after every block, and lists for every block how many of its
runs are finished, so a protocol that outlasts a sitting reports what it covers so far.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import load_protocol
from .report import render_table
from .runner import run_bench


def planned_runs(cfg) -> int:
    """How many result cells a bench config needs (sweeps and reported runs)."""
    sweeps = sum(len(m.lrs) * cfg.sweep_seeds for m in cfg.methods if m.lrs and len(m.lrs) > 1)
    return sweeps + len(cfg.methods) * len(cfg.seeds)


def run_protocol(path: Path, out: Path, only: list[str] | None, command: str) -> dict:
    protocol = load_protocol(path)
    blocks = [b for b in protocol.blocks if only is None or b.name in only]
    unknown = set(only or ()) - {b.name for b in protocol.blocks}
    if unknown:
        raise SystemExit(f"fedkrso-bench: blocks not in {path}: {sorted(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    combined_path = out / "quality.json"
    combined = json.loads(combined_path.read_text()) if combined_path.exists() else {"blocks": {}}
    combined.update({"name": protocol.name, "description": protocol.description, "command": command,
                     "protocol": str(path)})
    for block in blocks:
        cfg = protocol.bench(block)
        started = time.monotonic()
        report = run_bench(cfg, out / block.name, command, log=lambda s: print(s, flush=True))
        done = len(list((out / block.name / "cells").glob("*/cell.json")))
        combined["blocks"][block.name] = {"purpose": block.purpose, "report": report, "cells_done": done,
                                          "cells_planned": planned_runs(cfg),
                                          "seconds_this_sitting": time.monotonic() - started}
        combined_path.write_text(json.dumps(combined, indent=2) + "\n")
        (out / "QUALITY.md").write_text(render_quality(combined))
    return combined


def render_quality(combined: dict) -> str:
    lines = [f"# {combined['name']}", "", combined.get("description", "").strip(), "",
             f"Command: `{combined['command']}`", ""]
    for name, block in combined["blocks"].items():
        report = block["report"]
        cells = [s for e in report["results"].values() for s in e["seeds"].values()]
        seconds = [c["seconds"] for c in cells if c.get("seconds")]
        lines += [f"## {name}", "", block["purpose"].strip(), "",
                  f"{report['data_source']}, {report['clients']} clients, "
                  + ("IID" if report["alpha"] is None else f"Dirichlet {report['alpha']}")
                  + f", {report['clients_per_round']} per round, {report['rounds']} rounds, seeds "
                  f"{report['seeds']}, metric {report['metric']}; runs finished {block['cells_done']} of "
                  f"{block['cells_planned']}; mean {sum(seconds) / len(seconds):.0f} s per reported run"
                  if seconds else "no run finished yet", ""]
        lines += render_table(report)
        for a in report["answers"]:
            interval = a.get("interval")
            detail = (f"{interval['mean']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"
                      if interval and interval.get("low") is not None else
                      f"{a['ratio']:.1f}x" if "ratio" in a else "one seed: no interval")
            lines.append(f"- **{a['verdict']}**: {a['question']} ({detail})")
        lines += ["", f"![{name}]({name}/{report['plot']})", ""]
    return "\n".join(lines)
