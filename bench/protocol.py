"""A protocol: several benches (blocks) of one base config, each resumable cell by cell, and
their combined report: ``QUALITY.md`` and ``quality.json``.

The combined report is rebuilt from every block's ``results.json`` on disk after each block, so
it reports what a protocol covers so far (runs finished against runs planned, per block), and
several processes may run different blocks of one protocol (``--blocks``) side by side. A block
with ``lrs_from: <block>`` takes every method's learning rate from that block's selection
instead of sweeping again; a method that block runs must have its lr chosen there first (it
may still be running its other methods). A block with ``pool_with`` is also reported with the
seeds of another bench of the same settings pooled in (``report.pool``), e.g. more seeds for a
cell of a committed grid.

With ``--ray`` (``RayCellPool``) the blocks run side by side on the one cluster, an earlier
block's runs first (``_side_by_side``); without it, one after another.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

from .config import BenchConfig, ProtocolConfig, load_protocol
from .report import answers, pool, render_answers, render_table
from .ray_cells import CellPool, Progress, Slots, Stopped
from .runner import run_bench


def block_runs(protocol: ProtocolConfig, name: str, out: Path, quick: bool = False) -> int:
    """How many result cells a block needs: a block with ``lrs_from`` never sweeps (it waits for
    its source's choices), so one per method and seed even before the source has chosen."""
    cfg = block_config(protocol, name, out, quick, strict=False)
    return len(cfg.methods) * len(cfg.seeds) if _block(protocol, name).lrs_from else cfg.planned_runs()


def _block(protocol: ProtocolConfig, name: str):
    return next(b for b in protocol.blocks if b.name == name)


def block_config(protocol: ProtocolConfig, name: str, out: Path, quick: bool = False, strict: bool = True) -> BenchConfig:
    """The block's bench config (its ``quick`` preset applied with ``quick``), its lrs taken
    from ``lrs_from``'s selection where it names one; ``strict`` (to run it) refuses a source
    that has not chosen them yet, otherwise (to count its runs) what is chosen so far is used."""
    block = _block(protocol, name)
    cfg = protocol.bench(block)
    if quick:
        cfg = cfg.apply_quick()
    source = block.lrs_from
    if source:
        path = out / source / "results.json"
        if not path.is_file():
            if not strict:
                return cfg
            raise SystemExit(f"fedkrso-bench: block {name} takes its lrs from {source}, which has not run")
        chosen = {tag: entry["lr"] for tag, entry in json.loads(path.read_text())["results"].items()}
        # results.json is rewritten after every run, so it exists while the source block still
        # sweeps: a method the source runs but has not chosen for yet must wait, not sweep here
        pending = sorted({m.tag for m in protocol.bench(_block(protocol, source)).methods}
                         & {m.tag for m in cfg.methods} - set(chosen))
        if pending and strict:
            raise SystemExit(f"fedkrso-bench: block {name} takes its lrs from {source}, which has not chosen one "
                             f"for {', '.join(pending)} yet (run {source} to the end first)")
        for m in cfg.methods:
            if m.tag in chosen:
                m.lrs = [chosen[m.tag]]
    return cfg


def run_protocol(path: Path, out: Path, only: list[str] | None, command: str, quick: bool = False,
                 cell_pool: type[CellPool] = CellPool) -> dict:
    protocol = load_protocol(path)
    unknown = set(only or ()) - {b.name for b in protocol.blocks}
    if unknown:
        raise SystemExit(f"fedkrso-bench: blocks not in {path}: {sorted(unknown)}")
    for block in protocol.blocks:  # before hours of runs, not after them
        if block.pool_with and block.pool_with.report and (only is None or block.name in only):
            pool_source(block, out)
    out.mkdir(parents=True, exist_ok=True)
    selected = [b for b in protocol.blocks if only is None or b.name in only]
    if cell_pool.side_by_side and len(selected) > 1:
        return _side_by_side(protocol, selected, out, path, command, quick, cell_pool)
    for block in selected:
        run_bench(block_config(protocol, block.name, out, quick), out / block.name, command,
                  log=lambda s: print(s, flush=True), pool=cell_pool)
        combined = write_quality(protocol, out, command, path, quick)
    return combined


def _side_by_side(protocol: ProtocolConfig, blocks: list, out: Path, path: Path, command: str, quick: bool,
                  cell_pool: type[CellPool]) -> dict:
    """Every block at once on one Ray cluster, each in a thread of this driver, sharing its CPUs
    by block order (``ray_cells.Slots``): an earlier block's runs go first, a later block's
    fill the CPUs it leaves idle. A block with ``lrs_from`` another of these starts when that
    one has ended. Each block's lines are prefixed with its name, and after each run a
    ``[protocol]`` line gives the runs done and left of all blocks with the estimate; the
    combined report is rewritten as each block ends. A failed block stops the others (each run
    resumes from its last committed round) and its error is raised."""
    slots = Slots(cell_pool.cluster_cpus())
    names = {b.name for b in blocks}
    overall = Progress(sum(block_runs(protocol, b.name, out, quick) for b in blocks),
                       lambda s: print(f"[protocol] {s}", flush=True))
    ended = {b.name: threading.Event() for b in blocks}
    errors: list[BaseException] = []
    report_lock = threading.Lock()
    for i, block in enumerate(blocks):
        if block.lrs_from not in names:  # a block waiting on another does not hold later ones back
            slots.want(i)

    def one(i: int, block) -> None:
        try:
            if block.lrs_from in names:
                ended[block.lrs_from].wait()
                if errors:
                    return
            run_bench(block_config(protocol, block.name, out, quick), out / block.name, command,
                      log=lambda s: print(f"[{block.name}] {s}", flush=True),
                      pool=functools.partial(cell_pool, slots=slots, priority=i), overall=overall)
            with report_lock:
                write_quality(protocol, out, command, path, quick)
        except BaseException as err:  # SystemExit too (a block's config): the protocol stops
            if not isinstance(err, Stopped):
                errors.append(err)
            slots.stop()
        finally:
            slots.done_wanting(i)
            ended[block.name].set()

    threads = [threading.Thread(target=one, args=(i, b), name=f"block-{b.name}", daemon=True)
               for i, b in enumerate(blocks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return write_quality(protocol, out, command, path, quick)


def pool_source(block, out: Path) -> dict:
    """The report a ``pool_with`` block pools with: a block of a committed quality.json, or of this
    protocol's results under ``out``."""
    spec = block.pool_with
    if spec.report is None:
        path = out / spec.block / "results.json"
        if not path.is_file():
            raise SystemExit(f"fedkrso-bench: block {block.name} pools with block {spec.block}, which has not run")
        return json.loads(path.read_text())
    path = Path(spec.report)
    if not path.is_file():
        raise SystemExit(f"fedkrso-bench: block {block.name} pools with {spec.report}, which is missing")
    blocks = json.loads(path.read_text()).get("blocks", {})
    if spec.block not in blocks:
        raise SystemExit(f"fedkrso-bench: block {block.name} pools with block {spec.block} of {spec.report}, "
                         f"which has only {sorted(blocks)}")
    return blocks[spec.block]["report"]


def write_quality(protocol: ProtocolConfig, out: Path, command: str, path: Path, quick: bool = False) -> dict:
    """``quality.json`` and ``QUALITY.md`` from every block's results on disk."""
    combined = {"name": protocol.name, "description": protocol.description, "command": command,
                "protocol": str(path), "blocks": {}}
    for block in protocol.blocks:
        results = out / block.name / "results.json"
        if not results.is_file():
            continue
        report = json.loads(results.read_text())
        # the verdicts as the current rules read the stored intervals (a block finished before a
        # rule changed is rendered like one finished after)
        report["answers"] = answers(report["results"], report["differences"], report["metric"])
        # the cells on disk; where they are gone (results.json restored from a committed
        # quality.json on another machine), the runs the report holds
        held = (sum(len(e["seeds"]) for e in report["results"].values())
                + sum(len(s["seeds"]) for s in report["sweep"]))
        # and the runs a sweep added past an edge of its grid (extend_edges)
        listed = {m.tag: m.lrs or [] for m in block_config(protocol, block.name, out, quick, strict=False).methods}
        beyond = sum(len(s["seeds"]) for s in report["sweep"] if s["lr"] not in listed.get(s["method"], []))
        combined["blocks"][block.name] = {
            "purpose": block.purpose, "report": report,
            "cells_done": max(held, len(list((out / block.name / "cells").glob("*/cell.json")))),
            "cells_planned": block_runs(protocol, block.name, out, quick) + beyond}
        spec = block.pool_with
        if spec and (spec.report or (out / spec.block / "results.json").is_file()):
            try:
                pooled = pool(report, pool_source(block, out), spec.methods)
            except ValueError as err:
                raise SystemExit(f"fedkrso-bench: block {block.name}: {err}") from None
            combined["blocks"][block.name]["pooled"] = {"report": spec.report or "this protocol",
                                                        "block": spec.block, **pooled}
    from ..server.state import atomic_write  # here: this module stays light

    for name, text in (("quality.json", json.dumps(combined, indent=2) + "\n"),
                       ("QUALITY.md", render_quality(combined))):
        atomic_write(out / name, text.encode())
    return combined


def render_quality(combined: dict) -> str:
    lines = [f"# {combined['name']}", "", combined.get("description", "").strip(), "",
             f"Command: `{combined['command']}`", ""]
    for name, block in combined["blocks"].items():
        report = block["report"]
        cells = [s for e in report["results"].values() for s in e["seeds"].values()]
        seconds = [c["seconds"] for c in cells if c.get("seconds")]
        timing = f"mean {sum(seconds) / len(seconds):.0f} s per reported run" if seconds else "no run finished yet"
        lines += [f"## {name}", "", block["purpose"].strip(), "",
                  f"{report['data_source']}, {report['clients']} clients, "
                  + ("IID" if report["alpha"] is None else f"Dirichlet {report['alpha']}")
                  + f", {report['clients_per_round']} per round, {report['rounds']} rounds, seeds "
                  f"{report['seeds']}, metric {report['metric']}; runs finished {block['cells_done']} of "
                  f"{block['cells_planned']}; {timing}", ""]
        lines += render_table(report) + render_answers(report)
        pooled = block.get("pooled")
        if pooled:
            seeds = "; ".join(f"{tag} {_ranges(s)}" for tag, s in pooled["pooled_seeds"].items())
            lines += ["", f"### {name} with the seeds of {pooled['block']} ({pooled['report']})", "",
                      f"The same settings and lrs, seeds pooled (per method: {seeds}); differences paired "
                      "over the seeds both methods ran.", ""]
            lines += render_table(pooled) + render_answers(pooled)
        lines += ["", f"![{name}]({name}/{report['plot']})", ""]
    return "\n".join(lines)


def _ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 3, 5] as "0-3, 5"."""
    parts, run = [], []
    for s in sorted(seeds):
        if run and s != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(s)
    parts += [run] if run else []
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in parts)
