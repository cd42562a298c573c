"""Client-level differential privacy: the bound and the noise live in the space of the model
update for every method, the accountant's epsilon, and the budget that stops a run.

The geometry tests measure the model update the way each method makes it (applying the upload
to a real tiny model and differencing the weights), never with the geometry code under test.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import log_events, round_config
from fedkrso.bench.launch import child_env
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.common.methods import METHODS
from fedkrso.common.methods.fedit import ADAPTER, lora_layers
from fedkrso.common.privacy import accountant
from fedkrso.common.privacy.dp import noise_multiplier
from test_methods import FAMILIES, make, prepared, restore, snapshot, train  # noqa: F401
from test_methods import one_thread, tiny  # noqa: F401 - fixtures
from test_privacy_views import assert_server_view_is_aggregate

DP_METHODS = sorted(n for n, cls in METHODS.items() if cls.dp_unsupported is None)
NO_DP = sorted(n for n, cls in METHODS.items() if cls.dp_unsupported)


def merged_lora(model) -> dict[str, torch.Tensor]:
    """FFA-LoRA's model update is measured on the merged weights (alpha / r) B A."""
    return {n: layer.get_delta_weight(ADAPTER).detach().clone() for n, layer in lora_layers(model).items()}


def measured_update(method, model, seeds, upload) -> float:
    """Apply ``upload`` to ``model`` and return the L2 norm of what moved (restored after)."""
    start = snapshot(method, model)
    before = merged_lora(model) if method.name == "ffa-lora" else {}
    method.apply(model, seeds, upload)
    if method.name == "ffa-lora":
        after = merged_lora(model)
        moved = [after[n] - before[n] for n in after]
        moved += [t - start[n] for n, t in snapshot(method, model).items() if ".lora_" not in n]
    else:
        moved = [t - start[n] for n, t in snapshot(method, model).items()]
    restore(method, model, start)
    return math.sqrt(sum(float(d.double().square().sum()) for d in moved))


def test_dp_applies_where_the_method_says_it_does_and_is_refused_with_its_reason_elsewhere():
    """Which methods take ``privacy.dp`` is each method's ``dp_unsupported``, never a list here:
    a method that states no reason parses with DP on, one that does is refused with its reason."""
    assert DP_METHODS and NO_DP, "the registry has methods on both sides, so both paths run"
    dp = {"training": {"weighting": "uniform"}, "privacy": {"dp": {"mode": "central", "noise_multiplier": 1.0}}}
    for name in DP_METHODS:
        assert parse_config({"model": {"name": "x"}, "method": {"name": name}, **dp}).privacy.dp.mode == "central"
    for name in NO_DP:
        why = re.escape(METHODS[name].dp_unsupported)
        with pytest.raises(ConfigError, match=f"privacy.dp does not apply to {re.escape(name)}: {why}"):
            parse_config({"model": {"name": "x"}, "method": {"name": name}, **dp})
    with pytest.raises(ConfigError, match="weighting: uniform"):
        parse_config({"model": {"name": "x"}, "method": {"name": "fedkrso"},
                      "privacy": {"dp": {"mode": "local", "noise_multiplier": 1.0}}})


@pytest.mark.parametrize("name", DP_METHODS)
def test_clipped_model_update_never_exceeds_the_bound(tiny, name):
    """Sampled updates (trained ones, scaled up and down, and random ones): the geometry's norm
    is the measured norm of the model update, and after clipping to C the measured norm is
    at most C, equal to C where the update was larger."""
    method = make(name)
    model = prepared(tiny, "bert", method)
    seeds = method.round_seeds(0)
    start = snapshot(method, model)
    trained = train(method, model, "bert", "c1").tensors
    restore(method, model, start)
    model.double()  # measured in float64, so a small update is not lost to the weights' rounding
    geometry = method.update_geometry(model, seeds)
    gen = torch.Generator().manual_seed(3)
    samples = [trained, {n: t * 1e3 for n, t in trained.items()}, {n: t * 1e-3 for n, t in trained.items()}]
    samples += [{n: torch.randn(s, generator=gen) * 0.1 for n, s in geometry.spec.items()} for _ in range(3)]
    for i, upload in enumerate(samples):
        measured = measured_update(method, model, seeds, upload)
        assert geometry.norm(upload) == pytest.approx(measured, rel=1e-4), (name, i)
        bound = 0.5 * measured if i % 2 else 2.0 * measured
        clipped, norm = geometry.clip(upload, bound)
        after = measured_update(method, model, seeds, clipped)
        assert after <= bound * (1 + 1e-5), (name, i, after, bound)
        assert after == pytest.approx(min(bound, norm), rel=1e-4), (name, i)


@pytest.mark.parametrize("name", ["fedkrso", "ffa-lora"])
def test_upload_norm_is_not_the_model_update_norm(tiny, name):
    """Why the geometry exists: for subspace and frozen-A uploads the two norms differ."""
    method = make(name)
    model = prepared(tiny, "bert", method)
    geometry = method.update_geometry(model, method.round_seeds(0))
    gen = torch.Generator().manual_seed(5)
    upload = {n: torch.randn(*s, generator=gen)
              for n, s in geometry.spec.items() if n in geometry.factors[0].names}
    plain = math.sqrt(sum(float(t.square().sum()) for t in upload.values()))
    assert abs(geometry.norm(upload) - plain) > 0.05 * plain


@pytest.mark.parametrize("name", ["fedkrso", "ffa-lora"])
def test_noise_is_isotropic_gaussian_in_model_update_space(tiny, name):
    """Upload-space noise maps, through the method's own weight map, to N(0, std^2) on every
    coordinate of an orthonormal basis of the reachable subspace: no direction gets more or
    less noise than intended (plain i.i.d. noise on the upload would)."""
    method = make(name)
    model = prepared(tiny, "bert", method)
    geometry = method.update_geometry(model, method.round_seeds(0))
    factor = geometry.factors[0]
    m = factor.matrix  # (R x d_n): weight change = X m
    basis, _ = torch.linalg.qr(m.T)  # orthonormal basis of the row space (d_n x rank)
    std, rng = 0.3, np.random.default_rng(0)
    coords = []
    for _ in range(200):
        x = factor.stack(geometry.noise(std, rng), geometry.spec[factor.names[0]][0])
        coords.append((x @ m) @ basis)  # model-update coordinates, (d_m x rank)
    c = torch.stack(coords).reshape(-1, basis.shape[1])
    per_direction = c.std(dim=0)
    assert torch.allclose(per_direction, torch.full_like(per_direction, std), rtol=0.1)
    cov = torch.cov(c.T) / std**2
    assert (cov - torch.eye(cov.shape[0], dtype=cov.dtype)).abs().max() < 0.15
    naive = torch.randn(200 * geometry.spec[factor.names[0]][0], m.shape[0], dtype=m.dtype) * std
    naive_std = ((naive @ m) @ basis).std(dim=0)
    assert naive_std.max() / naive_std.min() > 1.2  # what the geometry corrects


def test_accountant_epsilon_grows_with_rounds_and_calibration_hits_the_target():
    z = accountant.calibrate(3.0, 1e-5, 20, 1, 1)
    eps = [accountant.epsilon([accountant.round_event(z, 1, 1)] * t, 1e-5) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2] == pytest.approx(3.0, rel=1e-3)
    # replacement of one client moves the sum by 2C: the accountant sees z / 2
    from dp_accounting import get_epsilon_gaussian
    assert accountant.epsilon([accountant.round_event(2.0, 1, 1)], 1e-5) >= get_epsilon_gaussian(1.0, 1e-5) * 0.99
    # sampling 10 of 100 without replacement is cheaper than taking everyone
    assert accountant.epsilon([accountant.round_event(z, 10, 100)] * 20, 1e-5) < eps[2] / 2
    cfg = parse_config({"model": {"name": "x"}, "method": {"name": "fedavg"}, "training": {"weighting": "uniform"},
                        "rounds": {"total": 20}, "privacy": {"dp": {"mode": "central", "target_epsilon": 3.0}}})
    assert noise_multiplier(cfg.privacy.dp, 20, 2) == pytest.approx(z, rel=1e-3)


def run_sim(tmp_path, model, data, **sections) -> tuple[list[dict], str]:
    cfg = round_config(model, tmp_path / "out", **sections)
    (tmp_path / "round.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "fedkrso.sim.main", "--config", str(tmp_path / "round.yaml"),
                           "--data-root", str(data), "--log-json"], capture_output=True, text=True, timeout=600,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return rows, proc.stdout + proc.stderr


@pytest.mark.slow
def test_central_dp_reports_epsilon_every_round_and_stops_before_the_budget(tmp_path, tiny_bert, shards):
    """Central DP through the coordinator: every row carries epsilon for the configured delta,
    the noise multiplier and the clip; the run stops cleanly (model saved, a log event, the
    last row's dp_budget_stop) before the round that would take epsilon past the budget; the
    rows, the server's log and its state name no client and carry no client's own figure."""
    z, budget = 4.0, 3.0
    per_round = [accountant.epsilon([accountant.round_event(z, 1, 1)] * t, 1e-5) for t in range(1, 7)]
    allowed = sum(e <= budget for e in per_round)
    assert 1 <= allowed < 6
    rows, logs = run_sim(tmp_path, tiny_bert, shards, rounds={"total": 6, "clients_per_round": 3, "min_clients": 3},
                         training={"weighting": "uniform", "batch_size": 8},
                         privacy={"dp": {"mode": "central", "clip": 0.5, "noise_multiplier": z,
                                         "epsilon_budget": budget}})
    assert [r["round"] for r in rows] == list(range(allowed))
    for r, eps in zip(rows, per_round):
        assert r["dp_epsilon"] == pytest.approx(eps, rel=1e-6) and r["dp_delta"] == 1e-5
        assert r["dp_noise_multiplier"] == z and r["dp_clip"] == 0.5 and r["dp_mode"] == "central"
    assert rows[-1]["dp_budget_stop"] and not any(r["dp_budget_stop"] for r in rows[:-1])
    [event] = log_events(logs, "privacy_budget_reached")
    assert event["round"] == allowed and event["epsilon_after_next_round"] > budget
    assert (tmp_path / "out" / "final_state_fingerprint.txt").is_file()
    update_events = log_events(logs, "update_privatized")
    assert update_events and all(e["dp"] == "central" for e in update_events)
    assert_server_view_is_aggregate(rows, logs, tmp_path / "out" / "state")


@pytest.mark.slow
def test_local_dp_noises_each_update_and_charges_participation(tmp_path, tiny_bert, shards):
    """Local mode: every client's upload is already noisy, and epsilon counts the rounds of the
    client that took part most (every client, every round, here); the server's view holds no
    client's figures."""
    rows, logs = run_sim(tmp_path, tiny_bert, shards, rounds={"total": 2, "clients_per_round": 3, "min_clients": 3},
                         training={"weighting": "uniform", "batch_size": 8},
                         privacy={"dp": {"mode": "local", "clip": 0.5, "noise_multiplier": 1.0}})
    assert_server_view_is_aggregate(rows, logs, tmp_path / "out" / "state")
    for most, row in enumerate(rows, start=1):
        assert row["num_clients"] == 3
        assert row["dp_epsilon"] == pytest.approx(
            accountant.epsilon([accountant.round_event(1.0, 1, 1)] * most, 1e-5), rel=1e-6)


def test_privacy_protocol_gives_valid_private_runs(tmp_path):
    """bench/privacy.yaml: every block and method makes a round.yaml that validates; the DP
    blocks are central DP at epsilon 8, 3 and 1 with uniform weights, for FedKRSO, FedAvg
    and FFA-LoRA."""
    from fedkrso.bench.cells import Cell, round_yaml
    from fedkrso.bench.config import REPO, load_protocol

    protocol = load_protocol(REPO / "bench" / "privacy.yaml")
    targets = {}
    for block in protocol.blocks:
        cfg = protocol.bench(block)
        assert [m.name for m in cfg.methods] == ["fedkrso", "fedavg", "ffa-lora"]
        for spec in cfg.methods:
            rc = parse_config(round_yaml(cfg, Cell(spec, 1e-3, 0, cfg.rounds, "eval"), tmp_path, tmp_path, 2))
            assert rc.training.weighting == "uniform"
            targets[block.name] = rc.privacy.dp.target_epsilon if rc.privacy.dp.enabled else None
    assert targets == {"nodp": None, "eps8": 8.0, "eps3": 3.0, "eps1": 1.0}


def test_rank_deficient_factor_removes_directions_that_change_no_weight():
    """K r > d_n: part of the upload maps to no weight change; it is projected out (the weight
    change is kept) so that what is released is bounded by the clip too."""
    from fedkrso.common.privacy.geometry import RightFactor, UpdateGeometry

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 4, generator=gen, dtype=torch.float64)  # R = 6 > d_n = 4
    geometry = UpdateGeometry({"a": (5, 3), "b": (5, 3)}, [RightFactor(["a", "b"], [3, 3], m)])
    x = {"a": torch.randn(5, 3, generator=gen, dtype=torch.float64) * 10,
         "b": torch.randn(5, 3, generator=gen, dtype=torch.float64) * 10}
    change = torch.cat([x["a"], x["b"]], 1) @ m
    projected = geometry.project(x)
    stacked = torch.cat([projected["a"], projected["b"]], 1)
    torch.testing.assert_close(stacked @ m, change)
    assert stacked.norm() < torch.cat([x["a"], x["b"]], 1).norm()
    clipped, norm = geometry.clip(x, 1.0)
    assert norm == pytest.approx(float(change.norm()))
    released = torch.cat([clipped["a"], clipped["b"]], 1)
    assert float((released @ m).norm()) == pytest.approx(1.0)
    assert float(released.norm()) <= float((released @ m).norm()) / float(torch.linalg.svdvals(m).min()) + 1e-9
