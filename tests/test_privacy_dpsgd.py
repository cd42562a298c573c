"""Sample-level DP-SGD inside a client (``privacy.dp_sgd``, common/privacy/dpsgd.py): per-example
gradients equal one-example backward passes for every method it applies to, each example's
contribution is clipped and the noise has the configured scale, Poisson batches, the
accountant against Opacus's own, config refusals, and runs through the coordinator (the
simulator and real processes) that report the sample-level epsilon and stop at its budget."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from conftest import log_events, round_config, run_cluster
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.common.methods import METHODS
from fedkrso.common.methods.base import forward_loss
from fedkrso.common.methods.fedkrso import SubspaceAdapter
from fedkrso.common.privacy import accountant
from fedkrso.common.privacy.config import DPSGDSection
from fedkrso.common.privacy.dpsgd import SampleDP, per_example_loss, poisson_batches
from test_methods import FAMILIES, load, make  # noqa: F401
from test_methods import one_thread, tiny  # noqa: F401 - fixtures
from test_privacy_dp import run_sim
from test_privacy_views import assert_server_view_is_aggregate

SUPPORTED = [n for n, cls in METHODS.items() if cls.dp_sgd_unsupported is None]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def uneven_batch(family: str) -> dict[str, torch.Tensor]:
    """4 examples of different lengths (padding matters to each example's gradient)."""
    ids = torch.randint(1000, 1200, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    if FAMILIES[family] == "sequence-classification":
        labels = torch.tensor([0, 1, 1, 0])
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainables(method, model, family):
    """The parameters one step of ``method`` trains (FedKRSO: fresh B's, nudged off zero so
    the layer's gradients are not degenerate, plus the dense-trainables)."""
    if method.name == "fedkrso":
        adapter = SubspaceAdapter(method.targets(model), method.cfg.rank, per_example=True)
        bs = adapter.start(11)
        with torch.no_grad():
            for b in bs:
                b.normal_(std=0.05, generator=torch.Generator().manual_seed(b.numel()))
        return bs + list(method.dense(model).values()), adapter
    return [p for p in model.parameters() if p.requires_grad], None


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_per_example_gradients_equal_one_example_backward(tiny, name, family):
    """Every trainable parameter's ``grad_sample`` row i is the gradient of example i's own loss
    (Opacus hooks for module parameters, the fused layer for FedKRSO's B); for a causal LM the
    loss is the per-example token mean, so padding in one example changes no other's row."""
    method = make(name, train_biases=True) if name != "fedavg" else make(name)
    model = no_dropout(load(tiny, family))
    method.prepare(model)
    params, adapter = trainables(method, model, family)
    batch = uneven_batch(family)
    model.train()
    with SampleDP(DPSGDSection(enabled=True), model, 4, np.random.default_rng(0)):
        forward_loss(model, dict(batch)).backward()
        samples = [p.grad_sample.clone() for p in params]
    assert not hasattr(model, "fedkrso_per_example_loss")
    if adapter is not None:
        adapter.per_example = False
    for i in range(4):
        for p in params:
            p.grad = None
        one = {k: v[i : i + 1] for k, v in batch.items()}
        forward_loss(model, one).backward()
        for p, s in zip(params, samples):
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(s[i], ref, atol=2e-5, rtol=1e-3, msg=f"{name} {tuple(p.shape)} example {i}")
    if adapter is not None:
        adapter.close()


def test_per_example_loss_is_the_mean_of_each_examples_token_mean():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, 5, -100, -100, -100]])
    one = [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100) for i in range(2)]
    assert per_example_loss(logits, labels) == pytest.approx(float((one[0] + one[1]) / 2), rel=1e-6)


def privatized(cfg: DPSGDSection, grad_samples: list[torch.Tensor], expected: int, empty: bool = False, seed=0):
    params = [torch.nn.Parameter(torch.zeros(g.shape[1:])) for g in grad_samples]
    for p, g in zip(params, grad_samples):
        p.grad_sample = g.clone()
    dp = SampleDP(cfg, torch.nn.Linear(1, 1), expected, np.random.default_rng(seed))
    dp.empty = empty
    dp.privatize(params)
    return [p.grad for p in params]


def test_each_example_is_clipped_jointly_and_the_sum_divided_by_the_expected_batch():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, generator=gen) * 3, torch.randn(5, 6, generator=gen) * 3
    norms = (a.flatten(1).pow(2).sum(1) + b.pow(2).sum(1)).sqrt()
    clip = float(norms.min()) / 2  # every example is clipped
    ga, gb = privatized(DPSGDSection(enabled=True, clip=clip, noise_multiplier=1e-9), [a, b], expected=8)
    scale = clip / norms
    torch.testing.assert_close(ga, torch.einsum("i,ijk->jk", scale, a) / 8, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb, torch.einsum("i,ij->j", scale, b) / 8, atol=1e-5, rtol=1e-4)
    # a large bound clips nothing: the ordinary sum over the expected batch
    ga, _ = privatized(DPSGDSection(enabled=True, clip=1e6, noise_multiplier=1e-12), [a, b], expected=5)
    torch.testing.assert_close(ga, a.sum(0) / 5, atol=1e-5, rtol=1e-5)
    # an empty Poisson draw releases noise alone
    ga, gb = privatized(DPSGDSection(enabled=True, clip=1.0, noise_multiplier=1e-9), [a, b], expected=8, empty=True)
    assert ga.abs().max() < 1e-8 and gb.abs().max() < 1e-8


def test_noise_has_std_sigma_times_clip_over_the_expected_batch():
    zeros = [torch.zeros(2, 20000)]
    cfg = DPSGDSection(enabled=True, clip=0.5, noise_multiplier=3.0)
    [g] = privatized(cfg, zeros, expected=16)
    want = 3.0 * 0.5 / 16
    assert float(g.std()) == pytest.approx(want, rel=0.03)
    assert abs(float(g.mean())) < 4 * want / math.sqrt(20000)
    [again] = privatized(cfg, zeros, expected=16, seed=0)
    [other] = privatized(cfg, zeros, expected=16, seed=1)
    assert torch.equal(g, again) and not torch.equal(g, other)


class _Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, idx):
        return {"input_ids": torch.tensor(idx)}


def test_poisson_batches_sample_each_row_at_the_rate_and_flag_empty_draws():
    sizes = [len(b["input_ids"]) for b in itertools.islice(poisson_batches(_Rows(200), 16, np.random.default_rng(0)), 2000)]
    assert np.mean(sizes) == pytest.approx(16, rel=0.03)
    assert np.var(sizes) == pytest.approx(16 * (1 - 16 / 200), rel=0.15)  # binomial(200, 0.08)
    # rate 1/1000 on 1 row: nearly every draw is empty, flagged, and carries one row
    draws = list(itertools.islice(poisson_batches(_Rows(1), 1, np.random.default_rng(0)), 5))
    assert all("dp_empty" not in d for d in draws)  # q = 1 with one row: never empty
    draws = list(itertools.islice(poisson_batches(_Rows(50), 1, np.random.default_rng(1)), 200))
    empty = [d for d in draws if "dp_empty" in d]
    assert 0.25 < len(empty) / 200 < 0.49  # (1 - 1/50)^50 = 0.364
    assert all(len(d["input_ids"]) == 1 for d in empty)
    dp = SampleDP(DPSGDSection(enabled=True), torch.nn.Linear(1, 1), 1, np.random.default_rng(0))
    seen = [(dp.empty, "dp_empty" in b) for b in itertools.islice(dp.batches(iter(draws)), 200)]
    assert [e for e, _ in seen] == ["dp_empty" in d for d in list(itertools.islice(
        poisson_batches(_Rows(50), 1, np.random.default_rng(1)), 200))]
    assert not any(flag for _, flag in seen)  # the marker never reaches the model


def test_sample_epsilon_agrees_with_opacus_accountant_and_moves_the_right_way():
    from opacus.accountants import RDPAccountant

    for q, sigma, steps in [(0.02, 1.0, 480), (0.1, 1.5, 60), (0.01, 0.8, 1000)]:
        ours = accountant.sample_epsilon(q, sigma, steps, 1e-5)
        theirs = RDPAccountant()
        theirs.history = [(sigma, q, steps)]
        assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=0.05), (q, sigma, steps)
    assert accountant.sample_epsilon(0.02, 1.0, 100, 1e-5) < accountant.sample_epsilon(0.02, 1.0, 200, 1e-5)
    assert accountant.sample_epsilon(0.02, 2.0, 100, 1e-5) < accountant.sample_epsilon(0.02, 1.0, 100, 1e-5)
    assert accountant.sample_epsilon(0.02, 1.0, 0, 1e-5) == 0.0


def test_dp_sgd_is_refused_where_it_cannot_apply_and_says_why(tmp_path, tiny_bert):
    """Which methods take ``privacy.dp_sgd`` is each method's ``dp_sgd_unsupported``, never a
    list here: the others parse with it on, these are refused with their own reason."""
    unsupported = sorted(n for n, cls in METHODS.items() if cls.dp_sgd_unsupported)
    assert SUPPORTED and unsupported, "the registry has methods on both sides, so both paths run"
    for name in SUPPORTED:
        cfg = parse_config(round_config(tiny_bert, tmp_path, method={"name": name}, privacy={"dp_sgd": {"enabled": True}}))
        assert cfg.privacy.dp_sgd.enabled
    for name in unsupported:
        why = re.escape(METHODS[name].dp_sgd_unsupported)
        with pytest.raises(ConfigError, match=f"privacy.dp_sgd does not apply to {re.escape(name)}: {why}"):
            parse_config(round_config(tiny_bert, tmp_path, method={"name": name},
                                      privacy={"dp_sgd": {"enabled": True}}))
    with pytest.raises(ConfigError, match="max_grad_norm cannot apply"):
        parse_config(round_config(tiny_bert, tmp_path, training={"optimizer": {"max_grad_norm": 1.0}},
                                  privacy={"dp_sgd": {"enabled": True}}))
    cfg = parse_config(round_config(tiny_bert, tmp_path, privacy={"dp_sgd": {"enabled": True, "clip": 0.3}}))
    assert cfg.privacy.dp_sgd.clip == 0.3 and cfg.privacy.any


def test_the_dp_sgd_bench_measures_every_method_it_applies_to():
    from fedkrso.bench.dpsgd import METHODS as BENCHED

    assert sorted(BENCHED) == sorted(SUPPORTED)
    for name, settings in BENCHED.items():
        METHODS[name].Config.model_validate(settings)


def shard_rows(shards, n: int) -> dict[str, int]:
    from fedkrso.common.data.feed import load_split

    return {f"shard{i}": len(load_split(shards / f"shard{i}")) for i in range(n)}


@pytest.mark.slow
def test_dp_sgd_run_reports_sample_epsilon_and_stops_before_its_budget(tmp_path, tiny_bert, shards):
    """The simulator (the coordinator, the client round): every row reports the largest
    sample-level epsilon over the clients for their rows and the steps they ran; the run stops
    before a round would take a selected client past the budget; every client logged its
    DP-SGD steps; composed with central client-level DP both epsilons are reported."""
    sigma, steps, batch = 1.0, 2, 8
    rows = shard_rows(shards, 3)
    per_round = [max(accountant.sample_epsilon(batch / n, sigma, steps * t, 1e-5) for n in rows.values())
                 for t in range(1, 7)]
    budget = (per_round[2] + per_round[3]) / 2  # three rounds fit, the fourth does not
    out, logs = run_sim(tmp_path, tiny_bert, shards, rounds={"total": 6, "clients_per_round": 3, "min_clients": 3},
                        training={"batch_size": batch},
                        privacy={"dp_sgd": {"enabled": True, "clip": 1.0, "noise_multiplier": sigma,
                                            "epsilon_budget": budget}})
    assert [r["round"] for r in out] == [0, 1, 2]
    for r, eps in zip(out, per_round):
        assert r["dp_sgd_epsilon"] == pytest.approx(eps, rel=1e-9)
        assert r["dp_sgd_noise_multiplier"] == sigma and r["dp_sgd_clip"] == 1.0 and r["dp_sgd_delta"] == 1e-5
        assert "dp_epsilon" not in r
    [stop] = log_events(logs, "privacy_budget_reached")
    assert stop["round"] == 3 and stop["kind"] == "dp_sgd" and stop["epsilon_after_next_round"] > budget
    trained = log_events(logs, "update_dp_sgd")
    assert len(trained) == 9 and all(e["steps"] == steps for e in trained)
    assert (tmp_path / "out" / "final_state_fingerprint.txt").is_file()
    assert_server_view_is_aggregate(out, logs, tmp_path / "out" / "state")


@pytest.mark.slow
def test_dp_sgd_with_real_processes_and_central_dp(tmp_path, tiny_bert, shards):
    """A real server and 2 real client processes over gRPC, FedAvg full fine-tuning under
    DP-SGD and central client-level DP at once: both epsilons in every row, the clients'
    DP-SGD steps in their logs, and every client ends at the server's final state."""
    cfg = round_config(tiny_bert, tmp_path / "out", method={"name": "fedavg", "steps": 2, "lr": 1e-4},
                       rounds={"total": 2, "clients_per_round": 2, "min_clients": 2},
                       training={"batch_size": 8, "weighting": "uniform"},
                       privacy={"dp": {"mode": "central", "clip": 1.0, "noise_multiplier": 2.0},
                                "dp_sgd": {"enabled": True, "clip": 1.0, "noise_multiplier": 1.1}})
    run = run_cluster(tmp_path, cfg, shards, clients=2)
    rows = shard_rows(shards, 2)
    assert [r["round"] for r in run.rows] == [0, 1]
    for t, r in enumerate(run.rows, start=1):
        want = max(accountant.sample_epsilon(8 / n, 1.1, 2 * t, 1e-5) for n in rows.values())
        assert r["dp_sgd_epsilon"] == pytest.approx(want, rel=1e-9)
        assert r["dp_epsilon"] > 0 and r["dp_mode"] == "central"
    for c in run.cluster.clients:
        events = log_events(c.text(), "update_dp_sgd")
        assert [e["round"] for e in events] == [0, 1] and all(e["steps"] == 2 for e in events)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_sample_level_ledger(tmp_path, tiny_bert, shards):
    """The simulator killed (SIGKILL) once two rounds are committed, then ``--resume``d: the
    rows after the restart report the sample-level epsilon of the whole run, not of the
    rounds since the restart (the ledger is saved with every round)."""
    import json
    import signal
    import subprocess
    import sys

    import yaml

    from conftest import metric_rows, wait_until
    from fedkrso.bench.launch import child_env

    sigma, steps, batch, total = 1.0, 2, 8, 5
    rows = shard_rows(shards, 3)
    per_round = [max(accountant.sample_epsilon(batch / n, sigma, steps * t, 1e-5) for n in rows.values())
                 for t in range(1, total + 1)]
    cfg = round_config(tiny_bert, tmp_path / "out", rounds={"total": total, "clients_per_round": 3, "min_clients": 3},
                       training={"batch_size": batch},
                       privacy={"dp_sgd": {"enabled": True, "clip": 1.0, "noise_multiplier": sigma}})
    (tmp_path / "round.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "fedkrso.sim.main", "--config", str(tmp_path / "round.yaml"),
           "--data-root", str(shards), "--log-json"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            wait_until(lambda: len(metric_rows(tmp_path / "out")) >= 2 or first.poll() is not None, 300,
                       "two committed rounds")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    done = len(metric_rows(tmp_path / "out"))
    assert done < total, "the first run finished before it could be killed"
    second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=child_env())
    assert second.returncode == 0, second.stderr[-3000:]
    [resumed] = log_events(second.stdout + second.stderr, "run_resumed")
    assert resumed["round"] >= 2
    out = metric_rows(tmp_path / "out")
    assert [r["round"] for r in out] == list(range(total))
    for r, eps in zip(out, per_round):
        assert r["dp_sgd_epsilon"] == pytest.approx(eps, rel=1e-9), json.dumps(r)[:300]


def test_a_replacement_client_over_its_budget_is_passed_over(tmp_path, tiny_bert):
    """Mid-round replacements are checked like the round's own clients: one whose next round
    would pass the sample-level budget may not join, a fresh one may."""
    from fedkrso.server.privacy import PrivacyGuard

    cfg = parse_config(round_config(tiny_bert, tmp_path, training={"batch_size": 8},
                                    privacy={"dp_sgd": {"enabled": True, "noise_multiplier": 1.0,
                                                        "epsilon_budget": 8.0}}))
    guard = PrivacyGuard(cfg, cfg.build_method(), None)
    steps = cfg.method.local_steps()
    one_round = accountant.sample_epsilon(8 / 40, 1.0, steps, 1e-5)
    assert one_round < 8.0
    rounds_to_budget = next(t for t in range(1, 500) if accountant.sample_epsilon(8 / 40, 1.0, steps * t, 1e-5) > 8.0)
    guard.sgd_ledger = {"worn": [(r, 8 / 40, steps) for r in range(rounds_to_budget - 1)]}
    assert not guard.may_join(3, "worn", 40)
    assert guard.may_join(3, "fresh", 40)
    assert not guard.allows(3, 2, 2, {"worn": 40, "fresh": 40}) and guard.allows(3, 1, 2, {"fresh": 40})


@pytest.mark.parametrize("name", ["fedkrso", "fedit"])
def test_each_step_privatizes_only_its_own_examples(tiny, name):
    """After a step the per-example gradients are cleared, so the next step's are its own (a
    second backward of the same batch gives the same per-example gradients, not their sum);
    two backward passes before one step are refused."""
    method = make(name)
    model = no_dropout(load(tiny, "bert"))
    method.prepare(model)
    params, adapter = trainables(method, model, "bert")
    batch = uneven_batch("bert")
    model.train()
    dp = SampleDP(DPSGDSection(enabled=True, clip=1e6, noise_multiplier=1e-20), model, 4, np.random.default_rng(0))
    grads = []
    with dp:
        for _ in range(2):
            forward_loss(model, dict(batch)).backward()
            dp.privatize(params)
            grads.append([p.grad.clone() for p in params])
            assert all(getattr(p, "grad_sample", None) is None for p in params)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        forward_loss(model, dict(batch)).backward()
        forward_loss(model, dict(batch)).backward()
        with pytest.raises(RuntimeError, match="more than one backward"):  # Opacus kept a list
            dp.privatize(params)
    if adapter is not None:
        adapter.close()


def test_dp_sgd_protocol_gives_valid_private_runs(tmp_path):
    """bench/privacy-dpsgd.yaml: FedKRSO, FFA-LoRA and FedIT under DP-SGD with the budget of 8
    each client's ledger enforces; every run's round.yaml validates."""
    from fedkrso.bench.cells import Cell, round_yaml
    from fedkrso.bench.config import REPO, load_protocol

    protocol = load_protocol(REPO / "bench" / "privacy-dpsgd.yaml")
    [block] = protocol.blocks
    cfg = protocol.bench(block)
    assert [m.name for m in cfg.methods] == ["fedkrso", "ffa-lora", "fedit"]
    for spec in cfg.methods:
        assert len(spec.lrs) == 3
        rc = parse_config(round_yaml(cfg, Cell(spec, spec.lrs[0], 0, cfg.rounds, "eval"), tmp_path, tmp_path, 2))
        assert rc.privacy.dp_sgd.enabled and rc.privacy.dp_sgd.epsilon_budget == 8.0
        assert rc.training.optimizer.max_grad_norm is None
