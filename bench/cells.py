"""One result cell of the bench: one method at one learning rate and seed, trained for a number
of rounds and evaluated on one split, run once and kept.

A cell's result (the metrics rows, its wall time and peak memory) is written atomically to
``<out>/cells/<tag>/cell.json`` when the run ends; a bench started again loads finished cells
instead of running them, so a long protocol can be stopped and resumed over several sittings.
A finished cell is reused only when its round.yaml is exactly the one the bench would write
now (any changed setting runs it again). A simulated cell cut off mid-run (a stopped sitting)
resumes from its last committed round (``fedkrso-sim --resume``: the same rounds, bit for bit,
as an uninterrupted run; tests/test_cells.py); a cell of client processes starts again. The
cell's ``seconds`` are the wall time of its sittings, each up to its last committed round
(work a stop threw away is not counted), ``sittings`` says how many there were and
``last_sitting_seconds`` how long the last one was.

With ``reuse_sweep_runs`` (and ``sweep_rounds == rounds``), a sweep cell of a reported seed
keeps its run state, and a reported cell whose sweep twin finished is made from it
(``replay.py``: the same rounds scored on the reported split) instead of being run.

Runs go through ``fedkrso-sim`` (every client in one process, the default) or a real server
and one client process per shard (``runner: processes``, socket bytes measured).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..common.config import parse_config
from .config import BenchConfig, MethodSpec
from .demo import new_rows
from .launch import Cluster, start, wait_or_kill


@dataclass(frozen=True)
class Cell:
    """What a cell runs: ``split`` is ``val`` (the sweep) or ``eval`` (the reported runs)."""

    spec: MethodSpec
    lr: float
    seed: int
    rounds: int
    split: str

    @property
    def tag(self) -> str:
        return f"{self.spec.tag}-lr{self.lr:g}-s{self.seed}-{self.split}-r{self.rounds}".replace("+", "plus")


def method_section(spec: MethodSpec, lr: float | None) -> dict:
    section = {"name": spec.name, **spec.knobs()}
    if lr is not None:
        section["lr"] = lr
    return section


def round_yaml(cfg: BenchConfig, cell: Cell, data: Path, out: Path, num_labels: int) -> dict:
    rc = {
        "run": {"name": cell.tag, "seed": cell.seed, "output_dir": str(out)},
        "model": {"name": cfg.model.name, "task": cfg.model.task, "num_labels": num_labels,
                  "max_length": cfg.model.max_length, "device": cfg.model.device, "dtype": cfg.model.dtype},
        "method": method_section(cell.spec, cell.lr),
        "rounds": {"total": cell.rounds, "clients_per_round": cfg.clients_per_round,
                   "min_clients": cfg.clients_per_round, "deadline_s": cfg.deadline_s, "start_timeout_s": 900.0},
        "training": {"batch_size": cfg.batch_size, "optimizer": dict(cfg.optimizer), "weighting": cfg.weighting},
        "eval": {"data": str(data / cell.split), "batch_size": cfg.eval_batch_size,
                 "client_every": cfg.client_eval_every},
        "server": {"listen": "127.0.0.1:0"},
    }
    if cfg.instruction is not None:
        rc["instruction"] = dict(cfg.instruction)
    if cfg.privacy:
        rc["privacy"] = dict(cfg.privacy)
    parse_config(rc, "generated round.yaml")  # fail here, not in a child process
    return rc


def run_cell(cfg: BenchConfig, cell: Cell, data: Path, out: Path, num_labels: int) -> dict:
    """The cell's result, from ``<out>/cells/<tag>/cell.json`` when it finished before."""
    workdir = out / "cells" / cell.tag
    done = workdir / "cell.json"
    config = workdir / "round.yaml"
    wanted = round_yaml(cfg, cell, data, workdir, num_labels)
    if _finished(workdir, wanted):
        return json.loads(done.read_text())
    twin = _sweep_twin(cfg, cell, out)
    if twin is not None:
        return _replayed(cell, twin, workdir, wanted)
    sittings = _resumable(cfg, workdir, wanted)
    if sittings is None:
        if workdir.exists():
            shutil.rmtree(workdir)  # run with other settings, or nothing committed: start it again
        workdir.mkdir(parents=True)
        config.write_text(yaml.safe_dump(wanted, sort_keys=False))
        sittings = []
    sittings.append({"start": time.time(), "end": None})
    save_json(workdir / "sittings.json", sittings)
    if cfg.runner == "sim":
        _simulate(cfg, config, data, workdir, resume=len(sittings) > 1)
    else:
        _processes(cfg, config, data, workdir)
    sittings[-1]["end"] = time.time()
    save_json(workdir / "sittings.json", sittings)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for bulky in ("final", "state"):  # a bench keeps figures, not hundreds of model copies
        if bulky == "state" and _keeps_state(cfg, cell):
            continue
        shutil.rmtree(workdir / bulky, ignore_errors=True)
    result = {"tag": cell.tag, "method": cell.spec.tag, "base_method": cell.spec.name, "lr": cell.lr,
              "seed": cell.seed, "rounds": cell.rounds, "split": cell.split, "runner": cfg.runner,
              "seconds": sum(t["end"] - t["start"] for t in sittings), "sittings": len(sittings),
              "last_sitting_seconds": sittings[-1]["end"] - sittings[-1]["start"],
              "peak_rss_bytes": max((r.get("client_peak_rss_bytes") or 0 for r in rows), default=0),
              "rows": rows}
    save_json(done, result)
    return result


def kept_rounds(cfg: BenchConfig, cell: Cell, data: Path, out: Path, num_labels: int) -> int:
    """How many of the cell's rounds ``run_cell`` called now keeps from before: every round of a
    finished cell it loads, the committed rounds of a cut-off one it resumes, none of one it
    starts again (other settings) or makes from its sweep twin (``Progress`` shows the others)."""
    workdir = out / "cells" / cell.tag
    wanted = round_yaml(cfg, cell, data, workdir, num_labels)
    if _finished(workdir, wanted) or _resumable(cfg, workdir, wanted) is not None:
        return len(new_rows(workdir / "metrics.jsonl", 0)[0])
    return 0


def _finished(workdir: Path, wanted: dict) -> bool:
    """The cell finished before with the settings wanted now (its cell.json is its result)."""
    try:
        return (workdir / "cell.json").is_file() and yaml.safe_load((workdir / "round.yaml").read_text()) == wanted
    except (OSError, yaml.YAMLError):
        return False


def _keeps_state(cfg: BenchConfig, cell: Cell) -> bool:
    """A sweep cell whose run a reported cell may be made from (``reuse_sweep_runs``)."""
    return (cfg.reuse_sweep_runs and cell.split == "val" and cell.rounds == cfg.rounds
            and cell.seed in cfg.seeds)


def _sweep_twin(cfg: BenchConfig, cell: Cell, out: Path) -> Path | None:
    """The finished sweep cell (its state kept) a reported cell can be made from, if any."""
    if not cfg.reuse_sweep_runs or cell.split != "eval":
        return None
    twin = out / "cells" / Cell(cell.spec, cell.lr, cell.seed, cell.rounds, "val").tag
    if (twin / "cell.json").is_file() and (twin / "state" / "manifest.json").is_file():
        return twin
    return None


def _replayed(cell: Cell, twin: Path, workdir: Path, wanted: dict) -> dict:
    """The reported cell made from its sweep twin's run (module docstring)."""
    from .replay import replay_rows

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config = workdir / "round.yaml"
    config.write_text(yaml.safe_dump(wanted, sort_keys=False))
    swept = json.loads((twin / "cell.json").read_text())
    started = time.time()
    rows = replay_rows(twin, swept["rows"], config)
    with (workdir / "metrics.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    result = {**swept, "tag": cell.tag, "split": cell.split, "rows": rows, "replayed_from": twin.name,
              "replay_seconds": time.time() - started}
    save_json(workdir / "cell.json", result)
    shutil.rmtree(twin / "state", ignore_errors=True)  # used: a bench keeps figures
    return result


def release_state(out: Path, cell: Cell) -> None:
    """Drop the run state a sweep cell kept for a reported run that will not be made from it
    (its lr was not chosen)."""
    shutil.rmtree(out / "cells" / cell.tag / "state", ignore_errors=True)


def save_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (``server.state.write_json``), its folder made
    where missing: every file the bench, the ceiling and restore keep goes through here."""
    from ..server.state import write_json  # imported here: this module stays light

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)


def _resumable(cfg: BenchConfig, workdir: Path, wanted: dict) -> list[dict] | None:
    """The earlier sittings of a simulated cell cut off after committing a round with the
    settings wanted now, the last one closed at its last committed round; None: start again."""
    metrics = workdir / "metrics.jsonl"
    try:
        if (cfg.runner != "sim" or yaml.safe_load((workdir / "round.yaml").read_text()) != wanted
                or not (workdir / "state" / "manifest.json").is_file() or not metrics.read_text().strip()):
            return None
        sittings = json.loads((workdir / "sittings.json").read_text())
    except (OSError, ValueError):
        return None
    if not sittings or sittings[-1].get("end") is not None:
        return None
    sittings[-1]["end"] = max(sittings[-1]["start"], metrics.stat().st_mtime)
    return sittings


def _simulate(cfg: BenchConfig, config: Path, data: Path, workdir: Path, resume: bool = False) -> None:
    proc = start("fedkrso.sim.main", ["--config", str(config), "--data-root", str(data), "--threads", str(cfg.threads),
                                      "--log-json", *(["--resume"] if resume else [])],
                 workdir / "sim.log", append=resume)
    code = wait_or_kill(proc, cfg.run_timeout_s)
    if code != 0:
        raise RuntimeError(f"fedkrso-sim exited {code}:\n{(workdir / 'sim.log').read_text()[-3000:]}")


def _processes(cfg: BenchConfig, config: Path, data: Path, workdir: Path) -> None:
    cluster = Cluster(workdir)
    try:
        cluster.start_server(config)
        for i in range(cfg.clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}", args=["--poll-seconds", str(cfg.poll_seconds)])
        code = cluster.wait(cfg.run_timeout_s)
        if code != 0:
            raise RuntimeError(f"server exited {code}:\n{cluster.server.text()[-3000:]}")
        # Clients that sat out the last round may still be in a long-poll or retrying a
        # server that is gone; the metrics are complete, so give them a moment, then stop.
        give_up = time.monotonic() + 10.0
        for c in cluster.clients:
            try:
                c.wait(max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:  # a lingering client does not void the metrics
                pass
    finally:
        cluster.stop()
