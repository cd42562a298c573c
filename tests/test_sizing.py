"""Sizing a protocol's budget (bench/sizing.py): FedAvg variants run on the validation split,
the plateau read from each curve, the cheapest settled variant chosen."""

from __future__ import annotations

import json

import pytest
import yaml

from fedkrso.bench.sizing import budget_of, main, plateau, window_mean
from test_bench import bench_config


def test_the_plateau_is_the_first_round_whose_window_mean_gained_less_than_the_tolerance():
    curve = [0.50, 0.70, 0.80, 0.81, 0.80, 0.82, 0.81, 0.80]
    # windows of 2, the last against the one before: +20.5 points at round 4, +5.5 at 5, +0.5 at 6,
    # +1.0 at 7, -0.5 at 8
    assert plateau(curve, 2, 1.0) == 6
    assert plateau(curve, 2, 0.4) == 8  # a window that lost counts as settled
    assert window_mean(curve, 6, 2) == pytest.approx(0.81)
    assert plateau([0.1 * i for i in range(10)], 2, 1.0) is None  # still climbing
    assert plateau([1.0, 0.8, 0.7, 0.69], 1, 2.0, sign=-1) == 4  # a loss: lower is better
    assert plateau([0.5, None, 0.5, 0.5], 1, 1.0) == 4  # an unevaluated round does not settle it


def variant(block, method, steps, rounds, at, value, last):
    return {"block": block, "method": method, "steps": steps, "rounds": rounds, "plateau_round": at,
            "plateau_value": value, "last_window": last, "local_steps_to_plateau": at * steps if at else None}


def test_the_budget_is_the_cheapest_settled_variant_near_the_highest_level_any_reached():
    s10 = variant("sizing", "fedavg-s10", 10, 20, 18, 0.8504, 0.8464)
    s25 = variant("sizing", "fedavg-s25", 25, 20, None, None, 0.8756)  # still climbing
    none = budget_of([s10, s25], 0.3)
    assert none["budget"] is None  # s10 settled 2.5 points below a variant that had not
    assert "sizing/fedavg-s25 reached 87.56" in none["why"] and "had not settled after its 20 rounds" in none["why"]
    assert "sizing/fedavg-s10 at round 18 (85.04) settled more than 0.3 points below it" in none["why"]
    longer = variant("sizing-r30", "fedavg-s25", 25, 30, 26, 0.8790, 0.8792)
    slower = variant("sizing-r30", "fedavg-s50", 50, 30, 20, 0.8800, 0.8801)
    got = budget_of([s10, s25, longer, slower], 0.3)
    assert got["budget"] == {"rounds": 26, "steps": 25, "method": "fedavg-s25", "block": "sizing-r30"}  # 650 < 1000
    assert budget_of([s10], 0.3)["budget"]["rounds"] == 18
    assert budget_of([variant("b", "m", 1, 2, None, None, None)], 0.3)["budget"] is None


@pytest.mark.slow
def test_sizing_runs_each_variant_on_validation_and_picks_the_cheapest_settled(tmp_path, tiny_bert):
    base = bench_config(tmp_path, tiny_bert, seeds=[0], rounds=2, methods=[
        {"name": "fedavg", "label": "fedavg-s4", "steps": 4, "lrs": [1e-3]},
        {"name": "fedavg", "label": "fedavg-s2", "steps": 2, "lrs": [1e-3]}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": base, "blocks": [{"name": "sizing"}]}))
    out = tmp_path / "out"
    main(["--protocol", str(path), "--out", str(out), "--blocks", "sizing", "--window", "1", "--tolerance", "101"])
    a = json.loads((out / "sizing" / "sizing.json").read_text())
    assert a["split"] == "val" and [v["method"] for v in a["variants"]] == ["fedavg-s4", "fedavg-s2"]
    for v in a["variants"]:
        assert len(v["curve"]) == 2 and v["plateau_round"] == 2  # round 2 gained < 101 points on round 1
        assert v["plateau_value"] == v["curve"][1]
    assert a["budget"] == {"rounds": 2, "steps": 2, "method": "fedavg-s2", "block": "sizing"}  # 4 local steps against 8
    cells = sorted((out / "sizing" / "cells").glob("*-val-r2/cell.json"))
    assert len(cells) == 2  # the bench's own cells, on the validation split: resumable
