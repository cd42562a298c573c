"""The gRPC handlers of secure aggregation (``server/secagg.py``), mixed into the service.

Each handler authenticates the caller, asks the round port for the round's protocol (which
checks the run), forwards to its phase and refuses with a ``RoundError`` that the ``StatusInterceptor`` answers with its status:
FAILED_PRECONDITION (no such round or phase now), PERMISSION_DENIED (not a client of this
phase, or out of the round), ALREADY_EXISTS (answered already), INVALID_ARGUMENT (a malformed
message, a public key that cannot be used, a revealed share that is not the one its owner
committed to), ABORTED (the round's secure aggregation failed: the message says why; the run
goes on with the next round). A masked input is read under the same upload gate as an update (``uploads.py``: one
stream of a client at a time, idle and total time limits, bounded slots).
"""

from __future__ import annotations

import structlog

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import message_bytes
from ..common.privacy.secagg import MASK_KEY, SELF_MASK, SealedShare
from .rounds import RoundError
from .uploads import receive

log = structlog.get_logger("fedkrso.server")
KINDS = {pb.SHARE_KIND_SELF_MASK: SELF_MASK, pb.SHARE_KIND_MASK_KEY: MASK_KEY}


class SecAggServicer:
    """Handlers for ``CoordinatorService`` (which provides ``port``, ``_client`` and
    ``uploads``); each phase is a method of the round's protocol (``RoundPort.secure_round``)."""

    async def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context) -> pb.AdvertiseKeysResponse:
        """A client's two public keys for the round; answered once every expected client advertised (or
        the phase timed out) with the roster."""
        client_id = self._client()
        sa = self.port.secure_round(request.run_id, request.round)
        roster = await sa.advertise(client_id, bytes(request.cipher_public_key), bytes(request.mask_public_key))
        resp = pb.AdvertiseKeysResponse(
            clients=[pb.ClientKeys(client_id=c, cipher_public_key=k[0], mask_public_key=k[1])
                     for c, k in sorted(roster.keys.items())],
            threshold=roster.t, fixed_point_bits=sa.f, ring_bits=sa.bits)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def ShareKeys(self, request: pb.ShareKeysRequest, context) -> pb.ShareKeysResponse:
        """A client's encrypted share pairs for the others; answered with the pairs sent to it."""
        client_id = self._client()
        sa = self.port.secure_round(request.run_id, request.round)
        shares = {s.client_id: SealedShare(bytes(s.ciphertext), bytes(s.mask_key_commitment),
                                           bytes(s.self_mask_commitment)) for s in request.shares}
        if len(shares) != len(request.shares):
            raise RoundError("INVALID_ARGUMENT", "two shares for one client")
        mine = await sa.share(client_id, shares)
        resp = pb.ShareKeysResponse(shares=[
            pb.EncryptedShare(client_id=c, ciphertext=s.ciphertext, mask_key_commitment=s.mask_key_commitment,
                              self_mask_commitment=s.self_mask_commitment) for c, s in sorted(mine.items())])
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def ConfirmShares(self, request: pb.ConfirmSharesRequest, context) -> pb.ConfirmSharesResponse:
        """A client's complaints about the shares it got; answered with the masking set and its
        disputed pairs."""
        client_id = self._client()
        sa = self.port.secure_round(request.run_id, request.round)
        members, excluded = await sa.confirm(client_id, list(request.complaints))
        resp = pb.ConfirmSharesResponse(members=members, excluded=excluded)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def SubmitMaskedInput(self, request_iterator, context) -> pb.MaskedInputResponse:
        """Read like an update (``uploads.receive``); the ring vector is summed at once."""
        client_id = self._client()
        got = await receive(self.uploads.open(request_iterator, client_id), "masked input",
                            lambda h: self.port.admit_masked(client_id, h), self.port.add_masked)
        round_id = got.adm.record.round
        if not got.folded:  # the same masked input again: drained within its ring's width, nothing changed
            return pb.MaskedInputResponse(accepted=True, duplicate=True, round=round_id)
        log.info("masked_input_accepted", round=round_id, client=client_id, payload_bytes=got.payload_bytes)
        return pb.MaskedInputResponse(accepted=True, round=round_id, payload_bytes=got.payload_bytes)

    async def Unmasking(self, request: pb.UnmaskingRequest, context) -> pb.UnmaskingResponse:
        """Who survived and who dropped: whose shares the client must reveal."""
        client_id = self._client()
        sa = self.port.secure_round(request.run_id, request.round)
        survivors, dropped = await sa.unmasking(client_id)
        resp = pb.UnmaskingResponse(survivors=survivors, dropped=dropped)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def RevealShares(self, request: pb.RevealSharesRequest, context) -> pb.RevealSharesResponse:
        """A client's revealed shares, checked against their owners' commitments."""
        client_id = self._client()
        sa = self.port.secure_round(request.run_id, request.round)
        if any(s.kind not in KINDS for s in request.shares):
            raise RoundError("INVALID_ARGUMENT", "unknown share kind")
        await sa.reveal(client_id, [(s.client_id, KINDS[s.kind], bytes(s.share)) for s in request.shares])
        resp = pb.RevealSharesResponse()
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp
