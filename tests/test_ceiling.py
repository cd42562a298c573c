"""The centralized ceiling of a protocol block (bench/ceiling.py) on a tiny model: the union of
the block's shards in one AdamW run, stopped on the validation split, lr chosen there, the
eval figure read at the best validation step, resumable cell by cell."""

from __future__ import annotations

import json

import pytest
import yaml

from fedkrso.bench.ceiling import choose_lr, main
from fedkrso.common.data import load_split

from test_bench import bench_config



def test_a_tie_of_best_validation_goes_to_the_better_last_readings_then_the_first_tried():
    def run(best: float, *tail: float) -> dict:
        return {"best": {"val": best}, "curve": [{"val": v} for v in tail]}

    # CoLA's seed 0: 2.5e-5 and 5e-5 reached the same best MCC; 2.5e-5 ended higher
    assert choose_lr({5e-5: run(0.34, 0.31, 0.34, 0.33), 2.5e-5: run(0.34, 0.33, 0.34, 0.34),
                      1e-4: run(0.30, 0.30, 0.29, 0.30)}, "mcc") == 2.5e-5
    assert choose_lr({1e-4: run(0.5, 0.5), 3e-3: run(0.6, 0.1)}, "accuracy") == 3e-3  # the best first
    assert choose_lr({1e-4: run(0.5, 0.5), 3e-3: run(0.5, 0.5)}, "accuracy") == 1e-4  # then the first tried
    assert choose_lr({1e-4: run(2.0, 2.0, 2.1), 3e-3: run(2.0, 2.0, 1.9)}, "loss") == 3e-3  # lower is better


@pytest.mark.slow
def test_the_ceiling_trains_the_union_stops_on_validation_and_resumes(tmp_path, tiny_bert):
    base = bench_config(tmp_path, tiny_bert, seeds=[0], clients=3, methods=[
        {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2},
        {"name": "fedavg", "steps": 2, "lrs": [1e-4, 3e-3]}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": base, "blocks": [{"name": "iid"}]}))
    out = tmp_path / "out"
    args = ["--protocol", str(path), "--out", str(out), "--eval-every", "3", "--patience", "2", "--seeds", "0", "1",
            "--max-epochs", "4"]
    main(args)
    s = json.loads((out / "iid" / "ceiling" / "ceiling.json").read_text())
    assert s["metric"] == "accuracy" and [x["lr"] for x in s["sweep"]] == [1e-4, 3e-3]
    best = max(x["val"] for x in s["sweep"])
    assert s["lr"] in [x["lr"] for x in s["sweep"] if x["val"] == best] and [x["chosen"] for x in s["sweep"]].count(True) == 1
    rows = sum(len(load_split(p)) for p in (out / "iid" / "data" / "seed0").glob("shard*"))
    cells = sorted((out / "iid" / "ceiling" / "cells").glob("*.json"))
    assert {c.name for c in cells} >= {f"fedavg-lr{s['lr']:g}-s0.json", f"fedavg-lr{s['lr']:g}-s1.json"}
    for seed, r in s["seeds"].items():
        curve = r["curve"]
        best = max(curve, key=lambda p: p["val"])  # the first of the best: a tie does not move it
        assert r["best"]["step"] == best["step"] and r["best"]["eval"] == best["eval"]
        assert r["last"] == curve[-1] and all(0 <= p["eval"] <= 1 for p in curve)
        steps = [p["step"] for p in curve]
        assert steps == sorted(steps) and steps[0] == 3
        if r["stopped"] == "plateau":  # patience 2: exactly two evaluations after the best
            assert curve.index(best) == len(curve) - 3
    cell = json.loads(cells[0].read_text())
    assert cell["train_rows"] == rows  # every client's rows, in one place
    assert s["at_best_val"]["n"] == 2
    # resumed: nothing runs again; other settings run again
    mtimes = {c: c.stat().st_mtime_ns for c in cells}
    main(args)
    assert {c: c.stat().st_mtime_ns for c in cells} == mtimes
    main([*args[:-2], "--max-epochs", "1"])
    assert all(c.stat().st_mtime_ns != mtimes[c] for c in cells if c.name.endswith(f"lr{s['lr']:g}-s0.json"))


@pytest.mark.slow
def test_a_ceiling_run_cut_off_mid_way_resumes_from_its_last_evaluation(tmp_path, tiny_bert):
    """SIGKILLed after two evaluations, the run goes on from its saved point: the curve of an
    uninterrupted run, figure for figure."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import wait_until
    from fedkrso.bench.launch import child_env

    base = bench_config(tmp_path, tiny_bert, seeds=[0], clients=2, methods=[{"name": "fedavg", "steps": 2,
                                                                             "lrs": [1e-3]}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": base, "blocks": [{"name": "iid"}]}))

    def args(out):
        return ["--protocol", str(path), "--out", str(out), "--eval-every", "2", "--patience", "100",
                "--max-epochs", "8"]

    # both in child processes (the same torch threads): AdamW's first steps turn float noise
    # in near-zero gradients into whole steps, so a run in this process is not the reference
    done = subprocess.run([sys.executable, "-m", "fedkrso.bench.ceiling", *args(tmp_path / "whole")], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    whole = json.loads((tmp_path / "whole" / "iid" / "ceiling" / "cells" / "fedavg-lr0.001-s0.json").read_text())
    assert len(whole["curve"]) >= 4

    out = tmp_path / "cut"
    point = out / "iid" / "ceiling" / "work" / "fedavg-lr0.001-s0" / "resume.safetensors"
    child = subprocess.Popen([sys.executable, "-m", "fedkrso.bench.ceiling", *args(out)], env=child_env(),
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: child.poll() is not None or (point.is_file() and _steps(point) >= 4), 300,
                   "two evaluations")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    cell = out / "iid" / "ceiling" / "cells" / "fedavg-lr0.001-s0.json"
    assert point.is_file() and not cell.exists(), "the run ended before it was cut off"
    again = subprocess.run([sys.executable, "-m", "fedkrso.bench.ceiling", *args(out)], env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed at step" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    resumed = json.loads(cell.read_text())
    figures = ("step", "epoch", "train_loss", "val", "eval")
    assert [[p[k] for k in figures] for p in resumed["curve"]] == [[p[k] for k in figures] for p in whole["curve"]]
    assert resumed["best"]["step"] == whole["best"]["step"] and not point.exists()


def _steps(point) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(point), "pt") as f:
            return json.loads(f.metadata()["point"])["step"]
    except Exception:  # not there yet
        return 0
