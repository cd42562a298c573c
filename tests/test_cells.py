"""A bench cell (bench/cells.py) that a stop cuts off mid-run resumes from its last committed
round, and ends with the rounds of an uninterrupted run, bit for bit; a cell whose settings
changed starts again. With ``reuse_sweep_runs`` a reported cell is its sweep twin's run
scored on the reported split (bench/replay.py): the figures of a run made on that split."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import metric_rows, wait_until
from fedkrso.bench.cells import Cell, kept_rounds, run_cell
from fedkrso.bench.config import BenchConfig
from fedkrso.bench.launch import child_env
from fedkrso.bench.runner import partition
from test_bench import bench_config

pytestmark = pytest.mark.slow
ROUNDS = 6
CHILD = """
import sys, yaml
from pathlib import Path
from fedkrso.bench.cells import Cell, run_cell
from fedkrso.bench.config import BenchConfig
cfg = BenchConfig.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
run_cell(cfg, Cell(cfg.methods[0], 1e-3, 0, int(sys.argv[3]), "val"), Path(sys.argv[2]), Path(sys.argv[4]), 2)
"""


def fingerprints(result: dict) -> list[str]:
    return [r["state_fingerprint"] for r in result["rows"]]


def test_a_cell_cut_off_mid_run_resumes_from_its_last_committed_round(tmp_path, tiny_bert):
    raw = bench_config(tmp_path, tiny_bert, seeds=[0], methods=[{"name": "fedavg", "steps": 2, "lrs": [1e-3]}])
    cfg = BenchConfig.model_validate(raw)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(raw))
    data = tmp_path / "data"
    partition(cfg, 0, data)
    cell = Cell(cfg.methods[0], 1e-3, 0, ROUNDS, "val")
    whole = run_cell(cfg, cell, data, tmp_path / "whole", 2)
    assert whole["sittings"] == 1 and len(whole["rows"]) == ROUNDS

    out = tmp_path / "cut"
    workdir = out / "cells" / cell.tag
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "bench.yaml"), str(data), str(ROUNDS),
                              str(out)], env=child_env(), start_new_session=True)
    try:
        wait_until(lambda: len(metric_rows(workdir)) >= 2 or child.poll() is not None, 300, "two committed rounds")
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the bench and its fedkrso-sim: a stopped sitting
        child.wait()
    committed = len(metric_rows(workdir))
    assert 2 <= committed < ROUNDS, "the cell finished before the stop"
    assert not (workdir / "cell.json").exists()
    shutil.copytree(out, tmp_path / "cut-other")
    # what a bench's progress skips: the committed rounds the resumed run keeps; none of a run
    # another setting starts again
    other = cfg.model_copy(update={"batch_size": 4})
    assert kept_rounds(cfg, cell, data, out, 2) == committed
    assert kept_rounds(other, cell, data, out, 2) == 0

    resumed = run_cell(cfg, cell, data, out, 2)
    assert "run_resumed" in (workdir / "sim.log").read_text()
    assert resumed["sittings"] == 2 and [r["round"] for r in resumed["rows"]] == list(range(ROUNDS))
    assert fingerprints(resumed) == fingerprints(whole)
    assert [r["eval_loss"] for r in resumed["rows"]] == [r["eval_loss"] for r in whole["rows"]]
    sittings = json.loads((workdir / "sittings.json").read_text())
    assert len(sittings) == 2 and all(s["end"] >= s["start"] for s in sittings)
    assert resumed["seconds"] == pytest.approx(sum(s["end"] - s["start"] for s in sittings))
    assert resumed["last_sitting_seconds"] == pytest.approx(sittings[-1]["end"] - sittings[-1]["start"])
    assert run_cell(cfg, cell, data, out, 2) == resumed  # finished: loaded, not run
    assert kept_rounds(cfg, cell, data, out, 2) == ROUNDS and kept_rounds(other, cell, data, out, 2) == 0

    # the same cut-off cell asked for with another setting: started again, not resumed
    again = run_cell(other, cell, data, tmp_path / "cut-other", 2)
    assert again["sittings"] == 1 and len(again["rows"]) == ROUNDS
    assert "run_resumed" not in (tmp_path / "cut-other" / "cells" / cell.tag / "sim.log").read_text()


def test_a_reported_cell_made_from_its_sweep_run_has_the_figures_of_a_run_on_the_reported_split(tmp_path, tiny_bert):
    raw = bench_config(tmp_path, tiny_bert, seeds=[0], rounds=3, sweep_rounds=3, methods=[
        {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 2, "lrs": [1e-3]}])
    plain = BenchConfig.model_validate(raw)
    reuse = BenchConfig.model_validate(raw | {"reuse_sweep_runs": True})
    data = tmp_path / "data"
    partition(plain, 0, data)
    spec = plain.methods[0]
    ran = run_cell(plain, Cell(spec, 1e-3, 0, 3, "eval"), data, tmp_path / "plain", 2)

    out = tmp_path / "reuse"
    sweep = run_cell(reuse, Cell(spec, 1e-3, 0, 3, "val"), data, out, 2)
    twin = out / "cells" / Cell(spec, 1e-3, 0, 3, "val").tag
    assert (twin / "state" / "manifest.json").is_file() and not (twin / "final").exists()
    made = run_cell(reuse, Cell(spec, 1e-3, 0, 3, "eval"), data, out, 2)
    assert made["replayed_from"] == twin.name and made["split"] == "eval"
    assert not (out / "cells" / Cell(spec, 1e-3, 0, 3, "eval").tag / "sim.log").exists(), "not run"
    assert fingerprints(made) == fingerprints(ran) == fingerprints(sweep)
    timing = ("seconds", "_rss_bytes")
    for mine, theirs, swept in zip(made["rows"], ran["rows"], sweep["rows"]):
        evals = {k for k in theirs if k.startswith("eval_")}
        assert evals and {k: mine[k] for k in evals} == {k: theirs[k] for k in evals}  # bit for bit
        assert {k: v for k, v in mine.items() if k not in evals} == {k: v for k, v in swept.items() if k not in evals}
        # the run's figures but for framing: an uplink message names the run ("-eval-" is a
        # byte longer than "-val-"), the payload is the same to the byte
        framing = {"uplink_message_bytes"}
        same = {k for k in theirs if k not in evals | framing and not k.endswith(timing)}
        assert {k: mine[k] for k in same} == {k: theirs[k] for k in same}
        clients = theirs["num_clients"]
        assert mine["uplink_message_bytes"] == theirs["uplink_message_bytes"] - clients
    assert [r["eval_loss"] for r in made["rows"]] != [r["eval_loss"] for r in sweep["rows"]]  # another split
    assert run_cell(reuse, Cell(spec, 1e-3, 0, 3, "eval"), data, out, 2) == made  # kept

    with pytest.raises(ValueError, match="reuse_sweep_runs needs sweep_rounds equal to rounds"):
        BenchConfig.model_validate(raw | {"reuse_sweep_runs": True, "sweep_rounds": 2})


def test_a_bench_that_reuses_its_sweep_runs_trains_each_reported_seed_once(tmp_path, tiny_bert):
    """``fedkrso-bench`` with ``reuse_sweep_runs``: two lrs swept on seed 0 at the full budget,
    seeds 0 and 1 reported: seed 0's reported run is the chosen lr's sweep run (no second
    training), seed 1's is run; the state of the unchosen lr's run is dropped."""
    from test_bench import run

    report = run(tmp_path, bench_config(tmp_path, tiny_bert, seeds=[0, 1], rounds=2, sweep_rounds=2,
                                        reuse_sweep_runs=True, methods=[{"name": "fedavg", "steps": 2,
                                                                         "lrs": [1e-3, 1e-4]}]))
    entry = report["results"]["fedavg"]
    lr = entry["lr"]
    cells = tmp_path / "results" / "cells"
    assert entry["seeds"]["0"]["replayed_from"] == f"fedavg-lr{lr:g}-s0-val-r2"
    assert "replayed_from" not in entry["seeds"]["1"] and (cells / f"fedavg-lr{lr:g}-s1-eval-r2" / "sim.log").exists()
    assert not list(cells.glob("*/state")), "the chosen run's state is dropped once used, the other's once passed over"
    assert [s["lr"] for s in report["sweep"]] == [1e-3, 1e-4]
