"""fedkrso-bench end to end on a tiny model: real server + client processes, 2 methods."""

from __future__ import annotations

import csv
import math
import json
import random

import pytest
import yaml

from fedkrso.bench.config import BenchConfig
from fedkrso.bench.main import main
from fedkrso.bench.report import last_mean_accuracy, targets
from fedkrso.common.models import build_tiny

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


def test_bench_two_methods_two_clients(tmp_path):
    model = build_tiny("bert", tmp_path / "model", num_labels=2)
    write_csv(tmp_path / "data.csv")
    cfg = {
        "name": "tiny",
        "data": {"source": f"csv:{tmp_path / 'data.csv'}", "glue_dir": None, "max_examples": 100,
                 "max_eval": 20, "min_size": 10},
        "model": {"name": str(model), "max_length": 16},
        "clients": 2, "alpha": None, "clients_per_round": 2, "rounds": 2, "sweep_rounds": 2,
        "batch_size": 8, "poll_seconds": 5, "target_accuracy": 0.5,
        "methods": [
            {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 2, "lrs": [1e-3, 3e-3]},
            {"name": "fedavg", "steps": 4, "lrs": [1e-3]},
        ],
    }
    BenchConfig.model_validate(cfg)
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results"
    main(["--config", str(config), "--out", str(out)])

    assert (out / "results.md").is_file() and (out / "accuracy_vs_bytes.png").stat().st_size > 1000
    report = json.loads((out / "results.json").read_text())
    by = {s["method"]: s for s in report["results"]}
    assert set(by) == {"fedkrso", "fedavg"}
    for s in by.values():
        assert s["rounds"] == 2
        assert 0.0 <= s["final_accuracy"] <= 1.0 and s["best_accuracy"] >= s["final_accuracy"]
        assert s["uplink_wire_per_client_round"] > s["uplink_payload_per_client_round"] > 0
        assert s["downlink_wire_per_client_round"] >= s["downlink_payload_per_client_round"] > 0
        assert s["train_state_bytes"] > 0 and s["client_peak_rss_bytes"] > 0
        assert s["mean_step_seconds"] > 0
        xs = [c["cumulative_wire_bytes"] for c in s["curve"]]
        assert xs == sorted(xs) and xs[0] > 0
    # FedKRSO uploads a few subspace accumulators, FedAvg every weight
    assert by["fedkrso"]["uplink_payload_per_client_round"] < by["fedavg"]["uplink_payload_per_client_round"]
    assert by["fedkrso"]["train_state_bytes"] < by["fedavg"]["train_state_bytes"]
    # the sweep ran both FedKRSO lrs and chose one
    sweep = [s for s in report["sweep"] if s["method"] == "fedkrso"]
    assert len(sweep) == 2 and sum(s["chosen"] for s in sweep) == 1
    assert by["fedkrso"]["lr"] == next(s["lr"] for s in sweep if s["chosen"])
    text = (out / "results.md").read_text()
    assert "| fedkrso |" in text and "| fedavg |" in text and "## Targets" in text
    assert len(report["targets"]) == 3 and report["targets"][0]["pass"] is None  # no fedit run


def test_targets_pass_fail():
    k = {"final_accuracy": 0.90, "rounds": 5, "uplink_payload_per_client_round": 10.0,
         "uplink_wire_per_client_round": 12.0, "train_state_bytes": 4, "train_state_source": "analytic"}
    a = dict(k, final_accuracy=0.905, uplink_payload_per_client_round=400.0,
             uplink_wire_per_client_round=420.0, train_state_bytes=100)
    f = dict(k, final_accuracy=0.89)
    t = targets({"fedkrso": k, "fedavg": a, "fedit": f})
    assert [x["pass"] for x in t] == [True, True, True]
    t = targets({"fedkrso": k, "fedavg": dict(a, final_accuracy=0.95, uplink_payload_per_client_round=100.0,
                                              train_state_bytes=50), "fedit": f})
    assert [x["pass"] for x in t] == [False, False, False]
    # a labelled FedKRSO variant gets its own three targets
    t = targets({"fedkrso": k, "fedkrso-cls": dict(k, base_method="fedkrso", uplink_payload_per_client_round=50.0),
                 "fedavg": a, "fedit": f})
    assert [x["pass"] for x in t] == [True, True, True, True, False, True]
    assert "(fedkrso-cls)" in t[4]["target"]


def test_bench_causal_lm_reports_loss_and_perplexity(tmp_path):
    """The causal-LM bench path (next-token loss, perplexity) on a tiny LLaMA: FedKRSO and FedIT."""
    model = build_tiny("llama", tmp_path / "model")
    write_csv(tmp_path / "data.csv", rows=80)
    cfg = {
        "name": "tiny-lm",
        "data": {"source": f"csv:{tmp_path / 'data.csv'}", "glue_dir": None, "max_examples": 60,
                 "max_eval": 16, "min_size": 10},
        "model": {"name": str(model), "task": "causal-lm", "max_length": 16},
        "clients": 2, "alpha": None, "clients_per_round": 2, "rounds": 2, "sweep_rounds": 2,
        "batch_size": 8, "poll_seconds": 5,
        "methods": [
            {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2, "interval_steps": 2, "lrs": [3e-3]},
            {"name": "fedit", "steps": 4, "rank": 2, "alpha": 4, "lrs": [3e-3]},
        ],
    }
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results"
    main(["--config", str(config), "--out", str(out)])

    report = json.loads((out / "results.json").read_text())
    assert report["causal"] is True
    by = {s["method"]: s for s in report["results"]}
    assert set(by) == {"fedkrso", "fedit"}
    for s in by.values():
        assert s["rounds"] == 2
        assert 0 < s["final_eval_loss"] < 20
        curve = [c["eval_loss"] for c in s["curve"]]
        assert len(curve) == 2 and all(math.isfinite(v) for v in curve)
    text = (out / "results.md").read_text()
    assert "final ppl" in text and "| fedkrso |" in text


def test_instruction_bench_in_the_simulator_with_client_evaluation(tmp_path, tiny_models):
    """Prompt/response rows from a JSON-lines file on a tiny LLaMA, each job one fedkrso-sim
    process (--sim): response-token loss from the server and from the clients' held-out rows."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"what follows {i}", "a": f"{i + 1} follows {i}"}) + "\n"
                            for i in range(80)))
    cfg = {
        "name": "tiny-instruct",
        "data": {"source": f"jsonl:{path}", "glue_dir": None, "prompt_column": "q", "response_column": "a",
                 "max_examples": 60, "max_eval": 12, "min_size": 10, "client_eval_fraction": 0.2},
        "model": {"name": str(tiny_models("llama")), "task": "causal-lm", "max_length": 24},
        "instruction": {"template": "plain", "prompt_format": "Q: {prompt}\nA:"}, "client_eval_every": 1,
        "clients": 2, "alpha": None, "clients_per_round": 2, "rounds": 2, "sweep_rounds": 2, "batch_size": 8,
        "methods": [{"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 2, "lrs": [3e-3]}],
    }
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["--config", str(config), "--out", str(tmp_path / "results"), "--sim"])
    run = tmp_path / "results" / "runs" / "fedkrso-lr0.003"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert yaml.safe_load((run / "round.yaml").read_text())["instruction"]["prompt_format"] == "Q: {prompt}\nA:"
    assert [r["client_eval_state"] for r in rows] == [0, 1] and all(r["uplink_wire_bytes"] is None for r in rows)
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    for r in rows:
        assert r["client_eval_perplexity"] == pytest.approx(math.exp(r["client_eval_loss"]))
        assert math.isfinite(r["eval_loss"]) and r["eval_examples"] == report["eval_rows"] == 8  # 10% of 80


def test_packaged_bench_configs_make_valid_round_yaml(tmp_path):
    """Every bench YAML shipped in bench/ (and its quick preset) writes round.yaml files the
    server accepts."""
    from pathlib import Path

    from fedkrso.bench.config import load_bench_config
    from fedkrso.bench.runner import method_section, round_yaml
    from fedkrso.common.config import parse_config

    configs = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.yaml"))
    assert any(c.name == "smollm2-headlines.yaml" for c in configs)
    for path in configs:
        if path.name == "demo.yaml":  # a round.yaml itself, not a bench config
            continue
        for cfg in (load_bench_config(path), load_bench_config(path).apply_quick()):
            for m in cfg.methods:
                rc = round_yaml(cfg, method_section(m, (m.lrs or [None])[0]), cfg.rounds, tmp_path, tmp_path,
                                "check", cfg.model.num_labels or 2)
                parse_config(rc, str(path))


def test_report_only_rewrites_the_table_from_results_json(tmp_path):
    """--report-only re-renders results.md (with the last-3 mean column) and the plot from a
    results.json without running anything."""
    curve = [{"round": r, "eval_accuracy": a, "eval_loss": 0.5, "cumulative_wire_bytes": 1000 * (r + 1)}
             for r, a in enumerate([0.5, 0.9, 0.6, 0.7, 0.8])]
    row = {"method": "fedkrso", "lr": 3e-4, "rounds": 5, "final_accuracy": 0.8, "best_accuracy": 0.9,
           "final_eval_loss": 0.5, "final_perplexity": None, "uplink_payload_per_client_round": 10.0,
           "uplink_wire_per_client_round": 11.0, "downlink_payload_per_client_round": 10.0,
           "downlink_wire_per_client_round": 11.0, "wire_bytes_to_target": None, "client_peak_rss_bytes": 1,
           "train_state_bytes": 1, "train_state_source": "measured", "mean_step_seconds": 0.1, "curve": curve}
    report = {"name": "t", "command": "fedkrso-bench", "runtime_s": 1.0, "data_source": "csv", "clients": 2,
              "alpha": None, "clients_per_round": 2, "train_rows": 10, "eval_rows": 4, "model": "m",
              "task": "sequence-classification", "max_length": 8, "batch_size": 2, "rounds": 5,
              "sweep_rounds": 5, "causal": False, "target_accuracy": None, "results": [row], "sweep": [],
              "plot": "accuracy_vs_bytes.png",
              "targets": [], "notes": []}
    (tmp_path / "results.json").write_text(json.dumps(report))
    assert abs(last_mean_accuracy(row) - 0.7) < 1e-12
    main(["--report-only", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "last-3 mean acc" in text and "| 80.00 | 90.00 | 70.00 |" in text
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000
