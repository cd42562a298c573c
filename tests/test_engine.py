"""FedKRSO training engine: invariants of docs/algorithm.md sections 2 to 5 on tiny models.

One table of cases (family, K, r, dtype) runs through the same invariants; the tiny models are
built once per module. Float tolerances are derived from the unit roundoff ``u`` of the dtype
doing the arithmetic (``u = eps / 2``: 2**-24 for float32, 2**-8 for bfloat16) and from the
magnitudes involved, so they are neither magic numbers nor loose enough to hide a wrong sum.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from fedkrso.common.aggregate import StreamingAggregator
from fedkrso.common.methods.base import out_in
from fedkrso.common.methods.fedkrso import Config, FedKRSO, SubspaceAdapter
from fedkrso.common.models import load_model, model_fingerprint
from fedkrso.common.subspace import fingerprint, round_seeds, subspace, subspace_fingerprint
from fedkrso.common.tensors import FLAT_BATCH, CodecError, decode, encode, l2_norm, non_finite
from fedkrso.common.wire import TensorAssembler, tensor_batches, update_digest

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TASK = "sequence-classification"
NUM_LABELS = 2
INIT_SEED = 7
RUN_SEED = 11
KEY_TOKENS = torch.tensor([1000, 1001, 1002, 1003])  # first token; label = its index % 2


@dataclass(frozen=True)
class Case:
    family: str
    k: int
    r: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.family}-K{self.k}-r{self.r}-{str(self.dtype).removeprefix('torch.')}"


CASES = [
    Case("bert", 4, 4, torch.float32),
    Case("roberta", 2, 8, torch.float32),
    Case("gpt2", 3, 2, torch.float32),
    Case("llama", 4, 4, torch.float32),
    Case("llama", 2, 4, torch.bfloat16),
    Case("bert", 1, 1, torch.bfloat16),
]
FAMILIES = sorted({c.family for c in CASES})


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


@pytest.fixture(scope="module")
def tiny_dirs(tiny_models) -> dict[str, Path]:
    return {f: tiny_models(f, NUM_LABELS) for f in FAMILIES}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Dropout draws from the global RNG; fix it so every run of a test trains identically."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def make(tiny_dirs, case: Case, **overrides) -> tuple[nn.Module, FedKRSO]:
    model = load_model(str(tiny_dirs[case.family]), TASK, NUM_LABELS, INIT_SEED).to(case.dtype)
    knobs = dict(k=case.k, rank=case.r, intervals=3, interval_steps=2, lr=1e-2) | overrides
    method = FedKRSO(Config(**knobs), run_seed=RUN_SEED)
    method.prepare(model)
    return model, method


def batches(seed: int, batch: int = 4, length: int = 8):
    """Endless batches whose label is a function of the first token (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(2000, 4000, (batch, length), generator=gen)
        which = torch.randint(0, len(KEY_TOKENS), (batch,), generator=gen)
        ids[:, 0] = KEY_TOKENS[which]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": which % 2}


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear convention (out x in); GPT-2's Conv1D stores it transposed."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def snapshot(method: FedKRSO, model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in method.state_parameters(model).items()}


@torch.no_grad()
def restore(method: FedKRSO, model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for n, t in method.state_parameters(model).items():
        t.copy_(snap[n])


# -- section 4: the client invariant -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_change_equals_sum_of_accumulators_times_subspaces(tiny_dirs, case):
    """W_end - W_start == sum_k A_k P_k for every projected matrix, to float rounding.

    Rounding budget per element, with u the unit roundoff of the model dtype:
    * each of the I merges rounds ``W + B P`` to the model dtype: <= u * max(|W|) each;
    * each merge forms ``B P`` as an r-term dot product (in bfloat16 also after rounding B and
      P to bfloat16): <= (r + 3) * u * (|B| |P|); summing the merges' B's into A and the
      reference's float32 P add one more such term. We bound |B| by |A| (B's of one seed do not
      cancel in a handful of steps) and take a factor 2 of slack.
    The difference ``W_end - W_start`` and the reference are computed in float64, exactly."""
    model, method = make(tiny_dirs, case)
    targets = method.targets(model)
    w_start = {n: weight_out_in(m).double().clone() for n, m in targets.items()}
    dense_start = {n: p.detach().clone() for n, p in method.dense(model).items()}
    seeds = method.round_seeds(0)
    update = method.train_round(model, batches(1), 0, seeds, "client-a")

    used = sorted(set(method.seed_choices(0, "client-a")))
    assert update.seeds_used == [seeds[k] for k in used]
    assert update.steps == method.cfg.local_steps() and update.loss > 0
    merges = method.cfg.intervals
    u = unit_roundoff(case.dtype)
    largest_change = 0.0
    for name, module in targets.items():
        d_n = out_in(module)[1]
        expected = torch.zeros_like(w_start[name])
        magnitude = torch.zeros_like(w_start[name])
        for k in used:
            a = update.tensors[f"acc.{k}.{name}"].double()
            p = subspace(seeds[k], name, case.r, d_n).double()
            expected += a @ p
            magnitude += a.abs() @ p.abs()
        w_end = weight_out_in(module).double()
        tol = 2 * (merges * u * (w_start[name].abs().max() + w_end.abs().max())
                   + (merges + 1) * (case.r + 3) * u * magnitude)
        err = (w_end - w_start[name] - expected).abs()
        assert (err <= tol).all(), f"{name}: max err {err.max():.3g} over tolerance"
        largest_change = max(largest_change, expected.abs().max().item())
    # The check means something only when training moved the weights well past the tolerance.
    assert largest_change > 20 * merges * u * max(w.abs().max().item() for w in w_start.values())

    for n, p in method.dense(model).items():
        delta = update.tensors[f"dense.{n}"]
        assert delta.dtype == torch.float32
        assert torch.equal(delta, (p.detach() - dense_start[n]).float())
    assert set(update.tensors) <= set(method.update_spec(model, seeds))
    assert method.required_names(model, seeds) <= set(update.tensors)


# -- sections 5 and 6: server and clients reach the same weights -------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_server_and_client_reconstruct_identical_weights(tiny_dirs, case):
    """Two clients train from one start; the server folds both updates; the server's fresh
    model and a client restored from its snapshot apply the same delta bytes and end
    bit-identical. The result is also the weighted mean of the clients' own weight changes, to
    float32 rounding: each client's W_end carries up to I roundings of u * |W| plus its B P
    products, the server's apply one more rounding and its A P products; 16 * I * u * max|W|
    covers that with slack (the products are of the size of the change, well below |W|)."""
    base, method = make(tiny_dirs, case)
    start = snapshot(method, base)
    start_fp = method.state_fingerprint(base)
    seeds = method.round_seeds(3)
    clients = {"alice": (copy.deepcopy(base), 30.0, 1), "bob": (copy.deepcopy(base), 10.0, 2)}

    agg = StreamingAggregator()
    ends: dict[str, dict[str, torch.Tensor]] = {}
    for key, (model, weight, data_seed) in clients.items():
        update = method.train_round(model, batches(data_seed), 3, seeds, key)
        ends[key] = snapshot(method, model)
        wire = {n: encode(t, method.cfg.wire_dtype) for n, t in update.tensors.items()}
        agg.add({n: decode(e.dtype, e.shape, e.data) for n, e in wire.items()}, weight)
    delta = agg.result()

    server, _ = make(tiny_dirs, case)
    assert method.state_fingerprint(server) == start_fp  # loading is deterministic
    client = clients["alice"][0]
    restore(method, client, start)
    assert method.state_fingerprint(client) == start_fp
    method.apply(server, seeds, delta)
    method.apply(client, seeds, delta)

    assert method.state_fingerprint(server) == method.state_fingerprint(client) != start_fp
    assert model_fingerprint(server) == model_fingerprint(client)

    if case.dtype != torch.float32:
        return  # bfloat16 weights round each client's W_end too coarsely for the linearity check
    u = unit_roundoff(torch.float32)
    total = sum(w for _, w, _ in clients.values())
    new = method.state_parameters(server)
    for name, s in start.items():
        mean_change = sum(w / total * (ends[key][name].double() - s.double())
                          for key, (_, w, _) in clients.items())
        got = new[name].detach().double() - s.double()
        scale = s.abs().max().item() + max(e[name].abs().max().item() for e in ends.values())
        assert torch.allclose(got, mean_change, rtol=0, atol=16 * method.cfg.intervals * u * scale)


# -- section 5: aggregation ----------------------------------------------------------------------


def test_aggregation_is_linear_and_order_independent():
    """Every fold order gives the weighted mean. Three float32 terms: each partial sum and the
    final division round once, so |error| <= 4 u * sum_n w_n |x_n| / sum_n w_n."""
    gen = torch.Generator().manual_seed(0)
    updates = [({"a": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen)}, w)
               for w in (1.0, 2.5, 40.0)]
    total = sum(w for _, w in updates)
    want = {n: sum(w * t[n].double() for t, w in updates) / total for n in ("a", "b")}
    bound = {n: 4 * unit_roundoff(torch.float32) * sum(w * t[n].double().abs() for t, w in updates)
             / total for n in ("a", "b")}
    for order in itertools.permutations(updates):
        for scale in (1.0, 1e3):  # only relative weights matter
            agg = StreamingAggregator()
            for tensors, w in order:
                agg.add(tensors, w * scale)
            got = agg.result()
            assert agg.count == 3 and agg.nbytes() == (15 + 7) * 8  # float64 sums
            for n in want:
                assert ((got[n].double() - want[n]).abs() <= bound[n]).all()

    with pytest.raises(ValueError):
        StreamingAggregator().add({"a": torch.zeros(1)}, 0.0)
    with pytest.raises(ValueError):
        StreamingAggregator().result()


def _keys_with_different_seeds(method: FedKRSO) -> tuple[str, str, int, int]:
    """Two client keys and seed indices: one drawn by the second key only, one by neither."""
    for i, j in itertools.permutations(range(40), 2):
        a, b = f"client-{i}", f"client-{j}"
        used_a, used_b = set(method.seed_choices(0, a)), set(method.seed_choices(0, b))
        only_b = used_b - used_a
        neither = set(range(method.cfg.k)) - used_a - used_b
        if only_b and neither:
            return a, b, min(only_b), min(neither)
    raise AssertionError("no pair of client keys found")


def test_unused_seed_contributes_zero(tiny_dirs):
    """A client uploads accumulators only for the seeds it drew; a seed drawn by one client
    aggregates to that client's accumulator scaled by its weight share (two float32 roundings:
    the multiply and the divide), and a seed nobody drew is absent, so apply adds nothing."""
    case = Case("bert", 4, 4, torch.float32)
    base, method = make(tiny_dirs, case, intervals=2)
    key_a, key_b, only_b, neither = _keys_with_different_seeds(method)
    seeds = method.round_seeds(0)
    names = list(method.targets(base))
    updates = {}
    for key, data_seed in ((key_a, 1), (key_b, 2)):
        update = method.train_round(copy.deepcopy(base), batches(data_seed), 0, seeds, key)
        used = set(method.seed_choices(0, key))
        for k in range(case.k):
            present = {f"acc.{k}.{n}" in update.tensors for n in names}
            assert present == {k in used}, (key, k)
        updates[key] = update

    w_a, w_b = 3.0, 1.0
    agg = StreamingAggregator()
    agg.add(updates[key_a].tensors, w_a)
    agg.add(updates[key_b].tensors, w_b)
    delta = agg.result()
    u = unit_roundoff(torch.float32)
    for n in names:
        assert f"acc.{neither}.{n}" not in delta
        mine = updates[key_b].tensors[f"acc.{only_b}.{n}"]
        want = mine.double() * w_b / (w_a + w_b)
        assert ((delta[f"acc.{only_b}.{n}"].double() - want).abs() <= 2 * u * want.abs()).all()

    # Absent is the same as an explicit zero accumulator for that seed.
    targets = method.targets(base)
    zeros = {f"acc.{neither}.{n}": torch.zeros(out_in(targets[n])[0], case.r) for n in names}
    absent, explicit = copy.deepcopy(base), copy.deepcopy(base)
    method.apply(absent, seeds, delta)
    method.apply(explicit, seeds, delta | zeros)
    assert method.state_fingerprint(absent) == method.state_fingerprint(explicit)


# -- training makes progress --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_goes_down_over_rounds(tiny_dirs, family):
    """Label = first token's index % 2. Eight rounds of train_round, then restore + apply (one
    client, so its update is the round delta): the late rounds' loss is well below the first's."""
    model, method = make(tiny_dirs, Case(family, 4, 4, torch.float32),
                         intervals=2, interval_steps=5, lr=3e-3)
    data = batches(5, batch=8)
    losses = []
    for rnd in range(8):
        start = snapshot(method, model)
        seeds = method.round_seeds(rnd)
        update = method.train_round(model, data, rnd, seeds, "solo")
        restore(method, model, start)
        method.apply(model, seeds, update.tensors)
        losses.append(update.loss)
    late = sum(losses[-3:]) / 3
    assert late < 0.6 * losses[0], losses


# -- section 2: subspaces ----------------------------------------------------------------------

SUBSPACE_SCRIPT = """
import hashlib
from fedkrso.common.subspace import subspace, subspace_fingerprint
p = subspace(123456789, "layer.0.attn.q", 8, 48)
print(hashlib.sha256(p.numpy().tobytes()).hexdigest())
print(subspace_fingerprint([1, 2**62 + 5], {"a.q": (16, 48), "b.up": (8, 20)}, 8))
"""


def _in_process_subspace_digests() -> list[str]:
    p = subspace(123456789, "layer.0.attn.q", 8, 48)
    return [hashlib.sha256(p.numpy().tobytes()).hexdigest(),
            subspace_fingerprint([1, 2**62 + 5], {"a.q": (16, 48), "b.up": (8, 20)}, 8)]


def test_subspace_is_identical_across_processes():
    """Fresh interpreters (different hash randomisation, different global RNG use) rebuild the
    same P bytes and fingerprint as this process."""
    torch.manual_seed(12345)
    state = torch.random.get_rng_state()
    here = _in_process_subspace_digests()
    assert torch.equal(state, torch.random.get_rng_state()), "subspace touched the global RNG"
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", SUBSPACE_SCRIPT], env=env, check=True,
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == here


def test_subspace_depends_on_seed_name_and_rank():
    shapes = {"a.q": (16, 48), "b.up": (8, 20)}
    base = subspace_fingerprint([1, 2], shapes, 8)
    assert subspace_fingerprint([1, 2], shapes, 8) == base
    assert subspace_fingerprint([1, 3], shapes, 8) != base
    assert subspace_fingerprint([1, 2], {"a.k": (16, 48), "b.up": (8, 20)}, 8) != base
    assert subspace_fingerprint([1, 2], shapes, 4) != base
    p = subspace(5, "a.q", 8, 48)
    assert p.shape == (8, 48) and p.dtype == torch.float32
    assert not torch.equal(p, subspace(6, "a.q", 8, 48))
    assert not torch.equal(p, subspace(5, "a.k", 8, 48))
    assert torch.equal(subspace(5, "a.q", 8, 48, dtype=torch.bfloat16), p.to(torch.bfloat16))


def test_fingerprint_covers_scalars_and_empty_tensors():
    one = fingerprint([("s", torch.tensor(1.0)), ("e", torch.zeros(0, 3))])
    assert one == fingerprint([("s", torch.tensor(1.0)), ("e", torch.zeros(0, 3))])
    assert one != fingerprint([("s", torch.tensor(2.0)), ("e", torch.zeros(0, 3))])
    assert one != fingerprint([("s", torch.tensor([1.0])), ("e", torch.zeros(0, 3))])


# -- section 4: the layer math -----------------------------------------------------------------


def _conv1d(d_n: int, d_m: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(d_m, d_n)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_grad_of_b_is_grad_w_times_p_transpose(kind):
    """With W frozen, autograd gives grad_B = grad_W P^T without grad_W. Reference: the slow way,
    a full W_eff = W + B P that requires grad. Both are float32 sums over the N rows and d_n
    columns, so they agree within (N + d_n + d_m) u * (|G|^T |X| |P|^T)."""
    n_rows, d_n, d_m, r = 15, 24, 40, 4
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        layer = nn.Linear(d_n, d_m) if kind == "linear" else _conv1d(d_n, d_m)
    layer.requires_grad_(False)
    adapter = SubspaceAdapter({"layer": layer}, r)
    (b,) = adapter.start(seed=99)
    with torch.no_grad():
        b.copy_(torch.randn(d_m, r, generator=gen) * 0.1)
    p = adapter.p["layer"]
    x = torch.randn(3, 5, d_n, generator=gen)
    g = torch.randn(3, 5, d_m, generator=gen)

    y = layer(x)
    (y * g).sum().backward()

    w_eff = (weight_out_in(layer) + b.detach() @ p).requires_grad_(True)
    y_slow = F.linear(x, w_eff, layer.bias)
    (y_slow * g).sum().backward()
    want = w_eff.grad @ p.T

    u = unit_roundoff(torch.float32)
    x2, g2 = x.reshape(-1, d_n), g.reshape(-1, d_m)
    bound = (n_rows + d_n + d_m) * u * (g2.abs().T @ x2.abs() @ p.abs().T)
    assert ((b.grad - want).abs() <= bound).all()
    assert torch.allclose(y, y_slow, rtol=0, atol=1e-5)
    adapter.close()
    assert torch.equal(layer(x), F.linear(x, weight_out_in(layer), layer.bias))


def _saved_shapes(fn) -> list[tuple[tuple[int, ...], int]]:
    saved: list[tuple[tuple[int, ...], int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_autograd_saves_projected_activation_not_full_input():
    """Memory win of section 4: for a layer deep in the network (its input requires grad),
    autograd keeps x P^T (r columns), never x itself and never a new full-size tensor; the
    only weight-sized tensor saved is the frozen weight itself (needed for grad_x anyway)."""
    n_rows, d_n, d_m, r = 15, 24, 40, 4
    layer = nn.Linear(d_n, d_m).requires_grad_(False)
    adapter = SubspaceAdapter({"layer": layer}, r)
    adapter.start(seed=3)
    x = torch.randn(n_rows, d_n, requires_grad=True)
    weight_storage = layer.weight.untyped_storage().data_ptr()

    saved = _saved_shapes(lambda: layer(x))
    shapes = [s for s, _ in saved]
    assert (n_rows, r) in shapes  # x P^T, what grad_B needs
    assert (n_rows, d_n) not in shapes  # the full input
    for shape, ptr in saved:
        if shape in ((d_m, d_n), (d_n, d_m)):
            assert ptr == weight_storage, "a new full-size tensor was saved"

    # Contrast: plain full fine-tuning of the same layer keeps the full input for grad_W.
    adapter.close()
    layer.weight.requires_grad_(True)
    assert (n_rows, d_n) in [s for s, _ in _saved_shapes(lambda: layer(x))]


# -- section 6: typed tensors ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(3, 5), (7,), (), (0, 4)])
def test_codec_round_trip_is_exact(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen) * 1e3).to(dtype)
        if t.numel() >= 3:
            t.view(-1)[:3] = torch.tensor([float("inf"), -0.0, float("nan")], dtype=dtype)
    else:
        t = torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=dtype)
    enc = encode(t)
    assert len(enc.data) == t.numel() * t.element_size() and enc.shape == shape
    back = decode(enc.dtype, list(enc.shape), enc.data)
    assert back.dtype == dtype and back.shape == t.shape
    assert back.view(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()


def test_codec_casts_to_wire_dtype():
    t = torch.randn(4, 4)
    enc = encode(t, "bfloat16")
    assert enc.dtype == "bfloat16" and len(enc.data) == 32
    assert torch.equal(decode(enc.dtype, enc.shape, enc.data), t.to(torch.bfloat16))


@pytest.mark.parametrize(
    "dtype,shape,nbytes",
    [
        ("float32", (2, 3), 23),      # one byte short
        ("float32", (2, 3), 25),      # one byte over
        ("bfloat16", (4,), 16),       # float32-sized payload for a bfloat16 header
        ("float8", (1,), 1),          # unknown dtype
        ("pickle", (1,), 8),          # unknown dtype
        ("float32", (-1, 2), 0),      # negative dimension
        ("float32", (1,) * 9, 4),     # too many dimensions
    ],
)
def test_codec_rejects_bad_descriptions(dtype, shape, nbytes):
    with pytest.raises(CodecError):
        decode(dtype, shape, b"\0" * nbytes)


def test_assembler_digest_is_the_update_digest_without_decoding():
    """The server hashes an update from its bytes as they arrived (``TensorAssembler.digest``)
    instead of from the decoded tensors: the very ``update_digest`` a client sends, for every
    dtype, shape and chunking, a 0-d and an empty tensor included."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"acc.0.w": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "n": torch.arange(6, dtype=torch.int64)}
    for chunk in (8, 1 << 20):
        asm = TensorAssembler()
        for batch in tensor_batches(tensors, None, chunk):
            asm.add(batch)
        decoded = asm.finish()
        assert asm.digest() == update_digest(tensors) == update_digest(decoded)


def test_non_finite_names_the_tensor_and_l2_norm_sums_every_element():
    t = {f"t{i}": torch.full((3, 2), float(i)) for i in range(40)} | {"big": torch.ones(FLAT_BATCH + 5)}
    assert non_finite(t) is None
    assert l2_norm(t.values()) == pytest.approx(math.sqrt(sum(6 * i * i for i in range(40)) + FLAT_BATCH + 5))
    t["t17"][1, 0] = float("nan")
    assert non_finite(t) == "t17"
    t["t17"][1, 0], t["big"][-1] = 0.0, float("inf")
    assert non_finite(t) == "big"


def test_codec_rejects_unknown_wire_dtype():
    with pytest.raises(CodecError):
        encode(torch.zeros(2), "float8")
    with pytest.raises(CodecError):
        encode(torch.zeros(2, dtype=torch.complex64))


# -- section 2/4: seeds ----------------------------------------------------------------------


def test_round_seeds_reproducible_and_fresh_each_round():
    rounds = [round_seeds(RUN_SEED, t, 4) for t in range(20)]
    assert rounds == [round_seeds(RUN_SEED, t, 4) for t in range(20)]
    flat = [s for seeds in rounds for s in seeds]
    assert len(set(flat)) == len(flat)  # distinct within and across rounds
    assert all(0 <= s < 2**63 for s in flat)
    assert round_seeds(RUN_SEED + 1, 0, 4) != rounds[0]
    assert round_seeds(RUN_SEED, 0, 6)[:4] == rounds[0]  # K only extends the list
    method = FedKRSO(Config(k=4), run_seed=RUN_SEED)
    assert method.round_seeds(3) == rounds[3]


def test_seed_choices_reproducible_from_run_round_and_client():
    cfg = Config(k=4, intervals=6)
    one, two = FedKRSO(cfg, run_seed=RUN_SEED), FedKRSO(cfg, run_seed=RUN_SEED)
    assert one.seed_choices(2, "alice") == two.seed_choices(2, "alice")
    choices = one.seed_choices(2, "alice")
    assert len(choices) == 6 and all(0 <= k < 4 for k in choices)
    # Changing any of the three inputs changes the draw (for some of a few alternatives).
    assert any(one.seed_choices(2, f"c{i}") != choices for i in range(5))
    assert any(one.seed_choices(t, "alice") != choices for t in range(3, 8))
    assert any(FedKRSO(cfg, run_seed=s).seed_choices(2, "alice") != choices for s in range(5))
    # Over many clients, every seed index gets drawn (uniform choice, not a constant).
    assert {k for i in range(50) for k in one.seed_choices(0, f"c{i}")} == set(range(4))
