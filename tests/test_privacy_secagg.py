"""Secure aggregation against a real server: an in-process coordinator behind the real gRPC
service (hand-driven clients that can stop between any two steps, to drop out), and real
server and client processes. The crypto is the real one throughout.

What is checked: the unmasked sum equals the plain sum up to the fixed-point step; the
server's view of one client's masked input is uniform over the ring and independent of the
update (two very different updates give indistinguishable masked vectors); clients that drop
out after sharing keys, or after sending their masked input, are recovered while at least t
remain; with fewer than t the round fails with a precise status and the run goes on.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from conftest import log_events, round_config, run_cluster, wait_until
from fedkrso.client.secagg import SecureSubmission
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.common.participant import PreparedUpdate
from fedkrso.common.privacy import shamir
from fedkrso.common.privacy.secagg import encode, fixed_point_bits, threshold
from fedkrso.server.clock import FakeClock
from fedkrso.v1 import coordinator_pb2 as pb
from test_reliability import Fake

SA = {"enabled": True, "phase_timeout_s": 3.0, "value_bound": 1.0}


def secure_server(server_factory, clients: int, rounds: int = 3, clock=None, **privacy):
    return server_factory(clock, rounds={"total": rounds, "clients_per_round": clients, "min_clients": 2,
                                         "deadline_s": 60},
                          training={"weighting": "uniform", "batch_size": 8},
                          privacy={"secure_aggregation": SA, **privacy})


def call(fake: Fake):
    return lambda fn, arg, timeout: fn(arg, metadata=fake.md, timeout=timeout)


def submission(srv, fake: Fake, header: pb.RoundHeader, tensors: dict[str, torch.Tensor]) -> SecureSubmission:
    coord = srv.coord
    spec = coord.method.update_spec(coord.model, list(header.seeds))
    update = PreparedUpdate(round=int(header.round), tensors=tensors, digest="", num_samples=fake.num_samples,
                            loss=0.5, steps=1)
    return SecureSubmission(fake.stub, call(fake), fake.run_id, fake.client_id, update, spec,
                            coord.cfg.privacy.secure_aggregation, 60)


def random_update(srv, header, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    coord = srv.coord
    spec = coord.method.update_spec(coord.model, list(header.seeds))
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(s, generator=gen) * 2 - 1) * scale for n, s in sorted(spec.items())}


def drive(subs: dict[str, SecureSubmission], stop: dict[str, str],
          meanwhile: Callable[[], None] | None = None) -> dict[str, object]:
    """Run every client's steps concurrently; client c stops before step ``stop[c]``
    (``masked`` or ``unmask``); ``meanwhile`` runs in this thread as they do (it moves a fake
    clock past the phases the stopped clients miss). Returns each client's
    UnmaskingResponse or the RpcError."""

    def one(name: str, sub: SecureSubmission):
        try:
            sub.confirm(sub.share(sub.advertise()))
            if stop.get(name) == "masked":
                return "stopped"
            sub.submit(0, 1 << 16)
            if stop.get(name) == "unmask":
                return "stopped"
            return sub.unmask()
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(len(subs)) as pool:
        futures = {n: pool.submit(one, n, s) for n, s in subs.items()}
        if meanwhile is not None:
            meanwhile()
        return {n: f.result(timeout=120) for n, f in futures.items()}


def time_out(srv, phase: str, answered: set[str]) -> None:
    """Once exactly ``answered`` answered ``phase`` (the others stopped), move the server's
    fake clock past the phase's timeout: the silent are out, no real second waited."""

    def got() -> set[str]:
        sa = srv.coord.secagg.current
        ph = sa.phases.get(phase) if sa is not None else None
        return set(ph.got) if ph is not None else set()

    wait_until(lambda: got() == answered, 60, f"{sorted(answered)} to answer {phase}")
    srv.advance(SA["phase_timeout_s"] + 0.1)


def submitters(srv, round_id: int) -> list[str]:
    """Whose masked inputs round ``round_id`` summed, from the server's own state (the rows
    name nobody under secure aggregation)."""
    return sorted(c for (r, c) in srv.coord.accepted_digests if r == round_id)


def closed_row(srv, round_id: int) -> dict:
    wait_until(lambda: any(r["round"] == round_id for r in srv.coord.metrics.rows()), 60, f"round {round_id} row")
    return next(r for r in srv.coord.metrics.rows() if r["round"] == round_id)


def test_shamir_t_of_n_rebuilds_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    assert shamir.combine({x: shares[x] for x in (1, 3, 5, 2)}, 3) == secret
    with pytest.raises(shamir.ShamirError):
        shamir.combine({x: shares[x] for x in (1, 2)}, 3)
    # a share presented at the wrong point rebuilds something else (size=66: any field element)
    assert shamir.combine({1: shares[1], 2: shares[2], 9: shares[3]}, 3, size=66)[-32:] != secret


def test_fixed_point_has_headroom_for_every_client():
    f = fixed_point_bits(1.0, 100, 32)
    assert 100 * 1.0 * 2**f < 2**31 <= 100 * 1.0 * 2 ** (f + 1)
    vec = encode({"x": torch.full((4,), -1.0)}, {"x": (4,)}, f, 32)
    total = sum(vec.astype(np.uint64) for _ in range(100)) % 2**32
    assert (total.astype(np.uint32).view(np.int32) == -100 * 2**f).all()
    assert threshold(5, 0.5) == 3 and threshold(2, 0.5) == 2 and threshold(10, 0.9) == 10


def test_config_refuses_what_secure_aggregation_cannot_do():
    base = {"model": {"name": "x"}, "method": {"name": "fedkrso"}, "training": {"weighting": "uniform"},
            "rounds": {"min_clients": 2}, "privacy": {"secure_aggregation": {"enabled": True}}}
    parse_config(base)
    for bad, match in (({"server": {"clip_norm": 1.0}}, "never sees an update"),
                       ({"training": {"weighting": "samples"}}, "weighting: uniform"),
                       ({"rounds": {"min_clients": 1}}, "min_clients >= 2"),
                       ({"privacy": {"secure_aggregation": {"enabled": True},
                                     "dp": {"mode": "central", "noise_multiplier": 1, "amplification": True}}},
                        "amplification")):
        with pytest.raises(ConfigError, match=match):
            parse_config({**base, **bad})


def test_unmasked_sum_is_exact_and_masked_inputs_reveal_nothing(server_factory):
    """Four clients, two of them with very different updates (zeros, and values at the bound):
    the released mean is the plain mean up to half a fixed-point step; each masked vector is
    uniform over the ring, uncorrelated with its update, and the two are indistinguishable."""
    srv = secure_server(server_factory, 4)
    fakes = [Fake(srv, f"c{i}") for i in range(4)]
    headers = {f.client_id: f.wait_train() for f in fakes}
    h = headers["c0"]
    updates = {"c0": {n: torch.zeros_like(t) for n, t in random_update(srv, h, 0).items()},
               "c1": {n: torch.sign(t) * 0.999 for n, t in random_update(srv, h, 1).items()},
               "c2": random_update(srv, h, 2), "c3": random_update(srv, h, 3)}
    subs = {f.client_id: submission(srv, f, headers[f.client_id], updates[f.client_id]) for f in fakes}
    seen = {}

    def capture(name):  # what the server receives: the bytes the client streams
        sub = subs[name]
        original = sub.masked_input

        def wrapped():
            seen[name] = original()
            return seen[name]
        sub.masked_input = wrapped

    for name in subs:
        capture(name)
    results = drive(subs, {})
    assert all(isinstance(r, pb.UnmaskingResponse) and len(r.survivors) == 4 for r in results.values()), results
    row = closed_row(srv, 0)
    assert row["secagg"]["survivors"] == 4 and row["secagg"]["failed"] is None
    step = row["secagg"]["fixed_point_step"]
    delta = srv.coord.deltas[0].tensors
    for name in updates["c0"]:
        plain = sum(u[name].double() for u in updates.values()) / 4
        assert (delta[name].double() - plain).abs().max() <= step / 2 + 1e-6 * plain.abs().max() + 1e-9, name

    v0, v1 = (seen[c]["masked"].numpy().view(np.uint32) for c in ("c0", "c1"))
    plain1 = encode(updates["c1"], subs["c1"].spec, subs["c1"].f, 32).view(np.int32).astype(np.float64)
    n = v0.size
    assert n > 2000
    for v in (v0, v1):
        counts = np.bincount(v >> 24, minlength=256)  # top byte: uniform over 256 values
        assert stats.chisquare(counts).pvalue > 1e-4
        assert abs(np.corrcoef(v.astype(np.float64), plain1)[0, 1]) < 5 / math.sqrt(n)
    assert stats.ks_2samp(v0.astype(np.float64), v1.astype(np.float64)).pvalue > 1e-4
    # the plaintext of c1 is far from uniform: the same tests tell it apart at once
    assert stats.ks_2samp(plain1 % 2**32, v0.astype(np.float64)).pvalue < 1e-6
    for f in fakes:
        f.close()


def test_dropouts_after_sharing_and_after_masking_are_recovered(server_factory):
    """Five clients (t = 3): c4 drops after sharing keys (no masked input: its pairwise masks
    are removed with its key rebuilt from shares), c3 after sending its masked input (never
    reveals: its input stays in the sum, its self mask is rebuilt). The mean is over the four
    inputs, exact to the step."""
    srv = secure_server(server_factory, 5, clock=FakeClock())
    fakes = [Fake(srv, f"c{i}") for i in range(5)]
    headers = {f.client_id: f.wait_train() for f in fakes}
    updates = {c: random_update(srv, headers[c], i) for i, c in enumerate(sorted(headers))}
    subs = {f.client_id: submission(srv, f, headers[f.client_id], updates[f.client_id]) for f in fakes}
    results = drive(subs, {"c4": "masked", "c3": "unmask"},
                    lambda: (time_out(srv, "masked", {"c0", "c1", "c2", "c3"}),
                             time_out(srv, "unmask", {"c0", "c1", "c2"})))
    for c in ("c0", "c1", "c2"):
        assert list(results[c].survivors) == ["c0", "c1", "c2", "c3"] and list(results[c].dropped) == ["c4"]
    row = closed_row(srv, 0)
    assert row["secagg"]["dropped_after_sharing"] == 1 and row["secagg"]["survivors"] == 4
    assert row["num_clients"] == 4 and row["num_dropped"] == 1 and submitters(srv, 0) == ["c0", "c1", "c2", "c3"]
    step = row["secagg"]["fixed_point_step"]
    for name, t in srv.coord.deltas[0].tensors.items():
        plain = sum(updates[c][name].double() for c in ("c0", "c1", "c2", "c3")) / 4
        assert (t.double() - plain).abs().max() <= step / 2 + 1e-6, name
    for f in fakes:
        f.close()


def test_too_few_survivors_fail_the_round_cleanly_and_the_run_goes_on(server_factory):
    """Four clients (t = 3), two stop after sharing keys: two masked inputs cannot be unmasked.
    The survivors' Unmasking answers ABORTED with the reason, the round closes without changing
    the model, and the next round opens for everyone."""
    srv = secure_server(server_factory, 4, clock=FakeClock())
    fakes = [Fake(srv, f"c{i}") for i in range(4)]
    headers = {f.client_id: f.wait_train() for f in fakes}
    before = srv.coord.state_fingerprints[0]
    subs = {f.client_id: submission(srv, f, headers[f.client_id], random_update(srv, headers[f.client_id], 0))
            for f in fakes}
    results = drive(subs, {"c2": "masked", "c3": "masked"}, lambda: time_out(srv, "masked", {"c0", "c1"}))
    for c in ("c0", "c1"):
        err = results[c]
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.ABORTED, err
        assert "2 client(s) sent masked inputs, fewer than the threshold t=3" in err.details()
    row = closed_row(srv, 0)
    assert row["secagg"]["failed"] and row["num_clients"] == 0
    assert srv.coord.state_fingerprints[1] == before
    nxt = {f.client_id: f.wait_train() for f in fakes}
    assert {h.round for h in nxt.values()} == {1}
    # a phase call out of turn gets a precise status
    code = None
    try:
        fakes[0].stub.ShareKeys(pb.ShareKeysRequest(run_id=fakes[0].run_id, round=1), metadata=fakes[0].md, timeout=10)
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not collecting share" in details
    # a survivor that reaches Unmasking only after the failed round closed (the next one open)
    # learns why, as the calls held at the failure did
    try:
        fakes[0].stub.Unmasking(pb.UnmaskingRequest(run_id=fakes[0].run_id, round=0), metadata=fakes[0].md,
                                timeout=10)
        code = None
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
    assert code == grpc.StatusCode.ABORTED and "fewer than the threshold t=3" in details
    for f in fakes:
        f.close()


@pytest.mark.slow
def test_real_processes_secure_round_matches_the_plain_round(tmp_path, tiny_bert, shards):
    """Real server and client processes: the same job with and without secure aggregation
    (uniform weights, no DP). Clients train to the same bytes, so round 0's released delta is
    the same up to half a fixed-point step. FFA-LoRA: a method that draws nothing (FedKRSO's
    draws under secure aggregation come from each client's secret, so no plain run repeats them)."""
    def job(name: str, **privacy) -> tuple[dict, dict]:
        cfg = round_config(tiny_bert, tmp_path / name / "out", rounds={"total": 2, "clients_per_round": 2,
                                                                       "min_clients": 2, "deadline_s": 120},
                           method={"name": "ffa-lora", "steps": 2, "rank": 2, "lr": 1e-3},
                           training={"weighting": "uniform", "batch_size": 8}, privacy=privacy)
        (tmp_path / name).mkdir()
        run = run_cluster(tmp_path / name, cfg, shards, clients=2)
        return run, load_file(str(tmp_path / name / "out" / "state" / "round-000000.safetensors"))

    plain_run, plain = job("plain")
    secure_run, secure = job("secure", secure_aggregation={"enabled": True, "phase_timeout_s": 30})
    step = secure_run.rows[0]["secagg"]["fixed_point_step"]
    assert all(r["secagg"]["survivors"] == 2 and r["secagg"]["failed"] is None for r in secure_run.rows)
    for name, t in secure.items():
        ref = plain.get(name, torch.zeros_like(t))
        assert (t.double() - ref.double()).abs().max() <= step / 2 + 1e-6 * float(ref.abs().max()) + 1e-9, name
    assert secure_run.rows[0]["secagg"]["protocol_bytes_per_client"] > 0
    assert log_events(secure_run.cluster.server.text(), "secagg_unmasked")


def test_central_dp_noise_is_added_after_unmasking(server_factory):
    """Secure aggregation composed with central DP: the server unmasks the exact sum, then adds
    noise of std z * C and divides by clients_per_round; the row reports epsilon."""
    z, clip = 0.5, 1.0
    srv = secure_server(server_factory, 3, dp={"mode": "central", "clip": clip, "noise_multiplier": z})
    fakes = [Fake(srv, f"c{i}") for i in range(3)]
    headers = {f.client_id: f.wait_train() for f in fakes}
    updates = {c: random_update(srv, headers[c], i, scale=1e-3) for i, c in enumerate(sorted(headers))}
    subs = {f.client_id: submission(srv, f, headers[f.client_id], updates[f.client_id]) for f in fakes}
    assert all(isinstance(r, pb.UnmaskingResponse) for r in drive(subs, {}).values())
    row = closed_row(srv, 0)
    assert row["dp_epsilon"] > 0 and row["dp_noise_multiplier"] == z and row["secagg"]["survivors"] == 3
    noise = torch.cat([(t.double() - sum(u[n].double() for u in updates.values()) / 3).reshape(-1)
                       for n, t in srv.coord.deltas[0].tensors.items() if n.startswith("dense.")])
    assert noise.numel() > 1000
    assert float(noise.std()) == pytest.approx(z * clip / 3, rel=0.1)  # noise on the sum, over m = 3
    for f in fakes:
        f.close()


def test_a_repeated_masked_input_is_answered_as_a_duplicate_and_drained_within_its_ring_width(server_factory):
    """A client that sends its masked input again (a retry after a lost answer) is told it was
    a duplicate and the round goes on; a repeat that claims the same digest but carries more
    bytes than the ring's int32 vector is refused INVALID_ARGUMENT while being drained, and
    the round still closes with the exact sum."""
    from fedkrso.common.wire import tensor_batches, update_digest

    srv = secure_server(server_factory, 3)
    fakes = [Fake(srv, f"c{i}") for i in range(3)]
    headers = {f.client_id: f.wait_train() for f in fakes}
    updates = {c: random_update(srv, headers[c], i) for i, c in enumerate(sorted(headers))}
    subs = {f.client_id: submission(srv, f, headers[f.client_id], updates[f.client_id]) for f in fakes}
    seen = {}

    def one(name: str, sub: SecureSubmission):
        sub.confirm(sub.share(sub.advertise()))
        first = sub.submit(0, 1 << 16)
        if name == "c0":
            seen["again"] = sub.submit(0, 1 << 16)
            masked = sub.masked_input()
            doubled = {"masked": torch.cat([masked["masked"], masked["masked"]])}

            def stream():
                header = sub.update.header(sub.run_id, 0)
                header.num_tensors, header.update_digest = 1, update_digest(masked)
                yield pb.MaskedInputRequest(header=header)
                for batch in tensor_batches(doubled, None, 1 << 16):
                    yield pb.MaskedInputRequest(tensors=batch)

            try:
                sub.call(lambda _, **kw: sub.stub.SubmitMaskedInput(stream(), **kw), None, 60)
                seen["oversized"] = "accepted"
            except grpc.RpcError as err:
                seen["oversized"] = err
        return first, sub.unmask()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {n: pool.submit(one, n, s) for n, s in subs.items()}
        results = {n: f.result(timeout=120) for n, f in futures.items()}
    assert seen["again"].accepted and seen["again"].duplicate
    err = seen["oversized"]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    numel = sum(t.numel() for t in updates["c0"].values())
    assert f"exceeds the {numel * 4}-byte limit" in err.details()
    assert all(first.accepted and not first.duplicate for first, _ in results.values())
    row = closed_row(srv, 0)
    assert submitters(srv, 0) == ["c0", "c1", "c2"] and row["num_clients"] == 3
    step = row["secagg"]["fixed_point_step"]
    for name, t in srv.coord.deltas[0].tensors.items():
        plain = sum(updates[c][name].double() for c in ("c0", "c1", "c2")) / 3
        assert (t.double() - plain).abs().max() <= step / 2 + 1e-6, name
    for f in fakes:
        f.close()
