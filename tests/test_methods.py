"""Every federated method through the same invariants, on tiny models of several families.

One table (``MATRIX``: method x family) and one test per invariant, in the spirit of PEFT's
flat test matrix. The settings are tests/method_cases.py's: small ones keep each case to a
fraction of a second; the learning test uses larger learning rates than the defaults because
the models are tiny and random.
"""

from __future__ import annotations

import itertools
import math

import pytest
import structlog
import structlog.testing
import torch

from fedkrso.common.aggregate import StreamingAggregator
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.common.methods import METHODS, LocalUpdate, Method
from fedkrso.common.methods.base import out_in
from fedkrso.common.models import load_model, model_fingerprint
from fedkrso.common.accounting import payload_bytes
from fedkrso.common.methods.fedtt import core_index
from fedkrso.common.tensors import decode, encode
from method_cases import CASES, small

FAMILIES = {"bert": "sequence-classification", "gpt2": "causal-lm", "llama": "causal-lm"}
MATRIX = [(m, f) for m in CASES for f in FAMILIES]
IDS = [f"{m}-{f}" for m, f in MATRIX]


def test_table_covers_the_registry():
    """tests/method_cases.py has one row per registered method, valid for its Config."""
    assert set(CASES) == set(METHODS)
    for name, cls in METHODS.items():
        cls.Config.model_validate(small(name))
        cls.Config.model_validate(small(name, **CASES[name].learn))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy two-core machine the
    threads' hand-offs cost milliseconds per op (50x the work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """Family -> folder of a tiny random model (built once per session)."""
    return {f: tiny_models(f) for f in FAMILIES}


def load(tiny, family: str) -> torch.nn.Module:
    return load_model(str(tiny[family]), FAMILIES[family])


def make(name: str, **overrides) -> Method:
    cls = METHODS[name]
    return cls(cls.Config.model_validate(small(name, **overrides)), run_seed=7)


def prepared(tiny, family: str, method: Method) -> torch.nn.Module:
    model = load(tiny, family)
    method.prepare(model)
    return model


def fixed_batch(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """8 sequences of 12 tokens; labels: first-token parity (classification) or the tokens."""
    ids = torch.randint(1000, 1200, (8, 12), generator=torch.Generator().manual_seed(seed))
    labels = ids[:, 0] % 2 if FAMILIES[family] == "sequence-classification" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train(method: Method, model, family: str, client: str, round_id=0, seed=0) -> LocalUpdate:
    batches = itertools.repeat(fixed_batch(family, seed))
    return method.train_round(model, batches, round_id, method.round_seeds(round_id), client)


def snapshot(method: Method, model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in method.state_parameters(model).items()}


@torch.no_grad()
def restore(method: Method, model, snap: dict[str, torch.Tensor]) -> None:
    for n, t in method.state_parameters(model).items():
        t.copy_(snap[n])


def over_the_wire(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in tensors.items():
        enc = encode(t, dtype)
        out[n] = decode(enc.dtype, enc.shape, enc.data)
    return out


def mean(*weighted: tuple[LocalUpdate, float]) -> dict[str, torch.Tensor]:
    agg = StreamingAggregator()
    for update, weight in weighted:
        agg.add(update.tensors, weight)
    return agg.result()


@torch.no_grad()
def logits(model, family: str) -> torch.Tensor:
    model.eval()
    batch = {k: v for k, v in fixed_batch(family, seed=1).items() if k != "labels"}
    return model(**batch).logits


@torch.no_grad()
def batch_loss(model, family: str) -> float:
    model.eval()
    return model(**fixed_batch(family)).loss.item()


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_prepare_is_deterministic_and_keeps_the_function(tiny, name, family):
    """Two loads prepared under different global RNG states match bit for bit, prepare leaves
    the global RNG alone, and a freshly prepared model computes what the base model does."""
    method = make(name)
    fingerprints = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = load(tiny, family)
        before = torch.random.get_rng_state()
        method.prepare(model)
        assert torch.equal(before, torch.random.get_rng_state())
        plan = method.plan_fingerprint(model, method.round_seeds(0))
        fingerprints.append((method.state_fingerprint(model), plan))
    assert fingerprints[0] == fingerprints[1]
    torch.testing.assert_close(logits(model, family), logits(load(tiny, family), family))


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_update_matches_spec_and_formula(tiny, name, family):
    method = make(name)
    model = prepared(tiny, family, method)
    update = train(method, model, family, "c1")
    spec = method.update_spec(model, method.round_seeds(0))
    assert set(update.tensors) <= set(spec)
    assert method.required_names(model, method.round_seeds(0)) <= set(update.tensors)
    for n, t in update.tensors.items():
        assert tuple(t.shape) == spec[n], n
        assert torch.isfinite(t).all(), n
    assert update.steps == method.cfg.local_steps() and update.loss > 0
    sent = payload_bytes(update.tensors, method.cfg.wire_dtype)
    assert sent == method.upload_bytes_formula(model, len(update.seeds_used))


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_measured_train_state_is_grad_plus_adam_of_the_trainables(tiny, name, family):
    """A client reports its peak gradient + optimizer-state bytes, counted from the tensors:
    gradient, exp_avg and exp_avg_sq (float32) of exactly what it trains. FedKRSO trains one
    subspace's B (d_m x r per target) and the dense set; FedKSeed only its first-order head."""
    method = make(name)
    model = prepared(tiny, family, method)
    update = train(method, model, family, "c1")
    dense = sum(p.numel() for p in method.dense(model).values())
    if name == "fedkseed":
        trainable = dense  # the first-order head; the body moves by zeroth-order steps
    elif name == "fedkrso":
        trainable = method.cfg.rank * sum(out_in(m)[0] for m in method.targets(model).values()) + dense
    else:
        trainable = sum(p.numel() for p in method.own(model).values()) + dense
    assert update.train_state_bytes == 3 * 4 * trainable
    assert method.trainable_count(model) == trainable  # the method's own description agrees
    assert method.train_state_bytes_formula(model) == update.train_state_bytes
    assert trainable > 0 or (name == "fedkseed" and not method.dense(model))  # a causal LM has no new head


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_server_and_clients_reach_identical_state(tiny, name, family):
    """The aggregated delta, decoded from the wire and applied by the server and by a client
    restored from its snapshot, gives the same bytes; the weighted mean is order independent."""
    method = make(name)
    server, c1, c2 = (prepared(tiny, family, method) for _ in range(3))
    initial = method.state_fingerprint(server)
    assert method.state_fingerprint(c1) == initial
    snap = snapshot(method, c1)
    u1 = train(method, c1, family, "c1", seed=0)
    u2 = train(method, c2, family, "c2", seed=1)
    delta = over_the_wire(mean((u1, 3.0), (u2, 1.0)), method.cfg.wire_dtype)
    reversed_order = mean((u2, 1.0), (u1, 3.0))
    assert delta and set(delta) == set(reversed_order)
    for n, t in delta.items():
        torch.testing.assert_close(t, reversed_order[n])

    seeds = method.round_seeds(0)
    method.apply(server, seeds, delta)
    restore(method, c1, snap)
    method.apply(c1, seeds, delta)
    assert method.state_fingerprint(c1) == method.state_fingerprint(server)
    assert model_fingerprint(c1) == model_fingerprint(server)
    assert method.state_fingerprint(server) != initial


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_apply_replays_training_and_is_linear(tiny, name, family):
    """Applying a client's own update to its snapshot rebuilds its trained state, and applying
    the mean of two updates moves the state by the mean of their moves."""
    method = make(name)
    model = prepared(tiny, family, method)
    seeds = method.round_seeds(0)
    start = snapshot(method, model)
    moves, updates = [], []
    for client, seed in (("c1", 0), ("c2", 1)):
        restore(method, model, start)
        updates.append(train(method, model, family, client, seed=seed))
        trained = snapshot(method, model)
        restore(method, model, start)
        method.apply(model, seeds, updates[-1].tensors)
        for n, t in method.state_parameters(model).items():
            torch.testing.assert_close(t, trained[n], rtol=1e-4, atol=1e-5)
        moves.append({n: t - start[n] for n, t in snapshot(method, model).items()})
    restore(method, model, start)
    method.apply(model, seeds, mean((updates[0], 1.0), (updates[1], 1.0)))
    for n, t in method.state_parameters(model).items():
        expected = (moves[0][n] + moves[1][n]) / 2
        torch.testing.assert_close(t - start[n], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_loss_decreases_over_rounds(tiny, name, family):
    torch.manual_seed(0)  # dropout draws from the global RNG: make the check order-independent
    method = make(name, **CASES[name].learn)
    model = prepared(tiny, family, method)
    before = batch_loss(model, family)
    for round_id in range(3):
        snap = snapshot(method, model)
        update = train(method, model, family, "c1", round_id=round_id)
        restore(method, model, snap)
        method.apply(model, method.round_seeds(round_id), mean((update, 1.0)))
    after = batch_loss(model, family)
    assert after < before - 0.01, (before, after)


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_export_is_a_plain_model_that_round_trips(tiny, name, family, tmp_path):
    """export() has the base model's keys, survives save_pretrained / from_pretrained, leaves
    the training model untouched, and (with export_extra for FedTT) computes the same logits."""
    method = make(name)
    model = prepared(tiny, family, method)
    train(method, model, family, "c1")
    state = method.state_fingerprint(model)
    plain = method.export(model)
    assert method.state_fingerprint(model) == state
    assert set(plain.state_dict()) == set(load(tiny, family).state_dict())
    plain.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), FAMILIES[family])
    extra = method.export_extra(model)
    if extra:
        method.prepare(reloaded)
        result = reloaded.load_state_dict(extra, strict=False)
        assert not result.unexpected_keys
    torch.testing.assert_close(
        logits(reloaded, family), logits(model, family), rtol=1e-4, atol=1e-5
    )


# -- method-specific behaviour ---------------------------------------------------------------


def test_every_method_parses_from_round_yaml():
    for name in METHODS:
        cfg = parse_config({"model": {"name": "minilm"}, "method": {"name": name}})
        assert type(cfg.method) is METHODS[name].Config
    with pytest.raises(ConfigError, match="freeze"):
        method = {"name": "fedtt+", "freeze": [0, 1, 2]}
        parse_config({"model": {"name": "minilm"}, "method": method})


def test_tt_factors_are_balanced():
    from fedkrso.common.methods.fedtt import tt_factors

    assert tt_factors(384, 3) == [6, 8, 8]
    assert tt_factors(64, 3) == [4, 4, 4]
    assert tt_factors(4096, 3) == [16, 16, 16]
    assert tt_factors(31, 3) == [1, 1, 31]
    for n in (32, 576, 768, 2048, 4097):
        assert torch.tensor(tt_factors(n, 3)).prod().item() == n


@pytest.mark.parametrize("name", ["ffa-lora", "fedtt+"])
def test_frozen_parts_never_travel_or_change(tiny, name):
    """FFA-LoRA sends no A; FedTT+ under the fixed rule [0, -1] sends only the middle cores;
    frozen ones stay."""
    method = make(name, **({"freeze_rule": "fixed"} if name == "fedtt+" else {}))
    model = prepared(tiny, "bert", method)
    start = snapshot(method, model)
    update = train(method, model, "bert", "c1")
    if name == "ffa-lora":
        frozen = {n for n in start if ".lora_A." in n}
    else:
        frozen = {n for n in start if ".tt_adapter." in n and not n.endswith(".cores.1")}
    assert frozen
    for n in frozen:
        assert f"delta.{n}" not in update.tensors
        assert torch.equal(method.state_parameters(model)[n], start[n])
    assert any(k.startswith("delta.") for k in update.tensors)


def test_fedtt_plus_adaptively_freezes_the_slowest_core_and_keeps_the_decision(tiny):
    """Round 0 trains every core index; applying a round in which one index moved much less
    than the fastest freezes it: the next round's seeds (its plan) leave it out, its cores are
    not in the update spec, nor trained, nor sent; the decision survives a restart through
    plan_state, and one index always stays trainable."""
    method = make("fedtt+", freeze_ratio=0.5)
    model = prepared(tiny, "bert", method)
    assert method.round_seeds(0) == [0, 1, 2]
    cores = {n: p for n, p in method.state_parameters(model).items() if ".tt_adapter." in n}
    delta = {f"delta.{n}": (0.1 if n.endswith(".cores.1") else 1e-4) * p.detach().clone()
             for n, p in cores.items() if not n.endswith(".cores.1") or p.abs().sum() > 0}
    delta.update({f"delta.{n}": torch.full_like(p, 0.05) for n, p in cores.items()
                  if f"delta.{n}" not in delta})  # U's zero core moves from zero
    with structlog.testing.capture_logs() as logs:
        method.apply(model, [0, 1, 2], delta)
    plan = method.round_seeds(1)
    assert len(plan) == 2 and set(plan) < {0, 1, 2}
    frozen = ({0, 1, 2} - set(plan)).pop()
    [change] = [e for e in logs if e["event"] == "fedtt_plus_core_change"]  # what the rule saw
    assert change["frozen"] == frozen == change["slowest"] and change["share_of_fastest"] < 0.5
    assert set(change["relative"]) == {0, 1, 2}
    spec = method.update_spec(model, plan)
    assert not any(n.endswith(f".cores.{frozen}") for n in spec)
    update = method.train_round(model, itertools.repeat(fixed_batch("bert")), 1, plan, "c1")
    assert set(update.tensors) <= set(spec) and not any(n.endswith(f".cores.{frozen}") for n in update.tensors)
    again = make("fedtt+", freeze_ratio=0.5)
    again.load_plan_state(method.plan_state())
    assert again.round_seeds(7) == plan
    for _ in range(5):  # uneven moves freeze one index a round, never the last trainable one
        plan = method.round_seeds(0)
        method.apply(model, plan, {f"delta.{n}": 10.0 ** -(3 + core_index(n)) * p
                                   for n, p in cores.items() if core_index(n) in plan})
    assert method.round_seeds(0) == [0]


def test_fedkseed_trains_its_head_first_order_and_catches_up_with_one_summed_vector(tiny):
    """The new head leaves its init (first-order, sent as dense deltas) while the body moves by
    scalars; a client three rounds behind takes one snapshot (the per-candidate sums and the
    head) and reaches the server's state fingerprint, with theta equal to rounding."""
    method = make("fedkseed")
    server, lagging = prepared(tiny, "bert", method), prepared(tiny, "bert", method)
    seeds = method.round_seeds(0)
    assert not method.seeds_per_round and method.head(server)
    for round_id in range(3):
        snap = snapshot(method, server)
        update = train(method, server, "bert", "c1", round_id=round_id)
        assert {k for k in update.tensors if k.startswith("dense.")} == {f"dense.{n}" for n in method.head(server)}
        assert any(float(v.abs().sum()) > 0 for k, v in update.tensors.items() if k.startswith("dense."))
        restore(method, server, snap)
        method.apply(server, seeds, mean((update, 1.0)))
    method.load_snapshot(lagging, method.snapshot_tensors(server))
    assert method.state_fingerprint(lagging) == method.state_fingerprint(server)
    for n, p in method.theta(server).items():
        torch.testing.assert_close(method.theta(lagging)[n], p, rtol=0, atol=1e-6)
    assert set(method.snapshot_spec(server)) == set(method.snapshot_tensors(server))


def test_fedkseed_uploads_one_scalar_per_fixed_candidate(tiny):
    method = make("fedkseed")
    model = prepared(tiny, "llama", method)
    assert method.round_seeds(0) == method.round_seeds(5) and len(method.round_seeds(0)) == 32
    assert not any(p.requires_grad for p in model.parameters())
    update = train(method, model, "llama", "c1")
    assert set(update.tensors) == {"scalars"} and update.tensors["scalars"].shape == (32,)
    assert 1 <= len(update.seeds_used) <= method.cfg.steps


# -- what the server checks of one client's upload -------------------------------------------------
def effective_weights(method: Method, model) -> dict[str, torch.Tensor]:
    """The weights the model computes with, copied: LoRA merged into its base weights, the TT
    adapters' contracted matrices, otherwise the state a round changes."""
    if method.name in ("fedit", "ffa-lora"):
        return {n: p.detach().clone() for n, p in method.export(model).named_parameters()}
    if method.name.startswith("fedtt"):
        from fedkrso.common.methods.fedtt import adapters

        weights = {f"{h}.{part}": getattr(a, part).full().detach().clone()
                   for h, a in adapters(model).items() for part in ("down", "up")}
        return weights | {n: p.detach().clone() for n, p in method.dense(model).items()}
    from fedkrso.common.methods.fedkseed import CUMULATIVE

    return {n: t for n, t in snapshot(method, model).items() if n != CUMULATIVE}  # FedKSeed's sums: no weight


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_update_norm_is_the_norm_of_the_weight_change(tiny, name, family):
    """``update_norm`` (what server.max_update_norm and clip_norm bound) equals the L2 norm of
    the change of the weights the model computes with when the update is applied: the same
    space for every method. FedKSeed's is an estimate (independent Gaussian directions)."""
    method = make(name, **CASES[name].learn)
    model = prepared(tiny, family, method)
    seeds = method.round_seeds(0)
    start, before = snapshot(method, model), effective_weights(method, model)
    update = train(method, model, family, "c1")
    restore(method, model, start)
    norm = method.update_norm(model, seeds, update.tensors)
    method.apply(model, seeds, update.tensors)
    after = effective_weights(method, model)
    moved = math.sqrt(sum(float((after[n].double() - before[n].double()).square().sum()) for n in before))
    assert moved > 0
    assert norm == pytest.approx(moved, rel=0.05 if name == "fedkseed" else 1e-4)
    doubled = {n: 2 * t for n, t in update.tensors.items()}  # linear where the method is
    if name in ("fedkrso", "fedavg", "fedkseed"):
        assert method.update_norm(model, seeds, doubled) == pytest.approx(2 * norm, rel=1e-6)


@pytest.mark.parametrize(("name", "family"), MATRIX, ids=IDS)
def test_honest_uploads_fit_their_clients_keyed_choices(tiny, name, family):
    """The server recomputes a client's keyed choices: an honest upload fits them, the same
    upload claimed by another client key or with ``seeds_used`` altered does not (for the
    methods whose choices are keyed)."""
    method = make(name)
    model = prepared(tiny, family, method)
    seeds = method.round_seeds(0)
    update = train(method, model, family, "c1")
    assert set(update.tensors) <= method.allowed_update_names(model, seeds, 0, "c1")
    assert method.keyed_update_problem(model, seeds, 0, "c1", update.tensors, update.seeds_used) is None
    if name not in ("fedkrso", "fedkseed"):
        return
    assert method.keyed_update_problem(model, seeds, 0, "c1", update.tensors, update.seeds_used[:-1])
    others = [f"c{i}" for i in range(2, 40)]
    assert any(method.keyed_update_problem(model, seeds, 0, c, update.tensors, update.seeds_used) for c in others)


def test_fedkrso_refuses_an_accumulator_for_a_seed_the_client_did_not_draw(tiny):
    method = make("fedkrso", k=4, intervals=1)
    model = prepared(tiny, "bert", method)
    seeds = method.round_seeds(0)
    update = train(method, model, "bert", "c1")
    (drawn,) = method.seed_choices(0, "c1")
    stray = (drawn + 1) % 4
    forged = dict(update.tensors)
    for n, t in update.tensors.items():
        if n.startswith(f"acc.{drawn}."):
            forged[n.replace(f"acc.{drawn}.", f"acc.{stray}.", 1)] = t
    assert not {n for n in forged if n.startswith(f"acc.{stray}.")} <= method.allowed_update_names(model, seeds, 0, "c1")
    problem = method.keyed_update_problem(model, seeds, 0, "c1", forged, sorted({seeds[drawn], seeds[stray]}))
    assert problem == (f"accumulator for seed index {stray}, which client 'c1' did not draw in round 0 "
                       f"(it drew [{drawn}])")


def test_fedkseed_refuses_a_scalar_for_a_candidate_the_client_did_not_draw(tiny):
    method = make("fedkseed")
    model = prepared(tiny, "bert", method)
    seeds = method.round_seeds(0)
    drawn = method.drawn_candidates(0, "c1", len(seeds))
    stray = min(set(range(len(seeds))) - drawn)
    scalars = torch.zeros(len(seeds))
    scalars[stray] = 1.0
    problem = method.keyed_update_problem(model, seeds, 0, "c1", {"scalars": scalars}, [seeds[stray]])
    assert problem == f"non-zero scalar for candidate {stray}, which client 'c1' did not draw in round 0"
