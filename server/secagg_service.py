"""The gRPC handlers of secure aggregation (``server/secagg.py``), mixed into the service.

Each handler authenticates the caller, checks the run, forwards to the round's protocol state
and refuses with a ``RoundError`` that the ``StatusInterceptor`` answers with its status:
FAILED_PRECONDITION (no such round or phase now), PERMISSION_DENIED (not a client of this
phase, or out of the round), ALREADY_EXISTS (answered already), INVALID_ARGUMENT (a malformed
message, a public key that cannot be used, a revealed share that is not the one its owner
committed to), ABORTED (the round's secure aggregation failed: the message says why; the run
goes on with the next round). A masked input is read under the same upload gate as an update (``uploads.py``: one
stream of a client at a time, idle and total time limits, bounded slots).
"""

from __future__ import annotations

import numpy as np
import structlog

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import message_bytes
from ..common.privacy.secagg import MASK_KEY, SELF_MASK, SealedShare
from .intake import report_of
from .rounds import RoundError
from .uploads import assemble, check_report, drain

log = structlog.get_logger("fedkrso.server")
KINDS = {pb.SHARE_KIND_SELF_MASK: SELF_MASK, pb.SHARE_KIND_MASK_KEY: MASK_KEY}


class SecAggServicer:
    """Handlers for ``CoordinatorService`` (which provides ``coord``, ``_client``,
    ``_check_run`` and ``uploads``)."""

    def _protocol(self, run_id: str, round_id: int):
        self._check_run(run_id)
        if self.coord.secagg is None:
            raise RoundError("FAILED_PRECONDITION", "this run does not use secure aggregation")
        return self.coord.secagg.round_for(int(round_id))

    async def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context) -> pb.AdvertiseKeysResponse:
        client_id = self._client()
        sa = self._protocol(request.run_id, request.round)
        roster = await sa.advertise(client_id, bytes(request.cipher_public_key), bytes(request.mask_public_key))
        resp = pb.AdvertiseKeysResponse(
            clients=[pb.ClientKeys(client_id=c, cipher_public_key=k[0], mask_public_key=k[1])
                     for c, k in sorted(roster.keys.items())],
            threshold=roster.t, fixed_point_bits=sa.f, ring_bits=sa.bits)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def ShareKeys(self, request: pb.ShareKeysRequest, context) -> pb.ShareKeysResponse:
        client_id = self._client()
        sa = self._protocol(request.run_id, request.round)
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
        client_id = self._client()
        sa = self._protocol(request.run_id, request.round)
        members, excluded = await sa.confirm(client_id, list(request.complaints))
        resp = pb.ConfirmSharesResponse(members=members, excluded=excluded)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def SubmitMaskedInput(self, request_iterator, context) -> pb.MaskedInputResponse:
        client_id = self._client()
        upload = self.uploads.open(request_iterator, client_id)
        first = await upload.next()
        if first is None:
            raise RoundError("INVALID_ARGUMENT", "empty masked input stream")
        if first.WhichOneof("body") != "header":
            raise RoundError("INVALID_ARGUMENT", "masked input stream must start with a header")
        h = first.header
        sa = self._protocol(h.run_id, h.round)
        check_report(h)
        report = report_of(h, self.coord.cfg.privacy)
        intake = self.coord.intake
        rs = intake.check_header(client_id, h.run_id, h.round, h.num_samples, h.update_digest)
        if rs is not None:
            intake.check_eval(rs, client_id, report)
        dtype = "int32" if sa.bits == 32 else "int64"
        async with upload.turn():
            rs = intake.check_header(client_id, h.run_id, h.round, h.num_samples, h.update_digest)
            if rs is None:  # the same masked input again: read it, bounded by its ring's width, change nothing
                await drain(upload, sa.numel * (sa.bits // 8))
                return pb.MaskedInputResponse(accepted=True, duplicate=True, round=h.round)
            async with upload.slot():
                tensors, asm, msg_bytes = await assemble(upload, h, {"masked": (sa.numel,)}, {"masked"}, dtype,
                                                         message_bytes(first))
                vector = tensors["masked"].numpy().view(np.uint32 if sa.bits == 32 else np.uint64)
                await sa.add_masked(client_id, report, vector)
        traffic = sa.rs.traffic_of(client_id)
        traffic.up_payload, traffic.up_message, traffic.up_wire = asm.payload_bytes, msg_bytes, None
        log.info("masked_input_accepted", round=h.round, client=client_id, payload_bytes=asm.payload_bytes)
        return pb.MaskedInputResponse(accepted=True, round=h.round, payload_bytes=asm.payload_bytes)

    async def Unmasking(self, request: pb.UnmaskingRequest, context) -> pb.UnmaskingResponse:
        client_id = self._client()
        sa = self._protocol(request.run_id, request.round)
        survivors, dropped = await sa.unmasking(client_id)
        resp = pb.UnmaskingResponse(survivors=survivors, dropped=dropped)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def RevealShares(self, request: pb.RevealSharesRequest, context) -> pb.RevealSharesResponse:
        client_id = self._client()
        sa = self._protocol(request.run_id, request.round)
        if any(s.kind not in KINDS for s in request.shares):
            raise RoundError("INVALID_ARGUMENT", "unknown share kind")
        await sa.reveal(client_id, [(s.client_id, KINDS[s.kind], bytes(s.share)) for s in request.shares])
        resp = pb.RevealSharesResponse()
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp
