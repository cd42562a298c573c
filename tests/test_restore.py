"""A protocol's committed raw file (``gaps.py --raw``) brings its finished runs back on another
machine (bench/restore.py): the bench there runs only what the raw file does not hold, and
its report, the gaps' raw file and the cost are the ones the first machine would have written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from fedkrso.bench import gaps, restore
from fedkrso.bench.main import main
from test_bench import bench_config

pytestmark = pytest.mark.slow


def protocol(tmp_path, tiny_bert, steps: int = 2) -> str:
    base = bench_config(tmp_path, tiny_bert, seeds=[0], rounds=2, sweep_rounds=2, reuse_sweep_runs=True,
                        methods=[{"name": "fedavg", "steps": steps, "lrs": [1e-3, 1e-4]}])
    path = tmp_path / f"protocol-{steps}.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "description": "one block", "base": base,
                                    "blocks": [{"name": "iid", "purpose": "IID"}]}))
    return str(path)


def raw_of(out, path):
    gaps.main(["--out", str(out), "--blocks", "iid", "--raw", str(path)])
    return json.loads(path.read_text())


def cells_trained(out) -> set[str]:
    """The cells a simulator process ran under ``out`` (a restored or replayed one has no log)."""
    return {p.parent.name for p in (out / "iid" / "cells").glob("*/sim.log")}


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_bert):
    """The first machine: the protocol run to its end, and the raw file it commits."""
    tmp = tmp_path_factory.mktemp("first")
    path = protocol(tmp, tiny_bert)
    main(["--protocol", path, "--out", str(tmp / "out")])
    report = json.loads((tmp / "out" / "iid" / "results.json").read_text())
    return SimpleNamespace(tmp=tmp, path=path, tiny_bert=tiny_bert, report=report, raw=raw_of(tmp / "out", tmp / "raw.json"),
                           raw_path=tmp / "raw.json")


def test_a_raw_file_brings_finished_runs_back_and_the_bench_goes_on_from_them(tmp_path, first, capsys):
    path, report, raw = first.path, first.report, json.loads(json.dumps(first.raw))
    lr = report["results"]["fedavg"]["lr"]
    assert report["results"]["fedavg"]["seeds"]["0"]["replayed_from"] == f"fedavg-lr{lr:g}-s0-val-r2"
    run = raw["blocks"]["iid"]["runs"][f"fedavg-lr{lr:g}-s0-val-r2"]
    assert run["settings"]["method"] == {"name": "fedavg", "steps": 2, "lr": lr}
    assert "output_dir" not in run["settings"]["run"] and "data" not in run["settings"]["eval"]  # this machine's paths
    assert len(run["sitting_spans"]) == 1 and len(run["per_round"]["state_fingerprint"]) == 2
    assert "per_client" not in run["per_round"] and "clients" not in run["per_round"]

    # another machine: only the raw file and the protocol
    second = tmp_path / "second"
    done = restore.restore(first.raw_path, first.tmp / "protocol-2.yaml", second)
    assert set(done["iid"].values()) == {"restored"} and len(done["iid"]) == 3
    assert restore.restore(first.raw_path, first.tmp / "protocol-2.yaml", second)["iid"] == {
        tag: "kept (finished here already)" for tag in done["iid"]}
    assert not (second / "restored.json").exists()  # every run has its spans: nothing to carry
    capsys.readouterr()
    main(["--protocol", path, "--out", str(second)])
    printed = capsys.readouterr().out
    assert f"fedavg-lr0.001-s0-val-r2 (restored from {first.raw_path})" in printed
    assert cells_trained(second) == set()  # every run came back
    again = json.loads((second / "iid" / "results.json").read_text())
    for key in ("sweep", "results", "differences", "answers"):
        assert again[key] == report[key]
    raw2 = raw_of(second, tmp_path / "raw2.json")
    assert raw2["cost"] == raw["cost"]
    for tag, theirs in raw["blocks"]["iid"]["runs"].items():
        mine = raw2["blocks"]["iid"]["runs"][tag]
        assert mine["restored"] == {"from": str(first.raw_path), "settings_checked": True}
        assert {k: v for k, v in mine.items() if k != "restored"} == theirs

    # a sitting that ended between the sweep and the reported runs: seed 0's reported run was to
    # be replayed from its sweep run's state, which the raw file does not hold; it is trained
    # instead: the same rounds, so the same figures
    tag = f"fedavg-lr{lr:g}-s0-eval-r2"
    del raw["blocks"]["iid"]["runs"][tag]
    (tmp_path / "cut.json").write_text(json.dumps(raw))
    third = tmp_path / "third"
    restore.restore(tmp_path / "cut.json", first.tmp / "protocol-2.yaml", third)
    main(["--protocol", path, "--out", str(third)])
    assert cells_trained(third) == {tag}
    again = json.loads((third / "iid" / "results.json").read_text())
    assert again["sweep"] == report["sweep"]
    mine, theirs = again["results"]["fedavg"]["seeds"]["0"], report["results"]["fedavg"]["seeds"]["0"]
    assert mine["curve"] == theirs["curve"] and mine["final"] == theirs["final"]
    assert again["differences"] == report["differences"]
    raw3 = raw_of(third, tmp_path / "raw3.json")
    cost, trained = raw3["cost"], raw3["blocks"]["iid"]["runs"][tag]
    assert (raw["cost"]["federated_runs"], raw["cost"]["replayed_runs"]) == (2, 1)
    assert (cost["federated_runs"], cost["replayed_runs"]) == (3, 0)  # seed 0's reported run trained here
    assert cost["federated_run_seconds"] == pytest.approx(raw["cost"]["federated_run_seconds"] + trained["seconds"])
    assert cost["federated_wall_seconds"] == pytest.approx(
        raw["cost"]["federated_wall_seconds"] + trained["seconds"], rel=1e-6)


def test_a_run_of_other_settings_is_not_restored_and_an_old_raw_file_is_restored_unchecked(tmp_path, first):
    raw = first.raw
    # the protocol changed since (3 local steps, not 2): every run is left to run again
    protocol(tmp_path, first.tiny_bert, steps=3)
    done = restore.restore(first.raw_path, tmp_path / "protocol-3.yaml", tmp_path / "changed")
    assert set(done["iid"].values()) == {"not restored: it ran with other settings than the protocol's now (it runs again)"}
    assert not list((tmp_path / "changed" / "iid").glob("cells/*/cell.json"))
    # a raw file from before settings, spans and every column were kept (docs/quality-converged.json
    # up to 2026-12-07): restored, said to be unchecked, its wall time carried
    old_columns = {"eval_accuracy", "eval_loss", "train_loss", "uplink_payload_bytes_per_client", "round_seconds"}
    old = json.loads(json.dumps(raw))
    for run in old["blocks"]["iid"]["runs"].values():
        for key in ("settings", "sitting_spans", "tag", "base_method", "runner", "last_sitting_seconds",
                    "peak_rss_bytes"):
            run.pop(key, None)
        run["per_round"] = {k: v for k, v in run["per_round"].items() if k in old_columns}
    (tmp_path / "old.json").write_text(json.dumps(old))
    second = tmp_path / "second"
    done = restore.restore(tmp_path / "old.json", first.tmp / "protocol-2.yaml", second)
    assert set(done["iid"].values()) == {"restored (settings_checked false: its settings were not recorded when it ran)"}
    carried = json.loads((second / "restored.json").read_text())
    assert carried["blocks"]["iid"] == pytest.approx(raw["blocks"]["iid"]["cost"]["federated_wall_seconds"])
    cell = json.loads(next((second / "iid" / "cells").glob("*-s0-eval-r2/cell.json")).read_text())
    assert [r["round"] for r in cell["rows"]] == [1, 2] and cell["restored"]["settings_checked"] is False
    again = raw_of(second, tmp_path / "again.json")
    assert again["cost"] == raw["cost"]
    # restored again from what that machine committed: still unchecked (its settings there are
    # the ones it was restored with, not the ones it ran with)
    third = restore.restore(tmp_path / "again.json", first.tmp / "protocol-2.yaml", tmp_path / "third")
    assert set(third["iid"].values()) == {"restored (settings_checked false: its settings were not recorded when it ran)"}
    assert raw_of(tmp_path / "third", tmp_path / "third.json")["cost"] == raw["cost"]
