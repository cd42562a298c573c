"""Secure aggregation against a hostile client and against a lying server (issue 21, items 5
and 7).

A hostile client: a key that cannot agree is refused and takes only its sender out; bad share
pairs are complaints that every client resolves the same way (disputed pairs, the masking
set), so the round goes on with the rest while t remain; a share revealed that its owner did
not commit to is refused; shares that rebuild another key than the one advertised fail the
round cleanly, naming the client, and the run goes on. Real server and client processes with
a hostile process beside them (``secagg_mallory.py``) check that no honest client crashes and
every round aggregates.

A lying server: what only a server could send (a threshold below the configured fraction,
too few clients, a masking set or unmasking request that contradicts what the client saw) is
given straight to a ``ClientSession``, which refuses it with ``SecAggError`` (the client
leaves the round) and never with another exception.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from conftest import REPO, finish_cluster, log_events, round_config, wait_until, write_round_yaml
from fedkrso.bench.launch import Cluster, Proc, child_env
from fedkrso.client.secagg import SecureSubmission
from fedkrso.common.config import ConfigError, parse_config
from fedkrso.common.participant import PreparedUpdate
from fedkrso.common.privacy.secagg import (MASK_KEY, SELF_MASK, ClientSession, Roster, SealedShare, SecAggError,
                                           _pack, context, masking_set, pair, threshold)
from fedkrso.v1 import coordinator_pb2 as pb
from test_privacy_secagg import closed_row, drive, random_update, secure_server, submission, submitters
from test_reliability import Fake


# -- the rule every client follows: the masking set ------------------------------------------------
def largest_valid(clients: list[str], complaints: dict[str, set[str]], t: int) -> list[str]:
    """By brute force: the largest set whose every member has t good share holders in it,
    itself included (valid sets are closed under union, so the largest is unique)."""
    for k in range(len(clients), -1, -1):
        for group in itertools.combinations(sorted(clients), k):
            if all(sum(u == v or v not in complaints[u] for u in group) >= t for v in group):
                return list(group)
    return []


def test_masking_set_disputes_pairs_and_drops_only_who_too_few_hold():
    """Named cases: a client that sends bad pairs to everyone leaves and nobody else does; a
    false accuser loses only the pairs it accused; a pair disputed by either side is
    disputed. Then 300 random complaint graphs against the brute-force largest valid set."""
    names = ["a", "b", "c", "m"]
    t = threshold(4, 0.5)
    assert masking_set(names, {}, t) == (names, set())
    assert masking_set(names, {"a": {"m"}, "b": {"m"}, "c": {"m"}}, t) == (["a", "b", "c"], set())
    assert masking_set(names, {"m": {"a", "b"}}, t) == (names, {("a", "m"), ("b", "m")})
    assert masking_set(names, {"a": {"m"}, "m": {"a"}}, t) == (names, {("a", "m")})
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 6)
        clients = [f"c{i}" for i in range(n)]
        p = rng.choice([0.1, 0.3, 0.6])
        complaints = {u: {v for v in clients if v != u and rng.random() < p} for u in clients}
        t = threshold(n, rng.choice([0.5, 0.7]))
        members, disputed = masking_set(clients, complaints, t)
        assert members == largest_valid(clients, complaints, t), (complaints, t)
        assert disputed == {pair(u, v) for u in members for v in members if v in complaints[u]}


# -- a client session given what a peer or a lying server sends -------------------------------------
def sessions(names: list[str], t: int) -> tuple[dict[str, ClientSession], Roster]:
    ss = {n: ClientSession("run", 0, n, 32, 0.5) for n in names}
    return ss, Roster({n: s.advertise() for n, s in ss.items()}, t)


def deliveries(ss: dict[str, ClientSession], roster: Roster) -> dict[str, dict[str, SealedShare]]:
    """What each client receives when every session shares honestly: receiver -> sender -> pair."""
    sent = {n: s.share(roster) for n, s in ss.items()}
    return {r: {s: sent[s][r] for s in ss if s != r} for r in ss}


def test_a_bad_peer_is_a_complaint_never_an_error():
    """Client a's roster, as a lying server may forward it, holds a peer with the all-zero key
    (z), one whose mask key copies b's (copy: b is then suspect too), and peers whose pair to
    a does not decrypt (junk), holds one field only (short) or does not match its commitment
    (uncommitted). a sends no ciphertext to an unusable peer, keeps only c's pair and its own,
    and complains of all the others without raising."""
    ss, roster = sessions(["a", "b", "c", "junk", "short", "uncommitted"], 4)
    roster.keys["z"] = (bytes(32), ss["c"].advertise()[0][::-1])
    roster.keys["copy"] = (ss["junk"].advertise()[0][::-1], roster.keys["b"][1])
    roster.t = threshold(len(roster.keys), 0.5)
    sent = {n: s.share(roster) for n, s in ss.items()}
    got = {s: sent[s]["a"] for s in ss if s != "a"}
    aad = context("run", 0, "short>a")
    nonce = os.urandom(12)
    short = nonce + ss["short"]._channel("a").encrypt(nonce, _pack(bytes(66)), aad)
    got.update(junk=SealedShare(os.urandom(180), got["junk"].mask_key_commitment, got["junk"].self_mask_commitment),
               short=SealedShare(short, got["short"].mask_key_commitment, got["short"].self_mask_commitment),
               uncommitted=SealedShare(got["uncommitted"].ciphertext, os.urandom(32),
                                       got["uncommitted"].self_mask_commitment),
               z=SealedShare(b"", os.urandom(32), os.urandom(32)), copy=SealedShare(b"", os.urandom(32), os.urandom(32)))
    assert sent["a"]["z"].ciphertext == b"" and sent["a"]["copy"].ciphertext == b""
    assert ss["a"].receive(got) == ["b", "copy", "junk", "short", "uncommitted", "z"]
    assert sorted(ss["a"].held) == ["a", "c"]


def confirmed(names: list[str], t: int) -> dict[str, ClientSession]:
    """Honest sessions of ``names`` (roster t) that received each other's pairs, before confirm."""
    ss, roster = sessions(names, t)
    for name, got in deliveries(ss, roster).items():
        assert ss[name].receive(got) == []
    return ss


def refused(call, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        call()


def test_a_client_refuses_what_only_a_lying_server_sends():
    """Each guard of ``ClientSession`` on its own: a t below the fraction (one half here) of
    the roster, a t above it, a roster of one, a roster that misstates the client's keys; too
    few clients that shared; a masking set that leaves the client out, is smaller than t, names
    a client that sent no pair, pairs it with a peer it complained of, or leaves it nobody to
    mask with; an unmasking request that does not split the masking set, leaves the client
    out of the survivors or names fewer than t."""
    names = ["a", "b", "c", "d"]
    for t, n in ((2, 4), (5, 4), (1, 1)):
        ss, roster = sessions(names[:n], t)
        refused(lambda: ss["a"].share(roster), f"threshold t={t} for a roster of {n}")
    ss, roster = sessions(names, 3)
    roster.keys["a"] = roster.keys["b"]
    refused(lambda: ss["a"].share(roster), "does not carry this client's keys")

    ss, roster = sessions(names, 3)
    got = deliveries(ss, roster)["a"]
    refused(lambda: ss["a"].receive({"b": got["b"]}), "2 client.s. shared keys .this one included., fewer than")
    refused(lambda: ss["a"].receive({**got, "zed": got["b"]}), "not other clients of the roster")

    ss = confirmed(names, 3)
    a = ss["a"]
    refused(lambda: a.confirm(["b", "c", "d"], []), "leaves this client out")
    refused(lambda: a.confirm(["a", "b"], []), "a masking set of 2 client.s., fewer than the threshold t=3")
    a.senders.discard("d")
    refused(lambda: a.confirm(names, []), "names a client that sent this client no share pair")
    a.senders.add("d")
    a.complaints = ["d"]
    refused(lambda: a.confirm(names, []), "pairs this client with a peer whose share pair it refused")
    refused(lambda: a.confirm(names, ["b", "c", "d"]), "no peer to mask with")
    a.complaints = []
    a.confirm(names, ["d"])
    assert a.partners == ["b", "c"]
    refused(lambda: a.reveal(["a", "b", "c"], []), "not the masking set")
    refused(lambda: a.reveal(["b", "c", "d"], ["a"]), "not the masking set")
    refused(lambda: a.reveal(["a", "b"], ["c", "d"]), "2 survivors, fewer than the threshold 3")
    refused(lambda: a.reveal(["a", "b", "c"], ["c", "d"]), "both a survivor and dropped")
    assert {(o, k) for o, k, _ in a.reveal(["a", "b", "c"], ["d"])} == {
        ("a", SELF_MASK), ("b", SELF_MASK), ("c", SELF_MASK), ("d", MASK_KEY)}


def test_a_client_refuses_a_ring_that_is_not_its_own():
    """A roster answer with another ring, or a fixed-point step outside the ring (2^-4e9 made
    the encoding raise OverflowError, a traceback in the client), is a ``SecAggError``."""
    sa = parse_config({"model": {"name": "x"}, "method": {"name": "fedkrso"}, "training": {"weighting": "uniform"},
                       "rounds": {"min_clients": 2},
                       "privacy": {"secure_aggregation": {"enabled": True}}}).privacy.secure_aggregation
    update = PreparedUpdate(round=0, tensors={}, digest="", num_samples=1, loss=0.0, steps=1)
    for ring, f in ((64, 20), (32, 4_000_000_000), (32, 0), (32, 20)):
        class LyingServer:  # the answer a lying server gives to AdvertiseKeys
            def AdvertiseKeys(self, request, **_):
                return pb.AdvertiseKeysResponse(threshold=2, fixed_point_bits=f, ring_bits=ring)

        # f = 20 is a valid step, but coarser than the config's 29: the clip was made for 29
        sub = SecureSubmission(LyingServer(), lambda fn, req, timeout: fn(req), "run", "a", update, {}, sa, 5, 29)
        refused(sub.advertise, "is not this client's 32-bit ring")


def test_config_refuses_a_threshold_below_one_half():
    base = {"model": {"name": "x"}, "method": {"name": "fedkrso"}, "training": {"weighting": "uniform"},
            "rounds": {"min_clients": 2}}
    parse_config({**base, "privacy": {"secure_aggregation": {"enabled": True, "threshold": 0.5}}})
    with pytest.raises(ConfigError, match="threshold 0.4 is below 0.5"):
        parse_config({**base, "privacy": {"secure_aggregation": {"enabled": True, "threshold": 0.4}}})


# -- a hostile client against a real server ---------------------------------------------------------
def exact(srv, row: dict, updates: dict[str, dict[str, torch.Tensor]]) -> None:
    """The round's released mean is the plain mean of ``updates`` up to half a fixed-point step."""
    step = row["secagg"]["fixed_point_step"]
    for name, t in srv.coord.deltas[row["round"]].tensors.items():
        plain = sum(u[name].double() for u in updates.values()) / len(updates)
        assert (t.double() - plain).abs().max() <= step / 2 + 1e-6, name


def round_of(server_factory, n: int):
    srv = secure_server(server_factory, n)
    fakes = [Fake(srv, f"c{i}") for i in range(n)]
    headers = {f.client_id: f.wait_train() for f in fakes}
    updates = {c: random_update(srv, headers[c], i) for i, c in enumerate(sorted(headers))}
    subs = {f.client_id: submission(srv, f, headers[f.client_id], updates[f.client_id]) for f in fakes}
    return srv, fakes, updates, subs


def test_disputed_pairs_are_masked_by_neither_side_and_the_sum_stays_exact(server_factory):
    """Four clients (t = 3); c3 sends c1 a pair that does not decrypt and falsely complains of
    c0. The pairs (c1, c3) and (c0, c3) are disputed for everyone: c0 and c1 mask without c3
    and c3 without both, c1 reveals nothing of c3's; every input, c3's included, is in the
    exact sum."""
    srv, fakes, updates, subs = round_of(server_factory, 4)
    c3 = subs["c3"].session
    share, confirm = c3.share, subs["c3"].confirm

    def spoiled(roster):
        sealed = share(roster)
        good = sealed["c1"]
        sealed["c1"] = SealedShare(os.urandom(len(good.ciphertext)), good.mask_key_commitment,
                                   good.self_mask_commitment)
        return sealed

    def accusing(complaints):
        c3.held.pop("c0")
        c3.complaints = [*complaints, "c0"]
        return confirm(c3.complaints)

    c3.share, subs["c3"].confirm = spoiled, accusing
    results = drive(subs, {})
    assert all(isinstance(r, pb.UnmaskingResponse) and len(r.survivors) == 4 for r in results.values()), results
    assert [subs[c].session.partners for c in sorted(subs)] == [["c1", "c2"], ["c0", "c2"], ["c0", "c1", "c3"],
                                                                ["c2"]]
    row = closed_row(srv, 0)
    assert row["secagg"]["disputed_pairs"] == 2 and row["secagg"]["failed"] is None
    exact(srv, row, updates)
    for f in fakes:
        f.close()


def test_a_share_revealed_that_its_owner_did_not_commit_to_is_refused_and_the_round_goes_on(server_factory):
    """Four clients; c0 (share point 1, among the t points the server combines first)
    reveals a junk share of c1's seed. Its call is refused with INVALID_ARGUMENT (on the old
    code the junk was combined, rebuilt no seed, and the exception ended the server's round
    loop); the other three reveal enough for every secret, and the sum is exact."""
    srv, fakes, updates, subs = round_of(server_factory, 4)
    c0 = subs["c0"].session
    reveal = c0.reveal

    def junk(survivors, dropped):
        return [(o, k, os.urandom(66) if (o, k) == ("c1", SELF_MASK) else s) for o, k, s in reveal(survivors, dropped)]

    c0.reveal = junk
    results = drive(subs, {})
    err = results["c0"]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "share of 'c1' (self_mask) is not the one its owner committed to" in err.details()
    row = closed_row(srv, 0)
    assert row["secagg"]["failed"] is None and row["secagg"]["survivors"] == 4
    exact(srv, row, updates)
    assert srv.alive()
    for f in fakes:
        f.close()


def test_shares_of_another_key_fail_the_round_cleanly_naming_their_owner(server_factory):
    """c3 advertises one mask key, shares another, and drops before masking: the three
    survivors' masks for c3 cannot be removed. The round fails with the reason naming c3 (no
    garbage released, no crash) and the next round opens."""
    srv, fakes, updates, subs = round_of(server_factory, 4)
    c3 = subs["c3"].session
    share = c3.share

    def other_key(roster):
        c3.mask = X25519PrivateKey.generate()
        roster.keys["c3"] = c3.advertise()
        return share(roster)

    c3.share = other_key
    drive(subs, {"c3": "masked"})
    row = closed_row(srv, 0)
    assert "'c3''s mask key rebuild another key than the one it advertised" in row["secagg"]["failed"]
    assert row["num_clients"] == 0 and srv.alive()
    assert {f.wait_train().round for f in fakes[:3]} == {1}
    for f in fakes:
        f.close()


def test_a_secret_left_with_fewer_than_t_shares_fails_the_round_cleanly(server_factory):
    """c3 spoils its pair to c1 (exactly t = 3 then hold its shares, itself included), sends
    its masked input and withholds its reveal: two shares of its seed come back. The round
    fails with the reason naming c3, the server stays up and the next round opens."""
    srv, fakes, updates, subs = round_of(server_factory, 4)
    c3 = subs["c3"].session
    share = c3.share

    def spoiled(roster):
        sealed = share(roster)
        sealed["c1"] = SealedShare(b"", sealed["c1"].mask_key_commitment, sealed["c1"].self_mask_commitment)
        return sealed

    c3.share = spoiled
    drive(subs, {"c3": "unmask"})
    row = closed_row(srv, 0)
    assert "the shares of 'c3''s self-mask seed rebuild nothing: 2 shares, 3 needed" in row["secagg"]["failed"]
    assert row["secagg"]["disputed_pairs"] == 1 and row["num_clients"] == 0 and srv.alive()
    assert {f.wait_train().round for f in fakes[:3]} == {1}
    for f in fakes:
        f.close()


def test_keys_that_cannot_agree_or_repeat_another_are_refused_and_take_only_their_sender_out(server_factory):
    """Of five selected, m0 advertises the all-zero point and m1 the mask key c0 advertised:
    both get INVALID_ARGUMENT and are out of the round (a second try: PERMISSION_DENIED); the
    round goes on with c0..c2 at once, and their sum is exact."""
    srv = secure_server(server_factory, 5)
    fakes = [Fake(srv, n) for n in ("c0", "c1", "c2", "m0", "m1")]
    headers = {f.client_id: f.wait_train() for f in fakes}
    updates = {c: random_update(srv, headers[c], i) for i, c in enumerate(["c0", "c1", "c2"])}
    subs = {c: submission(srv, fakes[i], headers[c], updates[c]) for i, c in enumerate(updates)}
    good = subs["c0"].session.advertise()

    def advertise(fake: Fake, cipher: bytes, mask: bytes) -> grpc.StatusCode:
        try:
            fake.stub.AdvertiseKeys(pb.AdvertiseKeysRequest(run_id=fake.run_id, round=0, cipher_public_key=cipher,
                                                            mask_public_key=mask), metadata=fake.md, timeout=5)
        except grpc.RpcError as err:
            return err.code()

    m0, m1 = fakes[3], fakes[4]
    fresh = ClientSession("x", 0, "x", 32, 0.5).advertise()
    assert advertise(m0, bytes(32), fresh[1]) == grpc.StatusCode.INVALID_ARGUMENT
    assert advertise(m0, *fresh) == grpc.StatusCode.PERMISSION_DENIED
    holder = threading.Thread(target=lambda: drive(subs, {}))
    holder.start()
    wait_until(lambda: "c0" in srv.coord.secagg.current.phases["advertise"].got, 30, "c0's keys")
    assert advertise(m1, fresh[0], good[1]) == grpc.StatusCode.INVALID_ARGUMENT
    holder.join(120)
    row = closed_row(srv, 0)
    assert row["secagg"]["advertised"] == 3 and submitters(srv, 0) == ["c0", "c1", "c2"]
    assert row["num_dropped"] == 2  # m0 and m1
    exact(srv, row, updates)
    for f in fakes:
        f.close()


# -- real processes ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_processes_a_hostile_client_crashes_nobody_and_every_round_aggregates(tmp_path, tiny_bert, shards):
    """A real server, three real clients and a hostile process (``secagg_mallory.py``), four
    clients per round. Round 0: mallory advertises the all-zero key: refused, out of the round
    (on the old code it was accepted and every honest client died with a traceback). Rounds 1
    and 2: mallory shares random bytes with everyone and goes silent (on the old code every
    honest client gave up and no round aggregated). Every round aggregates the three honest
    inputs and changes the model; every honest client exits 0 without a traceback."""
    cfg = round_config(tiny_bert, tmp_path / "out",
                       rounds={"total": 3, "clients_per_round": 4, "min_clients": 2, "deadline_s": 120,
                               "start_timeout_s": 180},
                       training={"weighting": "uniform", "batch_size": 8},
                       privacy={"secure_aggregation": {"enabled": True, "phase_timeout_s": 6}})
    cluster, report, log = Cluster(tmp_path), tmp_path / "mallory.json", tmp_path / "mallory.log"
    cluster.start_server(write_round_yaml(tmp_path / "round.yaml", cfg))
    mallory = Proc("mallory", subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "secagg_mallory.py"), "--server", f"127.0.0.1:{cluster.port}",
         "--plan", "zero-key,garbage,garbage", "--out", str(report)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env()), log)
    try:
        for i in range(3):
            cluster.start_client(shards / f"shard{i}", f"shard{i}")
        run = finish_cluster(cluster, Path(cfg["run"]["output_dir"]))
        assert mallory.wait(60) == 0, mallory.text()[-3000:]
    finally:
        cluster.stop()
        mallory.kill()
    seen = json.loads(report.read_text())
    bad = seen["client_id"]
    assert seen["rounds"]["0"] == {"AdvertiseKeys": "INVALID_ARGUMENT", "AdvertiseKeys again": "PERMISSION_DENIED"}
    for r in ("1", "2"):
        assert seen["rounds"][r] == {"AdvertiseKeys": "OK", "roster": 4, "ShareKeys": "OK"}
    rows = run.rows
    assert [r["secagg"]["advertised"] for r in rows] == [3, 4, 4]
    fingerprints = [r["state_fingerprint"] for r in rows]
    assert len(set(fingerprints)) == 3
    for r in rows:
        assert r["secagg"]["failed"] is None and r["secagg"]["survivors"] == 3, r["secagg"]
        assert r["num_clients"] == 3 and r["num_dropped"] >= 1
    accepted = [e["client"] for e in log_events(cluster.server.text(), "masked_input_accepted")]
    assert len(accepted) == 9 and bad not in accepted
    for c in cluster.clients:
        text = c.text()
        assert "Traceback" not in text, text[-3000:]
        assert len(log_events(text, "update_submitted_securely")) == 3
        assert [e["complaints"] for e in log_events(text, "secagg_bad_peers")] == [[bad], [bad]]
