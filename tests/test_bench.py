"""fedkrso-bench end to end on tiny models: seeds, an lr sweep scored on a validation split,
reported runs on the eval split, statistics, resuming, both runners, the causal-LM path and a
protocol of two blocks."""

from __future__ import annotations

import csv
import json
import math
import random
import re
import shutil
from types import SimpleNamespace

import pytest
import yaml

from fedkrso.bench.main import main
from fedkrso.bench.ray_cells import Progress, Slots
from fedkrso.bench.runner import past_edge
from fedkrso.bench.stats import mean_std, paired_interval, verdict

pytestmark = pytest.mark.slow


def write_csv(path, rows=120):
    rng = random.Random(0)
    good, bad = ["great", "lovely", "fine", "superb"], ["awful", "bad", "boring", "poor"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        for i in range(rows):
            label = i % 2
            words = [rng.choice(good if label else bad) for _ in range(6)]
            w.writerow({"text": "the film was " + " ".join(words), "label": "pos" if label else "neg"})
    return path


def bench_config(tmp_path, model_dir, **over) -> dict:
    cfg = {
        "name": "tiny",
        "data": {"source": f"csv:{write_csv(tmp_path / 'data.csv')}", "glue_dir": None, "max_examples": 100,
                 "max_eval": 20, "min_size": 10},
        "model": {"name": str(model_dir), "max_length": 16},
        "clients": 2, "alpha": None, "clients_per_round": 2, "rounds": 2, "sweep_rounds": 1,
        "batch_size": 8, "poll_seconds": 5, "seeds": [0, 1], "val_fraction": 0.2,
        "methods": [
            {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 2, "lrs": [1e-3, 3e-3]},
            {"name": "fedavg", "steps": 4, "lrs": [1e-3]},
        ],
    }
    cfg.update(over)
    return cfg


def run(tmp_path, cfg, *args) -> dict:
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results"
    main(["--config", str(config), "--out", str(out), *args])
    return json.loads((out / "results.json").read_text())


def test_bench_seeds_sweep_on_validation_statistics_and_resume(tmp_path, tiny_bert):
    report = run(tmp_path, bench_config(tmp_path, tiny_bert))
    out = tmp_path / "results"
    assert report["metric"] == "accuracy" and report["runner"] == "sim"
    by = report["results"]
    assert set(by) == {"fedkrso", "fedavg"}
    for entry in by.values():
        assert sorted(entry["seeds"]) == ["0", "1"]
        for s in entry["seeds"].values():
            assert s["rounds"] == 2 and 0 <= s["final"] <= 1 and s["best"] >= s["final"]
            xs = [c["cumulative_bytes"] for c in s["curve"]]
            assert xs == sorted(xs) and xs[0] > 0
        agg = entry["aggregate"]["final"]
        assert agg["n"] == 2 and agg["std"] >= 0
    # FedKRSO uploads a few subspace accumulators, FedAvg every weight
    assert (by["fedkrso"]["aggregate"]["uplink_payload_per_client_round"]
            < by["fedavg"]["aggregate"]["uplink_payload_per_client_round"])
    diff = report["differences"]["fedkrso"]["fedavg"]
    per_seed = [100 * (by["fedkrso"]["seeds"][s]["final"] - by["fedavg"]["seeds"][s]["final"]) for s in ("0", "1")]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(sum(per_seed) / 2)
    assert diff["low"] <= diff["mean"] <= diff["high"]
    assert report["answers"][0]["question"].startswith("FedKRSO within 1.0 point of FedAvg")
    # the sweep ran both FedKRSO lrs on the validation split (seed 0 only) and chose one
    sweep = [s for s in report["sweep"] if s["method"] == "fedkrso"]
    assert len(sweep) == 2 and sum(s["chosen"] for s in sweep) == 1 and all(s["seeds"] == [0] for s in sweep)
    assert by["fedkrso"]["lr"] == next(s["lr"] for s in sweep if s["chosen"])
    configs = {p.parent.name: yaml.safe_load(p.read_text()) for p in (out / "cells").glob("*/round.yaml")}
    assert len(configs) == 2 + 2 * 2  # two sweep runs, two methods x two seeds reported
    assert {c["eval"]["data"].rsplit("/", 1)[1] for n, c in configs.items() if n.endswith("-val-r1")} == {"val"}
    assert {c["eval"]["data"].rsplit("/", 1)[1] for n, c in configs.items() if n.endswith("-eval-r2")} == {"eval"}
    assert {c["run"]["seed"] for c in configs.values()} == {0, 1}
    text = (out / "results.md").read_text()
    assert "| fedkrso |" in text and "## Answers" in text and (out / "metric_vs_bytes.png").stat().st_size > 1000
    # a second run resumes: every cell is loaded, none runs again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}
    again = run(tmp_path, bench_config(tmp_path, tiny_bert))
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")} == stamps
    assert again["results"] == report["results"]
    # a changed setting runs the cells it touches again, and only those
    changed = bench_config(tmp_path, tiny_bert)
    changed["methods"][1]["steps"] = 3
    run(tmp_path, changed)
    now = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}
    rerun = {p.parent.name for p in now if now[p] != stamps[p]}
    assert rerun == {p.parent.name for p in now if p.parent.name.startswith("fedavg")} and len(rerun) == 2


def test_a_sweep_past_the_edge_of_its_grid_steps_one_lr_at_a_time():
    """extend_edges's choice: one grid step beyond the edge the sweep chose, none inside."""
    assert past_edge([5e-4, 1e-3, 2e-3], {5e-4: 0.85, 1e-3: 0.87, 2e-3: 0.88}) == 4e-3
    assert past_edge([5e-4, 1e-3, 2e-3], {5e-4: 0.88, 1e-3: 0.87, 2e-3: 0.80}) == 2.5e-4
    assert past_edge([5e-4, 1e-3, 2e-3], {5e-4: 0.85, 1e-3: 0.88, 2e-3: 0.86}) is None
    # an extension already swept: the step is the outermost two lrs' ratio, on either side
    assert past_edge([5e-4, 1e-3, 2e-3, 4e-3], {5e-4: 0.8, 1e-3: 0.8, 2e-3: 0.8, 4e-3: 0.9}) == 8e-3
    assert past_edge([1e-3, 3e-3], {1e-3: 0.5, 3e-3: 0.5}) == pytest.approx(1e-3 / 3)  # a tie: the first, as chosen
    assert past_edge([1e-3], {1e-3: 0.5}) is None


def test_a_bench_sweeps_past_the_edge_its_grid_chose(tmp_path, tiny_bert):
    """extend_edges 1 on a grid of two lrs (whichever wins is an edge): a third lr one step beyond
    the winner is swept, on the validation split, and the choice is made among all three."""
    cfg = bench_config(tmp_path, tiny_bert, seeds=[0], rounds=1, extend_edges=1,
                       methods=[{"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2,
                                 "lrs": [1e-3, 3e-3]}])
    report = run(tmp_path, cfg)
    sweep = {s["lr"]: s for s in report["sweep"]}
    assert len(sweep) == 3 and sum(s["chosen"] for s in sweep.values()) == 1
    (extra,) = set(sweep) - {1e-3, 3e-3}
    first = max((1e-3, 3e-3), key=lambda lr: sweep[lr]["score"])  # the first of a tie, as the sweep chooses
    assert extra == pytest.approx(9e-3 if first == 3e-3 else 1e-3 / 3)
    assert report["results"]["fedkrso"]["lr"] == max(sweep, key=lambda lr: (sweep[lr]["score"], -list(sweep).index(lr)))
    cells = {p.parent.name for p in (tmp_path / "results" / "cells").glob("*/cell.json")}
    assert f"fedkrso-lr{extra:g}-s0-val-r1" in cells and len(cells) == 4  # three swept, one reported


def test_bench_on_real_processes_measures_the_wire(tmp_path, tiny_bert):
    cfg = bench_config(tmp_path, tiny_bert, seeds=[0], methods=[{"name": "fedkrso", "k": 2, "rank": 2,
                                                                "intervals": 1, "interval_steps": 2}])
    report = run(tmp_path, cfg, "--runner", "processes")
    (s,) = report["results"]["fedkrso"]["seeds"].values()
    cell = json.loads(next((tmp_path / "results" / "cells").glob("*/cell.json")).read_text())
    assert cell["runner"] == "processes" and all(r["uplink_wire_bytes"] > r["uplink_payload_bytes"] for r in cell["rows"])
    assert s["uplink_wire_per_client_round"] > s["uplink_payload_per_client_round"] > 0


def test_bench_causal_lm_scores_loss(tmp_path, tiny_models):
    cfg = bench_config(tmp_path, tiny_models("llama"), seeds=[0], model={"name": str(tiny_models("llama")),
                                                                           "task": "causal-lm", "max_length": 16},
                       methods=[{"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 2,
                                 "lrs": [3e-3]},
                                {"name": "fedit", "steps": 4, "rank": 2, "alpha": 4, "lrs": [3e-3]}])
    report = run(tmp_path, cfg)
    assert report["metric"] == "loss"
    for entry in report["results"].values():
        (s,) = entry["seeds"].values()
        assert 0 < s["final"] < 20 and s["best"] <= s["final"] and all(math.isfinite(c["metric"]) for c in s["curve"])


def test_report_only_rewrites_the_report_from_results_json(tmp_path, tiny_bert):
    report = run(tmp_path, bench_config(tmp_path, tiny_bert, seeds=[0], methods=[
        {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2}]))
    out = tmp_path / "results"
    (out / "results.md").unlink()
    (out / "metric_vs_bytes.png").unlink()
    main(["--report-only", str(out)])
    assert "| fedkrso |" in (out / "results.md").read_text() and (out / "metric_vs_bytes.png").is_file()
    assert json.loads((out / "results.json").read_text()) == report


def test_protocol_runs_blocks_and_writes_the_combined_report(tmp_path, tiny_bert):
    base = bench_config(tmp_path, tiny_bert, seeds=[0], methods=[
        {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2}])
    protocol = {"name": "tiny-quality", "description": "two blocks", "base": base, "blocks": [
        {"name": "iid", "purpose": "IID split"},
        {"name": "skew", "purpose": "label skew", "alpha": 0.5, "data": {"min_size": 5}}]}
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(protocol))
    out = tmp_path / "quality"
    main(["--protocol", str(path), "--out", str(out)])
    combined = json.loads((out / "quality.json").read_text())
    assert set(combined["blocks"]) == {"iid", "skew"}
    assert combined["blocks"]["skew"]["report"]["alpha"] == 0.5 and combined["blocks"]["iid"]["report"]["alpha"] is None
    assert all(b["cells_done"] == b["cells_planned"] == 1 for b in combined["blocks"].values())
    text = (out / "QUALITY.md").read_text()
    assert "## iid" in text and "## skew" in text and "runs finished 1 of 1" in text


def test_pool_with_adds_the_seeds_of_a_committed_report(tmp_path, tiny_bert):
    """A block with pool_with is also reported with another bench's seeds of the same settings
    (the grid's quality.json): pooled means, differences paired over all seeds; what cannot be
    pooled (another lr or setting, the same seed twice, a missing report) is refused by name."""
    from fedkrso.bench.report import pool
    from fedkrso.bench.stats import paired_interval

    methods = [{"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2, "lrs": [2e-3]},
               {"name": "fedit", "steps": 2, "rank": 2, "lrs": [2e-3]}]
    base = bench_config(tmp_path, tiny_bert, seeds=[0], methods=methods)

    def protocol(name, blocks):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "base": base, "blocks": blocks}))
        return path

    grid = tmp_path / "grid"
    main(["--protocol", str(protocol("grid", [{"name": "iid"}])), "--out", str(grid)])
    more = protocol("more", [{"name": "iid-more", "seeds": [1],
                              "pool_with": {"report": str(grid / "quality.json"), "block": "iid"}}])
    main(["--protocol", str(more), "--out", str(tmp_path / "more")])
    block = json.loads((tmp_path / "more" / "quality.json").read_text())["blocks"]["iid-more"]
    own, pooled = block["report"], block["pooled"]
    source = json.loads((grid / "quality.json").read_text())["blocks"]["iid"]["report"]
    assert own["seeds"] == [1] and pooled["seeds"] == [0, 1]
    assert pooled["pooled_seeds"] == {"fedkrso": [0, 1], "fedit": [0, 1]}
    assert pooled["results"]["fedkrso"]["aggregate"]["final"]["n"] == 2
    finals = {m: {s: 100 * r["results"][m]["seeds"][str(s)]["final"] for r, s in ((source, 0), (own, 1))}
              for m in ("fedkrso", "fedit")}
    interval = pooled["differences"]["fedkrso"]["fedit"]
    assert interval["n"] == 2 and interval["seeds"] == [0, 1]
    assert interval["mean"] == pytest.approx(paired_interval(finals["fedkrso"], finals["fedit"])["mean"])
    text = (tmp_path / "more" / "QUALITY.md").read_text()
    assert "### iid-more with the seeds of iid" in text and "fedkrso 0-1" in text

    with pytest.raises(ValueError, match="both ran seeds \\[1\\]"):
        pool(own, own)
    other_lr = json.loads(json.dumps(source))
    other_lr["results"]["fedit"]["lr"] = 1e-3
    with pytest.raises(ValueError, match="cannot pool fedit: lr"):
        pool(own, other_lr)
    with pytest.raises(ValueError, match="cannot pool: rounds differs"):
        pool(own, {**source, "rounds": 9})
    with pytest.raises(ValueError, match="no method fedavg"):
        pool(own, source, ["fedavg"])
    assert set(pool(own, source, ["fedit"])["pooled_seeds"]) == {"fedkrso", "fedit"}
    missing = protocol("missing", [{"name": "x", "pool_with": {"report": str(tmp_path / "nope.json"), "block": "iid"}}])
    with pytest.raises(SystemExit, match="nope.json, which is missing"):
        main(["--protocol", str(missing), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()  # refused before any run


def test_lrs_from_waits_for_the_source_block_to_choose(tmp_path, tiny_bert):
    """A block with lrs_from does not run while its source block has not chosen an lr for a
    method both run (the source's results.json is rewritten after every run, so it exists
    mid-sweep); a method the source does not run keeps its own lrs; the report counts either way."""
    from fedkrso.bench.config import load_protocol
    from fedkrso.bench.protocol import block_config

    base = bench_config(tmp_path, tiny_bert, seeds=[0, 1], methods=[
        {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2, "lrs": [1e-3, 2e-3]},
        {"name": "fedit", "steps": 2, "rank": 2, "lrs": [1e-3, 4e-3]}])
    protocol = {"name": "tiny", "description": "lrs_from", "base": base, "blocks": [
        {"name": "plain", "purpose": "selects the lrs", "methods": base["methods"][:1]},
        {"name": "dp", "purpose": "reuses them", "lrs_from": "plain"}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(protocol))
    proto, out = load_protocol(path), tmp_path / "out"
    with pytest.raises(SystemExit, match="has not run"):
        block_config(proto, "dp", out)
    (out / "plain").mkdir(parents=True)
    results = out / "plain" / "results.json"
    results.write_text(json.dumps({"results": {}}))  # mid-sweep
    with pytest.raises(SystemExit, match="has not chosen one for fedkrso yet"):
        block_config(proto, "dp", out)
    assert block_config(proto, "dp", out, strict=False).planned_runs() == (2 + 2) * 2  # (sweep + seeds) x methods
    results.write_text(json.dumps({"results": {"fedkrso": {"lr": 2e-3, "seeds": {}}}}))
    cfg = block_config(proto, "dp", out)
    assert {m.tag: m.lrs for m in cfg.methods} == {"fedkrso": [2e-3], "fedit": [1e-3, 4e-3]}
    assert cfg.planned_runs() == 2 + (2 + 2)
    # a sweep on more seeds than the bench has runs on the seeds there are
    assert cfg.model_copy(update={"sweep_seeds": 5}).planned_runs() == 2 * 2 + (2 + 2)


def test_statistics_match_hand_computation():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    interval = paired_interval({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.0, 3: 9.0})
    # differences 2, 3, 2: mean 7/3, sd 0.5774, t(0.975, 2) = 4.3027
    half = 4.302652729911275 * math.sqrt(1 / 3) / math.sqrt(3)
    assert interval["n"] == 3 and interval["mean"] == pytest.approx(7 / 3)
    assert interval["low"] == pytest.approx(7 / 3 - half) and interval["high"] == pytest.approx(7 / 3 + half)
    assert verdict(interval, 0.0) == "yes" and verdict(interval, 5.0) == "no" and verdict(interval, 2.0) == "inconclusive"
    assert paired_interval({0: 1.0}, {0: 0.5})["low"] is None


def test_a_partition_cut_off_while_writing_its_validation_split_is_written_again(tmp_path):
    """The validation split gets its name only when whole, so a bench stopped while writing it
    partitions again on resume (same shards, same split) instead of reusing half a split."""
    from fedkrso.bench.config import BenchConfig
    from fedkrso.bench.runner import partition
    from fedkrso.common.data import load_split

    cfg = BenchConfig.model_validate(bench_config(tmp_path, "unused"))
    first = partition(cfg, 0, tmp_path / "p")
    val = [r["text"] for r in load_split(tmp_path / "p" / "val")]
    shutil.rmtree(tmp_path / "p" / "val")
    (tmp_path / "p" / ".val.tmp").mkdir()  # where the cut-off write was going
    assert partition(cfg, 0, tmp_path / "p") == first
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["eval", "partition.json", "shard0", "shard1", "val"]
    assert [r["text"] for r in load_split(tmp_path / "p" / "val")] == val


def test_answers_cover_labelled_variants_of_a_method():
    """A row run under a label (fedkrso-r16, fedtt+-lr) is asked the questions of its method,
    named by its label; the peer is always the unlabelled row."""
    from fedkrso.bench.report import answers, differences

    def entry(base, finals, up=1000.0):
        return {"base_method": base, "lr": 1e-3,
                "seeds": {str(i): {"final": f, "uplink_payload_per_client_round": up} for i, f in enumerate(finals)},
                "aggregate": {"uplink_payload_per_client_round": up}}

    results = {"fedit": entry("fedit", [0.80, 0.82, 0.81], up=6000.0),
               "fedtt+-lr": entry("fedtt+", [0.70, 0.71, 0.69]),
               "fedkrso-r16": entry("fedkrso", [0.81, 0.83, 0.82])}
    got = {a["question"]: a["verdict"] for a in answers(results, differences(results, "accuracy"), "accuracy")}
    assert got == {"FedKRSO (fedkrso-r16) at least as good as FedIT": "yes",
                   "FedTT+ (fedtt+-lr) within 1 point of FedIT": "no",
                   "FedTT+ (fedtt+-lr) uploads at least 5x fewer bytes than FedIT": "yes"}


def test_instruction_bench_with_client_evaluation(tmp_path, tiny_models):
    """Prompt/response rows from a JSON-lines file on a tiny LLaMA: response-token loss from the
    server and from the clients' held-out rows, in the simulator."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"what follows {i}", "a": f"{i + 1} follows {i}"}) + "\n"
                            for i in range(80)))
    cfg = {
        "name": "tiny-instruct", "seeds": [0], "val_fraction": 0.0,
        "data": {"source": f"jsonl:{path}", "glue_dir": None, "prompt_column": "q", "response_column": "a",
                 "max_examples": 60, "max_eval": 12, "min_size": 10, "client_eval_fraction": 0.2},
        "model": {"name": str(tiny_models("llama")), "task": "causal-lm", "max_length": 24},
        "instruction": {"template": "plain", "prompt_format": "Q: {prompt}\nA:"}, "client_eval_every": 1,
        "clients": 2, "alpha": None, "clients_per_round": 2, "rounds": 2, "sweep_rounds": 2, "batch_size": 8,
        "methods": [{"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2, "lrs": [3e-3]}],
    }
    report = run(tmp_path, cfg)
    (cell,) = (tmp_path / "results" / "cells").glob("*/cell.json")
    rows = json.loads(cell.read_text())["rows"]
    assert yaml.safe_load((cell.parent / "round.yaml").read_text())["instruction"]["prompt_format"] == "Q: {prompt}\nA:"
    assert [r["client_eval_state"] for r in rows] == [0, 1] and all(r["uplink_wire_bytes"] is None for r in rows)
    for r in rows:
        assert r["client_eval_perplexity"] == pytest.approx(math.exp(r["client_eval_loss"]))
        assert math.isfinite(r["eval_loss"]) and r["eval_examples"] == report["eval_rows"] == 8  # 10% of 80


def test_packaged_bench_configs_make_valid_round_yaml(tmp_path):
    """Every bench YAML shipped in bench/ (their quick presets, every protocol block) writes
    round.yaml files the server accepts."""
    from pathlib import Path

    from fedkrso.bench.cells import Cell, round_yaml
    from fedkrso.bench.config import load_bench_config, load_protocol
    from fedkrso.common.config import parse_config

    configs, benches = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.yaml")), []
    assert any(c.name == "smollm2-headlines.yaml" for c in configs) and any(c.name == "quality.yaml" for c in configs)
    for path in configs:
        if path.name in ("demo.yaml", "sim-vs-ray.yaml"):  # round.yaml files themselves, not bench configs
            parse_config(yaml.safe_load(path.read_text()), str(path))
            continue
        if "blocks" in yaml.safe_load(path.read_text()):
            protocol = load_protocol(path)
            benches += [(path, protocol.bench(b)) for b in protocol.blocks]
        else:
            benches += [(path, load_bench_config(path)), (path, load_bench_config(path).apply_quick())]
    for path, cfg in benches:
        for m in cfg.methods:
            cell = Cell(m, (m.lrs or [1e-3])[0], cfg.seeds[0], cfg.rounds, "eval")
            parse_config(round_yaml(cfg, cell, tmp_path, tmp_path, cfg.model.num_labels or 2), str(path))


def test_a_task_no_method_learned_gets_no_verdict():
    """Both methods at the same score on every seed (CoLA at the majority class: MCC 0.0 for
    all; DP-SGD's runs at each seed's majority rate) is 'no signal', not a 'yes' from an
    interval of zero width; a real difference still gets its verdict."""
    from fedkrso.bench.report import answers

    def res(values):
        return {"seeds": {str(s): {"final": v} for s, v in enumerate(values)}}

    flat = {"fedkrso": res([0.0, 0.0, 0.0]), "fedavg": res([0.0, 0.0, 0.0])}
    diffs = {"fedkrso": {"fedavg": paired_interval({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0})}}
    [a] = answers(flat, diffs, "mcc")
    assert a["verdict"] == "no signal" and "every run of both scored 0.0" in a["note"]
    # each seed at its own majority rate (DP-SGD at epsilon 8): the same per seed, not overall
    majority = {"fedkrso": res([0.524, 0.494, 0.51]), "fedavg": res([0.524, 0.494, 0.51])}
    diffs = {"fedkrso": {"fedavg": paired_interval({0: 52.4, 1: 49.4, 2: 51.0}, {0: 52.4, 1: 49.4, 2: 51.0})}}
    [a] = answers(majority, diffs, "accuracy")
    assert a["verdict"] == "no signal" and "both scored the same on every seed (0.494, 0.51, 0.524)" in a["note"]
    learned = {"fedkrso": res([0.8, 0.82, 0.81]), "fedavg": res([0.8, 0.81, 0.8])}
    diffs = {"fedkrso": {"fedavg": paired_interval({0: 80.0, 1: 82.0, 2: 81.0}, {0: 80.0, 1: 81.0, 2: 80.0})}}
    [a] = answers(learned, diffs, "accuracy")
    assert a["verdict"] == "yes" and "note" not in a


def test_bench_cells_as_ray_tasks_show_progress_and_resume_in_one_process(tmp_path, tiny_bert, capsys):
    """``--ray`` on a protocol of two blocks, on a local Ray of 2 CPUs: block a's sweep (two
    cells at once as Ray tasks), then its reported run; block b's one run waits while a's runs
    hold both CPUs, then fills the one a leaves idle, beside a's runs rather than after them.
    Progress while they run, each line named by its block; the same cell files, which the
    protocol without Ray then keeps."""
    ray = pytest.importorskip("ray", reason="--ray needs ray (requirements.lock)")
    from fedkrso.sim.ray_connect import connect

    fedkrso = {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2}
    base = bench_config(tmp_path, tiny_bert, seeds=[0], rounds=1, methods=[fedkrso | {"lrs": [1e-3, 3e-3]}])
    path = tmp_path / "side.yaml"
    path.write_text(yaml.safe_dump({"name": "side", "base": base, "blocks": [
        {"name": "a"}, {"name": "b", "methods": [fedkrso | {"lrs": [2e-3]}]}]}))
    out = tmp_path / "results"
    args = ["--protocol", str(path), "--out", str(out)]
    connect(None, cpus=2)
    try:
        main([*args, "--ray"])
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    # each block's runs done and left, and the protocol's with the estimate (a block's own pace
    # would count the time it waited for the CPUs)
    assert re.search(r"\[protocol\]   \[1/4 runs done, 3 left; about \d+ min more at this sitting's pace\]", printed)
    assert "[protocol]   [4/4 runs done, 0 left]" in printed
    assert all(line.startswith("[protocol]") for line in printed.splitlines() if "sitting's pace" in line)
    assert re.search(r"\[a\]   \[1/3 runs done, 2 left\] fedkrso-lr0\.00[13]-s0-val-r1 \(\d+ s\)", printed)
    assert "[a]   [3/3 runs done, 0 left]" in printed and "[b]   [1/1 runs done, 0 left]" in printed
    assert "[a]     fedkrso-lr0.001-s0-val-r1: round 1/1 closed" in printed
    assert "[b]     fedkrso-lr0.002-s0-eval-r1: round 1/1 closed" in printed

    def span(block: str, tag: str) -> tuple[float, float]:
        (sitting,) = json.loads((out / block / "cells" / tag / "sittings.json").read_text())
        return sitting["start"], sitting["end"]

    report = json.loads((out / "a" / "results.json").read_text())
    chosen = report["results"]["fedkrso"]["lr"]
    sweep = [span("a", f"fedkrso-lr{lr:g}-s0-val-r1") for lr in (1e-3, 3e-3)]
    a_reported, b_run = span("a", f"fedkrso-lr{chosen:g}-s0-eval-r1"), span("b", "fedkrso-lr0.002-s0-eval-r1")
    spans = [*sweep, a_reported, b_run]
    assert all(sum(s <= t < e for s, e in spans) <= 2 for t, _ in spans)  # never more runs than CPUs
    assert b_run[0] >= min(e for _, e in sweep)  # b waited while a's sweep held both CPUs ...
    assert b_run[0] < a_reported[1]  # ... and ran beside a, not after it
    combined = json.loads((out / "quality.json").read_text())
    assert {k: (b["cells_done"], b["cells_planned"]) for k, b in combined["blocks"].items()} == {
        "a": (3, 3), "b": (1, 1)}

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/cells/*/cell.json")}
    assert len(stamps) == 4 and len(report["sweep"]) == 2 and report["results"]["fedkrso"]["seeds"]["0"]["rounds"] == 1
    main(args)  # one process now, one block after the other: every cell kept
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/cells/*/cell.json")} == stamps
    again = json.loads((out / "a" / "results.json").read_text())
    assert again["results"] == report["results"] and again["sweep"] == report["sweep"]
    assert "  [3/3 runs done, 0 left]" in capsys.readouterr().out


def test_slots_give_cpus_to_the_earliest_block_waiting_and_the_rest_to_later_ones():
    """ray_cells.Slots, the CPUs a protocol's blocks share side by side: a block takes CPUs only
    when no earlier block waits for them; one that has sent its phase's runs (or waits on
    another block) leaves them to later blocks; a run wider than the cluster goes on an idle one."""
    slots = Slots(2.0)
    for block in (0, 2):
        slots.want(block)
    assert not slots.take(2, 1.0)  # block 0 waits (still partitioning): block 2 does not jump it
    assert slots.take(0, 1.0) and slots.take(0, 1.0) and not slots.take(0, 1.0)  # both CPUs, then full
    slots.done_wanting(0)  # block 0 sent its phase: the next free CPU is block 2's ...
    slots.give(1.0)
    assert not slots.take(3, 1.0)  # block 3 asks too: it waits behind block 2
    assert slots.take(2, 1.0)
    slots.give(1.0)
    assert not slots.take(0, 2.0)  # ... until block 0 wants again: first in line, waiting for 2 CPUs
    assert not slots.take(3, 1.0)  # while it waits, no later block takes the free one
    slots.give(1.0)
    assert slots.take(0, 2.0) and slots.free == 0
    slots.give(2.0)
    slots.done_wanting(0)
    slots.done_wanting(2)
    assert slots.take(3, 8.0) and slots.free == 0  # wider than the cluster: all of it
    slots.stop()
    assert slots.stopped


def test_progress_says_how_long_the_rest_takes_at_this_sittings_pace():
    """The pace is this sitting's wall time per run trained: runs kept from before or made from a
    sweep twin print no estimate and do not set it (a clock passed in, not slept on)."""
    now, lines = [1000.0], []
    progress = Progress(5, lines.append, clock=lambda: now[0])
    cell = SimpleNamespace(tag="c", rounds=1)
    progress.finish(cell, {"seconds": 50.0}, loaded=True)
    now[0] += 600  # one run trained in 10 minutes: 3 left, about 30 more
    progress.finish(cell, {"seconds": 600.0}, loaded=False)
    progress.finish(cell, {"seconds": 600.0, "replayed_from": "c-val"}, loaded=False)
    now[0] += 5400  # a second trained run: 100 minutes a run over the sitting, 2 left
    progress.finish(cell, {"seconds": 5400.0}, loaded=False)
    progress.finish(cell, {"seconds": 60.0}, loaded=False)
    assert lines == ["  [1/5 runs done, 4 left] c (kept from before)",
                     "  [2/5 runs done, 3 left; about 30 min more at this sitting's pace] c (600 s)",
                     "  [3/5 runs done, 2 left; about 20 min more at this sitting's pace] c (600 s)",
                     "  [4/5 runs done, 1 left; about 50 min more at this sitting's pace] c (5400 s)",
                     "  [5/5 runs done, 0 left] c (60 s)"]
    # a run resumed from an earlier sitting counts the share of its wall time spent in this one
    now[0], lines[:] = 0.0, []
    progress = Progress(3, lines.append, clock=lambda: now[0])
    now[0] += 600  # 10 minutes of this sitting finish a run that had 30 minutes from before
    progress.finish(cell, {"seconds": 2400.0, "last_sitting_seconds": 600.0}, loaded=False)
    assert lines == ["  [1/3 runs done, 2 left; about 80 min more at this sitting's pace] c (2400 s)"]


def test_progress_shows_a_resumed_runs_new_rounds_and_none_of_a_kept_run(tmp_path):
    """Rounds a run keeps from before (``cells.kept_rounds``) are not printed again: a resumed
    run says once after which round it goes on, then prints its new rounds with the bench's
    metric; a run kept from before prints nothing but its line."""
    def rows(tag: str, n: int) -> None:
        folder = tmp_path / "cells" / tag
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "metrics.jsonl").open("a") as f:
            for r in range(n):
                f.write(json.dumps({"round": r, "eval_accuracy": 0.5, "eval_mcc": 0.25 + r / 100}) + "\n")

    lines = []
    progress = Progress(3, lines.append, metric="mcc")
    resumed, kept, again = (SimpleNamespace(tag=t, rounds=4) for t in ("resumed", "kept", "again"))
    rows("resumed", 2)
    rows("kept", 4)
    progress.start(resumed, tmp_path, kept=2)
    progress.start(kept, tmp_path, kept=4)
    progress.start(again, tmp_path, kept=0)
    assert lines == ["    resumed: resumes after round 2/4 eval_mcc 0.26"]
    with (tmp_path / "cells" / "resumed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 2, "eval_mcc": 0.3}) + "\n")
    rows("again", 1)
    progress.poll()
    assert lines[1:] == ["    resumed: round 3/4 closed eval_mcc 0.3", "    again: round 1/4 closed eval_mcc 0.25"]
    progress.finish(kept, {"seconds": 60.0}, loaded=True)
    assert lines[3:] == ["  [1/3 runs done, 2 left] kept (kept from before)"]