"""Each method's gap to the centralized ceiling (bench/gaps.py): paired per seed, read from a
bench's results.json and a ceiling.json as the protocol writes them."""

from __future__ import annotations

import json
import os

import pytest

from fedkrso.bench.gaps import main


def test_gaps_are_paired_per_seed_against_the_named_ceiling(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sst2-dirichlet").mkdir(parents=True)
    (out / "sizing" / "ceiling").mkdir(parents=True)
    seeds = {s: {"final": f} for s, f in (("0", 0.80), ("1", 0.82), ("2", 0.84))}
    (out / "sst2-dirichlet" / "results.json").write_text(json.dumps(
        {"metric": "accuracy", "results": {"fedkrso": {"lr": 2e-3, "seeds": seeds}}}))
    ceiling = {s: {"best": {"eval": e}} for s, e in (("0", 0.86), ("1", 0.86), ("2", 0.88))}
    (out / "sizing" / "ceiling" / "ceiling.json").write_text(json.dumps({"seeds": ceiling}))
    (out / "sizing" / "ceiling" / "cells").mkdir()
    (out / "sizing" / "sizing.json").write_text(json.dumps({"budget": None}))
    (out / "budget.json").write_text(json.dumps({"budget": {"rounds": 24}}))
    cell = out / "sst2-dirichlet" / "cells" / "fedkrso-lr0.002-s0-val-r24"
    cell.mkdir(parents=True)
    rows = [{"round": r, "eval_accuracy": (0.7, 0.8)[r], "eval_loss": 0.5, "train_loss": 0.6, "round_seconds": 9.0,
             "uplink_payload_bytes_per_client": 1000, "per_client": {"shard0": {}}, "clients": ["shard0"]}
            for r in range(2)]
    cell.joinpath("cell.json").write_text(json.dumps({"method": "fedkrso", "lr": 2e-3, "seed": 0, "split": "val",
                                                      "rounds": 2, "seconds": 20.0, "sittings": 1, "rows": rows}))
    cell.joinpath("sittings.json").write_text(json.dumps([{"start": 100.0, "end": 110.0}, {"start": 150.0, "end": 160.0}]))
    other = out / "sst2-dirichlet" / "cells" / "fedavg-lr0.0001-s0-val-r24"  # beside the first one's second sitting
    other.mkdir()
    other.joinpath("cell.json").write_text(json.dumps({"seconds": 30.0, "rows": rows}))
    other.joinpath("sittings.json").write_text(json.dumps([{"start": 155.0, "end": 185.0}]))
    replayed = out / "sst2-dirichlet" / "cells" / "fedavg-lr0.0001-s0-eval-r24"  # made from its sweep twin
    replayed.mkdir()
    replayed.joinpath("cell.json").write_text(json.dumps({"seconds": 30.0, "rows": rows, "replay_seconds": 2.5,
                                                          "replayed_from": other.name}))
    (out / "sizing" / "cells" / "fedavg-s25-lr0.0001-s0-val-r20").mkdir(parents=True)  # another block, later
    (out / "sizing" / "cells" / "fedavg-s25-lr0.0001-s0-val-r20" / "cell.json").write_text(
        json.dumps({"seconds": 40.0, "rows": rows}))
    (out / "sizing" / "cells" / "fedavg-s25-lr0.0001-s0-val-r20" / "sittings.json").write_text(
        json.dumps([{"start": 180.0, "end": 220.0}]))
    older = out / "sst2-dirichlet" / "cells" / "fedavg-lr0.0002-s0-val-r24"  # from before sittings were kept
    older.mkdir()
    older.joinpath("cell.json").write_text(json.dumps({"seconds": 5.0, "rows": rows}))
    os.utime(older / "cell.json", (113.0, 113.0))  # finished at 113: ran from 108, partly beside the first run
    (out / "sst2-dirichlet" / "cells" / "fedavg-unfinished").mkdir()  # no cell.json: still running
    (out / "sst2-dirichlet" / "cells" / "fedavg-unfinished" / "sittings.json").write_text(
        json.dumps([{"start": 0.0, "end": 90.0}, {"start": 95.0, "end": None}]))
    (out / "sizing" / "ceiling" / "cells" / "fedavg-lr0.0001-s0.json").write_text(json.dumps({"curve": [1], "seconds": 70.0}))
    main(["--out", str(out), "--blocks", "sst2-dirichlet:sizing", "cola-iid", "--raw", str(tmp_path / "raw.json")])
    printed = capsys.readouterr().out
    assert "cola-iid: not yet" in printed
    assert ("cost so far: federated runs 4 (0.0 core-hours, 0.0 hours of wall time), "
            "ceiling runs 1 (0.0 core-hours)") in printed
    [row] = json.loads((out / "gaps.json").read_text())["sst2-dirichlet"]["methods"]
    gap = row["gap"]
    assert gap["diffs"] == pytest.approx([-0.06, -0.04, -0.04]) and gap["mean"] == pytest.approx(-0.14 / 3)
    assert gap["low"] < gap["mean"] < gap["high"] < 0  # the three seeds all below: the interval too
    assert row["ceiling"]["mean"] == pytest.approx(0.8666666, abs=1e-6)
    assert "| fedkrso | 0.002 | 82.00 ± 2.00 | 86.67 ± 1.15 | -4.67 [" in printed
    # --raw: every finished figure under --out in one file, with the gaps beside their block
    doc = json.loads((tmp_path / "raw.json").read_text())
    assert doc["budget"] == {"budget": {"rounds": 24}}
    assert set(doc["blocks"]) == {"sizing", "sst2-dirichlet"}
    assert doc["blocks"]["sizing"]["ceiling_cells"] == {"fedavg-lr0.0001-s0": {"curve": [1], "seconds": 70.0}}
    assert doc["blocks"]["sizing"]["sizing"] == {"budget": None} and "results" not in doc["blocks"]["sizing"]
    assert doc["blocks"]["sst2-dirichlet"]["gaps"]["methods"][0]["gap"] == gap
    # what it cost: the replayed run its replay only, the unfinished run nothing; side by side counts once
    assert doc["blocks"]["sst2-dirichlet"]["cost"] == {
        "federated_runs": 3, "federated_run_seconds": 55.0, "replayed_runs": 1, "replay_seconds": 2.5,
        "federated_wall_seconds": 13.0 + 35.0, "ceiling_runs": 0, "ceiling_run_seconds": 0}
    assert doc["cost"] == {"federated_runs": 4, "federated_run_seconds": 95.0, "replayed_runs": 1,
                           "replay_seconds": 2.5, "federated_wall_seconds": 13.0 + 70.0,
                           "ceiling_runs": 1, "ceiling_run_seconds": 70.0}
    assert doc["blocks"]["sst2-dirichlet"]["runs"]["fedkrso-lr0.002-s0-val-r24"] == {
        "method": "fedkrso", "lr": 2e-3, "seed": 0, "split": "val", "rounds": 2, "seconds": 20.0, "sittings": 1,
        "per_round": {"round": [0, 1], "eval_accuracy": [0.7, 0.8], "eval_loss": [0.5, 0.5], "train_loss": [0.6, 0.6],
                      "uplink_payload_bytes_per_client": [1000, 1000], "round_seconds": [9.0, 9.0]},
        "sitting_spans": [[100.0, 110.0], [150.0, 160.0]]}  # every figure of a round but who took part: restore.py
    assert set(doc["blocks"]["sst2-dirichlet"]["runs"]) == {"fedkrso-lr0.002-s0-val-r24", other.name, replayed.name,
                                                          older.name}
    assert set(doc["blocks"]["sizing"]["runs"]) == {"fedavg-s25-lr0.0001-s0-val-r20"}


def test_tables_print_a_blocks_ceiling_seeds_and_finished_runs_from_its_files(tmp_path, capsys):
    """``--tables``: a page's figures while a block is under way, from the files the protocol
    writes: the ceiling's runs seed by seed (the source block's, named) and every finished run
    round by round in the block's metric, with its last-3 mean and wall time."""
    out = tmp_path / "out"
    (out / "sizing" / "ceiling").mkdir(parents=True)
    run = {"best": {"val": 0.9, "step": 1100, "epoch": 2.21, "eval": 0.88}, "last": {"eval": 0.874, "step": 1600},
           "stopped": "plateau", "seconds": 1500.0}
    (out / "sizing" / "ceiling" / "ceiling.json").write_text(json.dumps(
        {"metric": "mcc", "lr": 1e-4, "seeds": {"10": run, "2": run}, "at_best_val": {"mean": 0.88, "std": 0.0, "n": 2},
         "at_last": {"mean": 0.874, "std": 0.0, "n": 2}}))
    for tag, figures, extra in (("fedavg-lr5e-05-s0-val-r3", (0.5, 0.6, 0.7, 0.8), {"seconds": 600.0, "sittings": 2}),
                                ("fedavg-lr5e-05-s0-eval-r3", (0.4, 0.5), {"seconds": 1.0, "replay_seconds": 1.0, "replayed_from": "x"})):
        (out / "b" / "cells" / tag).mkdir(parents=True)
        rows = [{"round": r, "eval_mcc": f, "eval_accuracy": 0.99} for r, f in enumerate(figures)]
        (out / "b" / "cells" / tag / "cell.json").write_text(json.dumps({"rows": rows, **extra}))
    (out / "b" / "cells" / "running").mkdir()  # no cell.json: not in the table
    main(["--out", str(out), "--blocks", "b:sizing", "--tables"])
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "ceiling (sizing's) at lr 0.0001 (mcc x 100; at_best_val 88.00 ± 0.00, at_last 87.40 ± 0.00):" in lines
    seeds = [line for line in lines if line.startswith(("| 2 |", "| 10 |"))]
    assert seeds == ["| 2 | 90.00 | 1,100 (2.2) | 88.00 | 87.40 (1,600) | plateau | 25 |",
                     "| 10 | 90.00 | 1,100 (2.2) | 88.00 | 87.40 (1,600) | plateau | 25 |"]  # by seed number
    assert "| run | 1 | 2 | 3 | 4 | last 3 | minutes (sittings) |" in lines
    assert "| fedavg-lr5e-05-s0-val-r3 | 50.0 | 60.0 | 70.0 | 80.0 | 70.00 | 10 (2) |" in lines
    assert "| fedavg-lr5e-05-s0-eval-r3 | 40.0 | 50.0 |  |  | 45.00 | replayed from x |" in lines
    assert "running" not in printed
