"""Devices and precision (common/precision.py): the precision rule, parties of different dtypes
agreeing bit for bit, the fused subspace layer in bfloat16, and a real run of a float32 server
with a bfloat16 client (and the reverse) that must agree on every round's fingerprint.

Everything runs on the CPU (torch computes bfloat16 and float16 there); a GPU party differs
from a CPU party of the same dtype only in the device the same code runs on.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from conftest import log_events, run_cluster
from fedkrso.common.aggregate import StreamingAggregator
from fedkrso.common.config import parse_config
from fedkrso.common.methods import build_method
from fedkrso.common.methods.fedkrso import SubspaceAdapter
from fedkrso.common.methods.fedkseed import CUMULATIVE
from fedkrso.common.models import build_llama, load_model, model_fingerprint
from fedkrso.common.precision import (Placement, PlacementError, dtype_of, master, placement_of,
                                      resolve_device, resolve_placement)
from fedkrso.server.coordinator import run_identity
from method_cases import CASES, small
from test_golden import METHODS as GOLDEN_METHODS, golden_config, golden_data, recorded_runs  # noqa: F401

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TASK = "sequence-classification"


def u(dtype: torch.dtype) -> float:
    """Unit roundoff of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def batches(seed: int, batch: int = 4, length: int = 8):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(2000, 4000, (batch, length), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}


def party(path, method: dict, dtype: torch.dtype):
    """A party as a client or the server builds it: load, fingerprint, prepare, place."""
    cfg = parse_config({"model": {"name": str(path)}, "method": method})
    meth = build_method(cfg.method, 3)
    model = load_model(str(path), TASK, 2, 3)
    identity = model_fingerprint(model)
    meth.prepare(model)
    meth.place(model, Placement(CPU, dtype))
    return meth, model, identity


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    return tiny_models("llama", 2)


# -- placement ---------------------------------------------------------------------------------
def test_devices_and_dtypes_resolve_or_fail_precisely(monkeypatch):
    monkeypatch.delenv("FEDKRSO_DEVICE", raising=False)
    monkeypatch.delenv("FEDKRSO_DTYPE", raising=False)
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == (torch.device("mps") if torch.backends.mps.is_available() else CPU)
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(PlacementError, match="no CUDA device"):
                resolve_device(spec)
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(PlacementError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(PlacementError, match="unknown dtype"):
        dtype_of("int8")
    p = resolve_placement("cpu", "bfloat16")
    assert (p.device, p.dtype, p.low_precision, str(p)) == (CPU, torch.bfloat16, True, "cpu/bfloat16")
    assert resolve_placement("cpu", "bfloat16", dtype_override="float32").low_precision is False


def test_round_yaml_fields_and_run_identity(tiny_bert, tmp_path):
    """device and dtype are each party's own: not part of the run's identity; a revision is."""
    base = {"model": {"name": str(tiny_bert)}, "method": {"name": "fedkrso"}}
    cfg = parse_config(base)
    assert (cfg.model.device, cfg.model.dtype, cfg.model.revision) == ("cpu", "float32", None)
    other = parse_config({**base, "model": {"name": str(tiny_bert), "device": "cuda:1", "dtype": "bfloat16"}})
    assert run_identity(other) == run_identity(cfg)
    pinned = parse_config({**base, "model": {"name": str(tiny_bert), "revision": "v1.0"}})
    assert run_identity(pinned) != run_identity(cfg)
    for field, bad in (("device", "gpu0"), ("dtype", "int8")):
        with pytest.raises(ValueError, match=f"model.{field}"):
            parse_config({**base, "model": {"name": str(tiny_bert), field: bad}})


# -- the rule -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_state_and_trainables_float32_frozen_in_the_dtype(tiny_llama, name):
    meth, model, _ = party(tiny_llama, small(name), torch.bfloat16)
    state = meth.state_parameters(model)
    wide = {"fedkseed": {CUMULATIVE}}.get(name, set())  # FedKSeed's per-candidate sums: float64
    assert all(t.dtype == (torch.float64 if k in wide else torch.float32) for k, t in state.items())  # rule 1
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # rule 2
    state_ids = {id(t) for t in state.values()}
    frozen = [p for p in model.parameters() if not p.requires_grad and id(p) not in state_ids]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # rule 3
    assert bool(frozen) == (name != "fedavg")  # full fine-tuning freezes nothing
    assert model.get_input_embeddings().weight.dtype == (torch.float32 if name == "fedavg" else torch.bfloat16)
    assert placement_of(model) == Placement(CPU, torch.bfloat16)
    mastered = meth.mastered(model)
    assert bool(mastered) == (name == "fedkrso")
    fp32_party = party(tiny_llama, small(name), torch.float32)[1]
    for module_name, module in mastered.items():  # rule 5: exact float32 master, bfloat16 copy
        source = fp32_party.get_submodule(module_name).weight
        assert master(module).device == CPU and torch.equal(master(module), source)
        assert module.weight.dtype == torch.bfloat16 and torch.equal(module.weight, source.to(torch.bfloat16))
        assert master(fp32_party.get_submodule(module_name)) is None  # float32: the weight is the master


@pytest.mark.parametrize("name", sorted(CASES))
def test_parties_of_every_dtype_agree_bit_for_bit(tiny_llama, name):
    """Three parties in float32, bfloat16 and float16 start with the same identity and state
    fingerprints, train differently (their own precision), apply the same mean delta and end
    with the same state fingerprint again."""
    parties = {dt: party(tiny_llama, small(name), dt) for dt in DTYPES}
    assert len({(ident, m.state_fingerprint(model)) for m, model, ident in parties.values()}) == 1
    start = parties[torch.float32][0].state_fingerprint(parties[torch.float32][1])
    seeds = parties[torch.float32][0].round_seeds(0)
    agg, uploads = StreamingAggregator(), {}
    for dt, (meth, model, _) in parties.items():
        snap = meth.training_snapshot(model)
        update = meth.train_round(model, batches(1), 0, seeds, "client")
        meth.restore(model, snap)
        assert meth.state_fingerprint(model) == start, f"{dt}: restore is not bit for bit"
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in update.tensors.values())
        uploads[dt] = {k: v.cpu() for k, v in update.tensors.items()}
        agg.add(uploads[dt], 1.0)
    # each party computed in its own precision: the low-precision uploads differ from float32's
    for dt in (torch.bfloat16, torch.float16):
        assert any(not torch.equal(uploads[dt][k], uploads[torch.float32][k]) for k in uploads[dt]), dt
    delta = agg.result()
    for meth, model, _ in parties.values():
        meth.apply(model, seeds, delta)
    after = {m.state_fingerprint(model) for m, model, _ in parties.values()}
    assert len(after) == 1 and after != {start}


def test_fedkrso_trains_the_compute_copy_and_restores_it_from_the_master(tiny_llama):
    meth, model, _ = party(tiny_llama, small("fedkrso"), torch.bfloat16)
    targets = meth.targets(model)
    snap = meth.training_snapshot(model)
    assert set(snap) == {f"dense.{n}".removeprefix("dense.") for n in meth.dense(model)}  # no masters copied
    masters_before = {n: master(m).clone() for n, m in targets.items()}
    meth.train_round(model, batches(2), 0, meth.round_seeds(0), "client")
    moved = [n for n, m in targets.items() if not torch.equal(m.weight, masters_before[n].to(torch.bfloat16))]
    assert moved, "training merged B P into the compute copies"
    assert all(torch.equal(master(m), masters_before[n]) for n, m in targets.items()), "masters untouched"
    meth.restore(model, snap)
    assert all(torch.equal(m.weight, master(m).to(torch.bfloat16)) for m in targets.values())


def test_fedkrso_export_saves_the_float32_masters(tiny_llama, tmp_path):
    meth, model, _ = party(tiny_llama, small("fedkrso"), torch.bfloat16)
    seeds = meth.round_seeds(0)
    update = meth.train_round(model, batches(3), 0, seeds, "client")
    meth.restore(model, {})
    meth.apply(model, seeds, {k: v.cpu() for k, v in update.tensors.items()})
    live = {n: m.weight for n, m in meth.targets(model).items()}
    meth.export(model).save_pretrained(tmp_path / "final")
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    for name, module in meth.targets(model).items():
        assert saved[f"{name}.weight"].dtype == torch.float32
        assert torch.equal(saved[f"{name}.weight"], master(module))
        assert module.weight is live[name] and module.weight.dtype == torch.bfloat16  # the live model is unchanged
    emb = "model.embed_tokens.weight"
    assert saved[emb].dtype == torch.bfloat16


def test_a_bfloat16_checkpoint_loads_at_its_precision_and_places_without_rounding(tmp_path):
    """A checkpoint loads at its own precision whatever the party computes with; the identity
    is taken there, and a float32 party's state is the exact upcast of the bfloat16 values."""
    path = build_llama(tmp_path / "ll", hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, vocab=31000)
    model = load_model(str(path), "causal-lm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == 2 * 31000 * 32 + 2 * (
        2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    method = {"name": "fedkrso", "k": 2, "rank": 2, "intervals": 1, "interval_steps": 1}
    cfg = parse_config({"model": {"name": str(path), "task": "causal-lm"}, "method": method})
    states = {}
    for dt in (torch.float32, torch.bfloat16):
        m = load_model(str(path), "causal-lm")
        meth = build_method(cfg.method, 0)
        meth.prepare(m)
        meth.place(m, Placement(CPU, dt))
        states[dt] = meth.state_fingerprint(m)
        q = m.model.layers[0].self_attn.q_proj
        assert torch.equal(meth.state_parameters(m)["model.layers.0.self_attn.q_proj.weight"],
                           model.model.layers[0].self_attn.q_proj.weight.float())
        assert (q.weight.dtype, m.lm_head.weight.dtype) == (dt, dt)
    assert states[torch.float32] == states[torch.bfloat16]
    # the identity is of values: a float32 copy of the checkpoint is the same model, a
    # bfloat16 copy of a float32 model is not
    upcast = load_model(str(path), "causal-lm").float()
    upcast.save_pretrained(tmp_path / "fp32")
    again = load_model(str(tmp_path / "fp32"), "causal-lm")
    assert again.lm_head.weight.dtype == torch.float32
    assert model_fingerprint(again) == model_fingerprint(model)
    with torch.no_grad():
        again.lm_head.weight.add_(torch.finfo(torch.float32).eps)  # float32 values off the bfloat16 grid
    assert model_fingerprint(again) != model_fingerprint(again.to(torch.bfloat16))


# -- the fused layer in bfloat16 -----------------------------------------------------------------
def test_fused_layer_in_bfloat16_matches_a_float64_reference():
    """A bfloat16 layer with a float32 B, fed a float32 x (as after a float32 norm) under
    autocast: y in bfloat16, grad_B in float32, grad_x back in float32. Against a float64
    reference on the same rounded inputs, each output rounds a few times in bfloat16 (x to
    bfloat16, x P^T, the product sums, B to bfloat16): within 4 u M, where M sums the
    magnitudes of the terms; the B term is made large enough that leaving it out would fail."""
    n, d_n, d_m, r = 12, 24, 40, 4
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        layer = nn.Linear(d_n, d_m).to(torch.bfloat16).requires_grad_(False)
    adapter = SubspaceAdapter({"layer": layer}, r)
    (b,) = adapter.start(seed=5)
    assert b.dtype == torch.float32 and adapter.p["layer"].dtype == torch.bfloat16
    with torch.no_grad():
        b.copy_(torch.randn(d_m, r, generator=gen))
    x = torch.randn(n, d_n, generator=gen, requires_grad=True)
    g = torch.randn(n, d_m, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * g).sum().backward()
    assert b.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    f = lambda t: t.detach().double()  # noqa: E731
    xb, w, p, bias = f(x.to(torch.bfloat16)), f(layer.weight), f(adapter.p["layer"]), f(layer.bias)
    bb = f(b.to(torch.bfloat16))
    want_y = xb @ w.T + bias + (xb @ p.T) @ bb.T
    mag_y = xb.abs() @ w.abs().T + bias.abs() + (xb.abs() @ p.abs().T) @ bb.abs().T
    ub = u(torch.bfloat16)
    assert ((f(y) - want_y).abs() <= 4 * ub * mag_y).all()
    assert ((xb @ p.T) @ bb.T).abs().max() > 20 * (4 * ub * mag_y).max()
    gb = f(g.to(torch.bfloat16))
    want_b = gb.T @ (xb @ p.T)
    assert ((f(b.grad) - want_b).abs() <= 4 * ub * (gb.abs().T @ (xb.abs() @ p.abs().T))).all()
    want_x = gb @ w + (gb @ bb) @ p
    assert ((f(x.grad) - want_x).abs() <= 4 * ub * (gb.abs() @ w.abs() + (gb.abs() @ bb.abs()) @ p.abs())).all()
    adapter.close()


def test_fused_layer_in_bfloat16_saves_only_the_projection():
    """The memory win holds in bfloat16 too: a float32 x cast for the layer is not kept."""
    n, d_n, d_m, r = 15, 24, 40, 4
    layer = nn.Linear(d_n, d_m).to(torch.bfloat16).requires_grad_(False)
    adapter = SubspaceAdapter({"layer": layer}, r)
    adapter.start(seed=3)
    x = torch.randn(n, d_n, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    assert (n, r) in shapes and (n, d_n) not in shapes
    adapter.close()


# -- a real run: parties of different dtypes --------------------------------------------------------
MIXED = {
    # method, round.yaml dtype (the server's and shard1's), the clients' extra arguments
    "fedkrso": ("float32", [["--dtype", "bfloat16"], []]),
    "fedit": ("bfloat16", [[], ["--dtype", "float32"]]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXED))
def test_parties_of_different_dtypes_agree_on_every_round(tmp_path, tiny_bert, golden_data, name):
    """A real server and two real clients, one of them in bfloat16 and one in float32, the
    server in either: every client checks the server's state fingerprint before each round it
    trains and at the end, so the run finishing with every process exiting 0 is the proof."""
    dtype, client_args = MIXED[name]
    cfg = golden_config(tiny_bert, tmp_path / "out", GOLDEN_METHODS[name])
    cfg["model"]["dtype"] = dtype
    run = run_cluster(tmp_path, cfg, golden_data, clients=2, client_args=client_args)
    assert [r["round"] for r in run.rows] == [0, 1, 2]
    placed = {p.name: log_events(p.text(), "model_placed")[0]["placement"]
              for p in [run.cluster.server, *run.cluster.clients]}
    assert placed == {"server": f"cpu/{dtype}", "shard0": "cpu/bfloat16", "shard1": "cpu/float32"}
    for row in run.rows:
        assert row["client_accelerator_peak_bytes"] == 0  # CPU clients: no accelerator
        assert all(c["accelerator_peak_bytes"] == 0 for c in row["per_client"].values())
    for client in run.reports.values():
        assert client["rounds_trained"] and client["state_fingerprint"] == run.final_fingerprint
    recorded = recorded_runs()
    if recorded is not None:  # the bfloat16 party's updates really were its own
        assert [r["state_fingerprint"] for r in run.rows] != recorded[name]


# -- one copy on the server ------------------------------------------------------------------------
def test_concurrent_snapshot_downloads_share_one_copy_of_the_state(tiny_bert, tmp_path):
    """Streams serving the same round's snapshot get one shared copy, freed with the last of
    them; the copy is the state, in host memory."""
    import asyncio
    import gc
    import weakref

    from conftest import round_config
    from fedkrso.server.coordinator import Coordinator

    coord = Coordinator(parse_config(round_config(tiny_bert, tmp_path / "out")))

    async def go() -> None:
        a, fp = await coord.snapshot(0)
        b, _ = await coord.snapshot(0)
        assert a is b and fp == coord.state_fingerprints[0]
        state = coord.method.state_parameters(coord.model)
        assert set(a) == set(state) and all(torch.equal(a[k], state[k]) and a[k] is not state[k] for k in a)
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        c, _ = await coord.snapshot(0)
        assert set(c) == set(state)

    asyncio.run(go())


def test_bench_passes_device_and_dtype_to_every_run(tmp_path):
    """``fedkrso-bench --device/--dtype`` (the bench YAML's model section) reach the round.yaml
    of every run, which validates them."""
    from fedkrso.bench.config import BenchConfig, ModelSpec
    from fedkrso.bench.cells import Cell, round_yaml

    cfg = BenchConfig(methods=[{"name": "fedkrso"}], model=ModelSpec(device="cuda:1", dtype="bfloat16"))
    cell = Cell(spec=cfg.methods[0], lr=1e-3, seed=1, rounds=1, split="val")
    rc = parse_config(round_yaml(cfg, cell, tmp_path, tmp_path / "out", 2))
    assert (rc.model.device, rc.model.dtype) == ("cuda:1", "bfloat16")
    with pytest.raises(ValueError, match="device"):
        ModelSpec(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_a_device_that_is_not_there_is_a_bad_flag(tiny_bert, tmp_path):
    """fedkrso-server and fedkrso-client refuse a missing device with exit status 2 and a
    message naming it, before loading anything or joining."""
    import subprocess
    import sys

    from conftest import round_config, write_round_yaml
    from fedkrso.bench.launch import child_env

    config = write_round_yaml(tmp_path / "round.yaml", round_config(tiny_bert, tmp_path / "out"))
    runs = {
        "server": [sys.executable, "-m", "fedkrso.server.main", "--config", str(config), "--device", "cuda"],
        "client": [sys.executable, "-m", "fedkrso.client.main", "--server", "127.0.0.1:1", "--data",
                   str(tmp_path), "--device", "cuda:1"],
    }
    for role, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
        assert proc.returncode == 2, (role, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "no CUDA device" in proc.stdout + proc.stderr, role
    env = child_env({"FEDKRSO_DEVICE": "cuda"})
    proc = subprocess.run(runs["server"][:-2], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    """The prepared GPU measurement, dry: CPU, a tiny LLaMA, one arm and the federated run of a
    server and 2 clients; its report carries the figures a GPU run fills in."""
    import subprocess
    import sys

    from fedkrso.bench.launch import child_env

    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "fedkrso.bench.gpu_check", "--out", str(out), "--dry-run",
                           "--arms", "fedkrso,fft", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["args"]["device"] == "cpu" and set(report["arms"]) == {"fedkrso", "fft"}
    for arm in report["arms"].values():
        assert arm["placement"] == "cpu/bfloat16" and arm["peak_rss"] >= arm["loaded_rss"] > 0
        assert len(arm["step_seconds"]) == 2 and arm["accelerator_peak_bytes"] == 0
    assert report["arms"]["fedkrso"]["trainable"] < report["arms"]["fft"]["trainable"]
    fed = report["federated"]
    assert [r["round"] for r in fed["rounds"]] == [0]
    assert set(fed["rounds"][0]["per_client_accelerator_peak_bytes"]) == {"shard0", "shard1"}
    assert {p["placement"] for p in fed["placed"].values()} == {"cpu/float32", "cpu/bfloat16"}
    assert "| fedkrso |" in (out / "gpu_check.md").read_text()
