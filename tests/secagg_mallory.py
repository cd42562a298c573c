"""A hostile secure-aggregation client, run as its own process (test infrastructure).

``python tests/secagg_mallory.py --server HOST:PORT --plan zero-key,garbage --out F.json``
speaks the .proto directly (no fedkrso client code), joins, and in each of the next rounds it
is selected for breaks one rule, in the order of ``--plan``:

* ``zero-key``: advertises the all-zero X25519 point as its cipher key (a low-order point:
  every secret agreed with it is zero, whatever the other side's key), then tries again with
  good keys;
* ``garbage``: advertises good keys, sends every other client of the roster random bytes for
  its share pair (and random commitments), then goes silent for the rest of the round.

It writes ``{"client_id": ..., "rounds": {round: {rpc: status}}}`` to ``--out`` and exits 0
once the run finished (it polls to the end, as a client does, so the server need not wait
for it); a round past its plan it is selected for, it sits out silently.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

RAW = serialization.Encoding.Raw


def fresh_key() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


class Mallory:
    def __init__(self, target: str):
        self.stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(target))
        resp, call = self.stub.Join.with_call(pb.JoinRequest(name="mallory", num_samples=10), timeout=30)
        self.md = (("authorization", f"Bearer {dict(call.initial_metadata())['x-fedkrso-token']}"),)
        self.run_id, self.client_id, self.have = resp.run_id, resp.client_id, int(resp.current_round)

    def status(self, rpc, request) -> str:
        try:
            rpc(request, metadata=self.md, timeout=120)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    def next_round(self, after: int) -> pb.RoundHeader | None:
        """Long-poll until selected for a round later than ``after``; None once the run finished."""
        while True:
            stream = self.stub.StartRound(pb.StartRoundRequest(run_id=self.run_id, have_round=self.have,
                                                               wait_seconds=5), metadata=self.md, timeout=60)
            header = next(m.header for m in stream if m.WhichOneof("body") == "header")
            self.have = int(header.target_round)  # deltas read and dropped: it never trains
            if header.status == pb.ROUND_STATUS_FINISHED:
                return None
            if header.status == pb.ROUND_STATUS_TRAIN and header.round > after:
                return header
            if header.status == pb.ROUND_STATUS_TRAIN:  # still selected for the round it left: pace the polls
                time.sleep(0.2)

    def zero_key(self, r: int) -> dict[str, str]:
        ask = dict(run_id=self.run_id, round=r, mask_public_key=fresh_key())
        return {"AdvertiseKeys": self.status(self.stub.AdvertiseKeys,
                                             pb.AdvertiseKeysRequest(cipher_public_key=bytes(32), **ask)),
                "AdvertiseKeys again": self.status(self.stub.AdvertiseKeys,
                                                   pb.AdvertiseKeysRequest(cipher_public_key=fresh_key(), **ask))}

    def garbage(self, r: int) -> dict[str, str]:
        roster = self.stub.AdvertiseKeys(pb.AdvertiseKeysRequest(
            run_id=self.run_id, round=r, cipher_public_key=fresh_key(), mask_public_key=fresh_key()),
            metadata=self.md, timeout=120)
        shares = [pb.EncryptedShare(client_id=k.client_id, ciphertext=os.urandom(180), mask_key_commitment=os.urandom(32),
                                    self_mask_commitment=os.urandom(32))
                  for k in roster.clients if k.client_id != self.client_id]
        return {"AdvertiseKeys": "OK", "roster": len(roster.clients),
                "ShareKeys": self.status(self.stub.ShareKeys, pb.ShareKeysRequest(run_id=self.run_id, round=r,
                                                                                 shares=shares))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", required=True)
    p.add_argument("--plan", required=True, help="comma-separated: zero-key | garbage, one per round")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    mallory, done, last = Mallory(args.server), {}, -1
    steps = iter(args.plan.split(","))
    while (header := mallory.next_round(last)) is not None:  # until the run finished: the server waits for that
        last = int(header.round)
        step = next(steps, None)
        if step is not None:  # past the plan: silent in the round
            done[last] = getattr(mallory, step.replace("-", "_"))(last)
        args.out.write_text(json.dumps({"client_id": mallory.client_id, "rounds": done}))


if __name__ == "__main__":
    main()
