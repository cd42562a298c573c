"""A client's side of secure aggregation over gRPC (``common.privacy.secagg``): the five
steps after training, each a call to the server, the masked update instead of SubmitUpdate.
A peer's bad key or share pair is a complaint (logged, the round goes on); what only a lying
server could send raises ``SecAggError`` (the caller logs it and leaves the round).

``SecureSubmission`` keeps the steps apart so that tests can stop a client between any two
(a dropout); ``run`` does them all. ``call(fn, request, timeout)`` is the caller's RPC
plumbing (retries, credentials: ``FedClient._call`` in the client), which calls
``fn(request, metadata=..., timeout=timeout)``, once per attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import structlog
import torch

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.participant import PreparedUpdate
from ..common.privacy.config import SecureAggregationSection
from ..common.privacy.secagg import MASK_KEY, SELF_MASK, ClientSession, Roster, SealedShare, SecAggError, encode
from ..common.wire import tensor_batches, update_digest

log = structlog.get_logger("fedkrso.client")
KINDS = {SELF_MASK: pb.SHARE_KIND_SELF_MASK, MASK_KEY: pb.SHARE_KIND_MASK_KEY}


class SecureSubmission:
    """One round's masked submission of ``update`` (already clipped, clamped, full spec)."""

    def __init__(self, stub, call: Callable, run_id: str, client_id: str, update: PreparedUpdate,
                 spec: dict[str, tuple[int, ...]], sa: SecureAggregationSection, timeout: float,
                 fixed_point: int | None = None):
        """``fixed_point``: the step exponent f the run's config gives (``fixed_point_bits``);
        the client clipped its update for that ring (``Participant._as_sent``), so a server
        that names another is refused."""
        self.stub, self.call, self.timeout = stub, call, timeout
        self.run_id, self.update, self.spec = run_id, update, spec
        self.session = ClientSession(run_id, update.round, client_id, sa.ring_bits, sa.threshold)
        self.expected_f = fixed_point
        self.f = 0

    def advertise(self) -> Roster:
        """Send this round's two public keys; returns the roster of every client's keys once the server
        has them, checked (ring, fixed-point step, threshold, key validity)."""
        c_pk, s_pk = self.session.advertise()
        resp = self.call(self.stub.AdvertiseKeys, pb.AdvertiseKeysRequest(
            run_id=self.run_id, round=self.update.round, cipher_public_key=c_pk, mask_public_key=s_pk), self.timeout)
        bits = self.session.bits
        if resp.ring_bits != bits or not 1 <= resp.fixed_point_bits < bits - 1 or (
                self.expected_f is not None and resp.fixed_point_bits != self.expected_f):
            raise SecAggError(f"the server's ring ({resp.ring_bits} bits, step 2^-{resp.fixed_point_bits}) is not "
                              f"this client's {bits}-bit ring (step 2^-{self.expected_f})")
        self.f = resp.fixed_point_bits
        return Roster({k.client_id: (bytes(k.cipher_public_key), bytes(k.mask_public_key)) for k in resp.clients},
                      resp.threshold)

    def share(self, roster: Roster) -> list[str]:
        """Send the sealed share pairs; the senders whose pair to this client was bad."""
        shares = self.session.share(roster)
        resp = self.call(self.stub.ShareKeys, pb.ShareKeysRequest(run_id=self.run_id, round=self.update.round, shares=[
            pb.EncryptedShare(client_id=c, ciphertext=s.ciphertext, mask_key_commitment=s.mask_key_commitment,
                              self_mask_commitment=s.self_mask_commitment) for c, s in sorted(shares.items())]),
            self.timeout)
        complaints = self.session.receive({s.client_id: SealedShare(
            bytes(s.ciphertext), bytes(s.mask_key_commitment), bytes(s.self_mask_commitment)) for s in resp.shares})
        if self.session.bad_keys or complaints:
            log.warning("secagg_bad_peers", round=self.update.round, bad_keys=sorted(self.session.bad_keys),
                        complaints=complaints)
        return complaints

    def confirm(self, complaints: list[str]) -> pb.ConfirmSharesResponse:
        """Report the complaints; mask with the masking set the server answers."""
        resp = self.call(self.stub.ConfirmShares, pb.ConfirmSharesRequest(
            run_id=self.run_id, round=self.update.round, complaints=complaints), self.timeout)
        self.session.confirm(list(resp.members), list(resp.excluded))
        return resp

    def masked_input(self) -> dict[str, torch.Tensor]:
        """The masked ring vector, as the one tensor the server receives."""
        vector = self.session.masked(encode(self.update.tensors, self.spec, self.f, self.session.bits))
        signed = vector.view(np.int32 if self.session.bits == 32 else np.int64)
        return {"masked": torch.from_numpy(signed.copy())}

    def requests(self, tensors: dict[str, torch.Tensor], peak_rss: int, chunk: int) -> Iterator[pb.MaskedInputRequest]:
        """The masked input's request stream: a header that names no seed and no figure, then the
        masked ring tensor in batches."""
        header = self.update.header(self.run_id, peak_rss)
        header.num_tensors, header.update_digest = 1, update_digest(tensors)
        yield pb.MaskedInputRequest(header=header)
        for batch in tensor_batches(tensors, None, chunk):
            yield pb.MaskedInputRequest(tensors=batch)

    def submit(self, peak_rss: int, chunk: int) -> pb.MaskedInputResponse:
        """Send the masked input (a fresh stream per attempt, the same bytes)."""
        tensors = self.masked_input()  # a fresh request stream per attempt, the same bytes
        return self.call(lambda t, **kw: self.stub.SubmitMaskedInput(self.requests(t, peak_rss, chunk), **kw),
                         tensors, self.timeout)

    def unmask(self) -> pb.UnmaskingResponse:
        """Learn who survived and who dropped, and reveal the shares that unmask the sum (self-mask
        shares of survivors, mask-key shares of the dropped)."""
        resp = self.call(self.stub.Unmasking, pb.UnmaskingRequest(run_id=self.run_id, round=self.update.round),
                         self.timeout)
        reveals = self.session.reveal(list(resp.survivors), list(resp.dropped))
        self.call(self.stub.RevealShares, pb.RevealSharesRequest(
            run_id=self.run_id, round=self.update.round,
            shares=[pb.RevealedShare(client_id=o, kind=KINDS[k], share=s) for o, k, s in reveals]), self.timeout)
        return resp

    def run(self, peak_rss: int, chunk: int) -> pb.UnmaskingResponse:
        """The whole protocol for this client's update: advertise, share, confirm, submit, unmask."""
        self.confirm(self.share(self.advertise()))
        self.submit(peak_rss, chunk)
        return self.unmask()
