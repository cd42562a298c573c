"""A bench cell (bench/cells.py) that a stop cuts off mid-run resumes from its last committed
round, and ends with the rounds of an uninterrupted run, bit for bit; a cell whose settings
changed starts again."""

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
from fedkrso.bench.cells import Cell, run_cell
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

    resumed = run_cell(cfg, cell, data, out, 2)
    assert "run_resumed" in (workdir / "sim.log").read_text()
    assert resumed["sittings"] == 2 and [r["round"] for r in resumed["rows"]] == list(range(ROUNDS))
    assert fingerprints(resumed) == fingerprints(whole)
    assert [r["eval_loss"] for r in resumed["rows"]] == [r["eval_loss"] for r in whole["rows"]]
    sittings = json.loads((workdir / "sittings.json").read_text())
    assert len(sittings) == 2 and all(s["end"] >= s["start"] for s in sittings)
    assert resumed["seconds"] == pytest.approx(sum(s["end"] - s["start"] for s in sittings))
    assert run_cell(cfg, cell, data, out, 2) == resumed  # finished: loaded, not run

    # the same cut-off cell asked for with another setting: started again, not resumed
    other = cfg.model_copy(update={"batch_size": 4})
    again = run_cell(other, cell, data, tmp_path / "cut-other", 2)
    assert again["sittings"] == 1 and len(again["rows"]) == ROUNDS
    assert "run_resumed" not in (tmp_path / "cut-other" / "cells" / cell.tag / "sim.log").read_text()
