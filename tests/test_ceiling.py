"""The centralized ceiling of a protocol block (bench/ceiling.py) on a tiny model: the union of
the block's shards in one AdamW run, stopped on the validation split, lr chosen there, the
eval figure read at the best validation step, resumable cell by cell."""

from __future__ import annotations

import json

import pytest
import yaml

from fedkrso.bench.ceiling import main
from fedkrso.common.data import load_split

from test_bench import bench_config

pytestmark = pytest.mark.slow


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
    best_lr = max(s["sweep"], key=lambda x: x["val"])["lr"]
    assert s["lr"] == best_lr and [x["chosen"] for x in s["sweep"]].count(True) == 1
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
