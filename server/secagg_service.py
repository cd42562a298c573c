"""The gRPC handlers of secure aggregation (``server/secagg.py``), mixed into the service.

Each handler authenticates the caller, checks the run, forwards to the round's protocol state
and answers with a precise status: FAILED_PRECONDITION (no such round or phase now),
PERMISSION_DENIED (not a client of this phase), ALREADY_EXISTS (answered already),
INVALID_ARGUMENT (a malformed message), ABORTED (the round's secure aggregation failed: the
message says why; the run goes on with the next round).
"""

from __future__ import annotations

import numpy as np
import structlog

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import message_bytes
from ..common.privacy.secagg import MASK_KEY, SELF_MASK
from ..common.tensors import element_size
from ..common.wire import TensorAssembler, WireError, update_digest
from .intake import report_of
from .rounds import RoundError

log = structlog.get_logger("fedkrso.server")
KINDS = {pb.SHARE_KIND_SELF_MASK: SELF_MASK, pb.SHARE_KIND_MASK_KEY: MASK_KEY}


class SecAggServicer:
    """Handlers for ``CoordinatorService`` (which provides ``coord``, ``_client``, ``_abort``,
    ``_run_check`` and ``_uploads``)."""

    async def _protocol(self, context, client_id: str, run_id: str, round_id: int):
        try:
            if problem := self._run_check(run_id):
                raise RoundError("FAILED_PRECONDITION", problem)
            if self.coord.secagg is None:
                raise RoundError("FAILED_PRECONDITION", "this run does not use secure aggregation")
            return self.coord.secagg.round_for(int(round_id))
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=round_id)

    async def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context) -> pb.AdvertiseKeysResponse:
        client_id = await self._client(context)
        sa = await self._protocol(context, client_id, request.run_id, request.round)
        try:
            roster = await sa.advertise(client_id, bytes(request.cipher_public_key), bytes(request.mask_public_key))
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=request.round)
        resp = pb.AdvertiseKeysResponse(
            clients=[pb.ClientKeys(client_id=c, cipher_public_key=k[0], mask_public_key=k[1])
                     for c, k in sorted(roster.keys.items())],
            threshold=roster.t, fixed_point_bits=sa.f, ring_bits=sa.bits)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def ShareKeys(self, request: pb.ShareKeysRequest, context) -> pb.ShareKeysResponse:
        client_id = await self._client(context)
        sa = await self._protocol(context, client_id, request.run_id, request.round)
        shares = {s.client_id: bytes(s.ciphertext) for s in request.shares}
        try:
            if len(shares) != len(request.shares):
                raise RoundError("INVALID_ARGUMENT", "two shares for one client")
            mine = await sa.share(client_id, shares)
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=request.round)
        resp = pb.ShareKeysResponse(shares=[pb.EncryptedShare(client_id=c, ciphertext=b) for c, b in sorted(mine.items())])
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def SubmitMaskedInput(self, request_iterator, context) -> pb.MaskedInputResponse:
        client_id = await self._client(context)
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            await self._abort(context, "INVALID_ARGUMENT", "empty masked input stream", client=client_id)
        if first.WhichOneof("body") != "header":
            await self._abort(context, "INVALID_ARGUMENT", "masked input stream must start with a header",
                              client=client_id)
        h = first.header
        sa = await self._protocol(context, client_id, h.run_id, h.round)
        try:
            rs = self.coord.intake.check_header(client_id, h.run_id, h.round, h.num_samples, h.update_digest)
            report = report_of(h)
            if rs is not None:
                self.coord.intake.check_eval(rs, client_id, report)
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=h.round)
        if rs is None:
            async for _ in stream:
                pass
            return pb.MaskedInputResponse(accepted=True, duplicate=True, round=h.round)
        dtype = "int32" if sa.bits == 32 else "int64"
        async with self._uploads:
            asm = TensorAssembler({"masked": (sa.numel,)}, dtype, max_bytes=sa.numel * element_size(dtype))
            msg_bytes = message_bytes(first)
            try:
                async for msg in stream:
                    msg_bytes += message_bytes(msg)
                    if msg.WhichOneof("body") != "tensors":
                        raise WireError("only tensor batches may follow the header")
                    asm.add(msg.tensors)
                tensors = asm.finish({"masked"})
                if update_digest(tensors) != h.update_digest:
                    raise WireError("update_digest does not match the tensors received")
            except WireError as err:
                await self._abort(context, "INVALID_ARGUMENT", str(err), client=client_id, round=h.round)
            vector = tensors["masked"].numpy().view(np.uint32 if sa.bits == 32 else np.uint64)
            try:
                await sa.add_masked(client_id, report, vector)
            except RoundError as err:
                await self._abort(context, err.code, str(err), client=client_id, round=h.round)
        traffic = sa.rs.traffic_of(client_id)
        traffic.up_payload, traffic.up_message, traffic.up_wire = asm.payload_bytes, msg_bytes, None
        log.info("masked_input_accepted", round=h.round, client=client_id, payload_bytes=asm.payload_bytes)
        return pb.MaskedInputResponse(accepted=True, round=h.round, payload_bytes=asm.payload_bytes)

    async def Unmasking(self, request: pb.UnmaskingRequest, context) -> pb.UnmaskingResponse:
        client_id = await self._client(context)
        sa = await self._protocol(context, client_id, request.run_id, request.round)
        try:
            survivors, dropped = await sa.unmasking(client_id)
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=request.round)
        resp = pb.UnmaskingResponse(survivors=survivors, dropped=dropped)
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp

    async def RevealShares(self, request: pb.RevealSharesRequest, context) -> pb.RevealSharesResponse:
        client_id = await self._client(context)
        sa = await self._protocol(context, client_id, request.run_id, request.round)
        try:
            if any(s.kind not in KINDS for s in request.shares):
                raise RoundError("INVALID_ARGUMENT", "unknown share kind")
            await sa.reveal(client_id, [(s.client_id, KINDS[s.kind], bytes(s.share)) for s in request.shares])
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=request.round)
        resp = pb.RevealSharesResponse()
        sa.count_bytes(client_id, message_bytes(request) + message_bytes(resp))
        return resp
