"""The gRPC face of the coordinator (``fedkrso.v1.Coordinator``), on grpc.aio.

A thin adapter: ``auth.AuthInterceptor`` authenticates the caller before a handler runs; each
handler validates the request, forwards it to the ``Coordinator`` (which alone changes the
run's state) and streams the answer through ``common.wire``, counting bytes as it goes. Every
refusal is a precise gRPC status with a structured log event; nothing a client sends can
change server state unless the whole update validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

from ..common.accounting import ConnCounters, message_bytes
from ..common.protocol import TOKEN_HEADER
from ..common.tensors import element_size
from ..common.wire import TensorAssembler, WireError, update_digest
from .auth import AuthInterceptor, current_client, server_credentials, valid_client_id
from .coordinator import Coordinator
from .intake import report_of
from .messages import DeltaEncodings, assignment_messages, snapshot_messages
from .relay import CountingRelay
from .rounds import Assignment, RoundError
from .secagg_service import SecAggServicer

log = structlog.get_logger("fedkrso.server")
MAX_POLL_S = 60.0


class CoordinatorService(SecAggServicer, pb_grpc.CoordinatorServicer):
    def __init__(self, coord: Coordinator, auth: AuthInterceptor, relay: CountingRelay | None = None):
        self.coord = coord
        self.relay = relay
        self.auth = auth
        self.chunk = coord.cfg.server.max_chunk_bytes
        self._deltas = DeltaEncodings(self.chunk, coord.cfg.server.snapshot_after_rounds)
        # every long-poll is released at once when a round opens; each stream's serialized
        # copies sit in gRPC's buffers until its client reads them, so bound the streams
        self._downloads = asyncio.Semaphore(coord.cfg.server.max_concurrent_downloads)
        self._uploads = asyncio.Semaphore(coord.cfg.server.max_concurrent_uploads)

    async def _abort(self, context, code: str, message: str, **fields) -> None:
        log.warning("request_refused", code=code, reason=message, **fields)
        await context.abort(getattr(grpc.StatusCode, code), message)

    async def _client(self, context) -> str:
        client_id = current_client()  # set by AuthInterceptor, which refused the call otherwise
        try:
            self.coord.touch(client_id)
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id)
        return client_id

    def _counters(self, context) -> ConnCounters | None:
        """Socket counters of the connection this call came on (None without the relay)."""
        return self.relay.lookup(context.peer()) if self.relay else None

    def _run_check(self, run_id: str) -> str | None:
        return None if run_id == self.coord.run_id else f"run {run_id!r} is not this run ({self.coord.run_id!r})"

    # -- RPCs ------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        """With a credential the id is the credential's and ``name`` only a display name; under
        open enrolment the id is ``name`` and a new session token replaces the old one."""
        name = request.name or "client"
        if not valid_client_id(name):
            await self._abort(context, "INVALID_ARGUMENT", f"invalid client name {name!r}")
        client_id = current_client()
        try:
            await self.coord.join(client_id or name, name, int(request.num_samples), int(request.eval_samples))
        except RoundError as err:
            await self._abort(context, err.code, str(err))
        if client_id is None:
            client_id = name
            await context.send_initial_metadata(((TOKEN_HEADER, self.auth.sessions.enrol(name)),))
        return pb.JoinResponse(
            client_id=client_id,
            run_id=self.coord.run_id,
            config_json=self.coord.cfg.model_dump_json(),
            model_fingerprint=self.coord.model_fingerprint,
            current_round=self.coord.completed,
            max_chunk_bytes=self.chunk,
        )

    async def StartRound(self, request: pb.StartRoundRequest, context) -> AsyncIterator[pb.StartRoundResponse]:
        client_id = await self._client(context)
        if problem := self._run_check(request.run_id):
            await self._abort(context, "FAILED_PRECONDITION", problem, client=client_id)
        coord = self.coord
        wait = 0.0 if math.isnan(request.wait_seconds) else request.wait_seconds  # NaN stalled the loop
        give_up = time.monotonic() + min(max(wait, 0.0), MAX_POLL_S)
        while True:
            coord.touch(client_id)
            task = coord.assignment(client_id, int(request.have_round), request.holds_run_seeds)
            if task is not None:
                break
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                yield pb.StartRoundResponse(header=pb.RoundHeader(
                    status=pb.ROUND_STATUS_WAIT, round=coord.completed, target_round=coord.completed))
                return
            await coord.wait_change(min(remaining, 5.0))
        training = task.status == "train"
        if training:
            coord.begin_download(client_id, task.round, self._counters(context))
        async for msg in self._assignment_stream(task, client_id if training else None):
            yield msg
        if training:
            coord.end_download(client_id)
        else:
            await coord.finished_stream_sent(client_id)

    async def _assignment_stream(self, task: Assignment, metered: str | None):
        """The header, then every delta the client lacks; bytes counted for ``metered``."""
        async with self._downloads if task.deltas else contextlib.nullcontext():
            for msg, payload in assignment_messages(task, self._deltas):
                if metered:
                    self.coord.count_download(metered, payload, message_bytes(msg))
                yield msg

    async def SubmitUpdate(self, request_iterator, context) -> pb.SubmitUpdateResponse:
        client_id = await self._client(context)
        coord = self.coord
        counters = self._counters(context)
        down_at_submit = counters.down if counters is not None else None  # all of StartRound arrived
        msg_bytes = 0
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            await self._abort(context, "INVALID_ARGUMENT", "empty update stream", client=client_id)
        msg_bytes += message_bytes(first)
        if first.WhichOneof("body") != "header":
            await self._abort(context, "INVALID_ARGUMENT", "update stream must start with a header", client=client_id)
        h = first.header
        try:
            rs = coord.intake.check_header(client_id, h.run_id, h.round, h.num_samples, h.update_digest)
            report = report_of(h)
            if rs is not None:
                coord.intake.check_eval(rs, client_id, report)
        except RoundError as err:
            await self._abort(context, err.code, str(err), client=client_id, round=h.round)
        if rs is None:  # idempotent resubmission: drain and acknowledge, change nothing
            async for _ in stream:
                pass
            log.info("update_duplicate", client=client_id, round=h.round)
            return pb.SubmitUpdateResponse(accepted=True, duplicate=True, round=h.round)
        # uploads wait here for a slot, backpressured by HTTP/2 flow control: at most this many
        # updates are assembled at once, whatever the number of clients sending
        async with self._uploads:
            spec, required = coord.intake.update_spec(rs)
            wire = coord.cfg.method.wire_dtype
            asm = TensorAssembler(spec, wire, max_bytes=sum(math.prod(s) for s in spec.values()) * element_size(wire))
            try:
                async for msg in stream:
                    msg_bytes += message_bytes(msg)
                    if msg.WhichOneof("body") != "tensors":
                        raise WireError("only tensor batches may follow the header")
                    asm.add(msg.tensors)
                tensors = asm.finish(required)
                if len(tensors) != h.num_tensors:
                    raise WireError(f"header announced {h.num_tensors} tensors, stream carried {len(tensors)}")
                if update_digest(tensors) != h.update_digest:
                    raise WireError("update_digest does not match the tensors received")
            except WireError as err:
                await self._abort(context, "INVALID_ARGUMENT", str(err), client=client_id, round=h.round)
            try:
                folded = await coord.intake.accept(rs, client_id, report, {k: v.float() for k, v in tensors.items()},
                                                   asm.payload_bytes, msg_bytes, counters, down_at_submit)
            except RoundError as err:
                await self._abort(context, err.code, str(err), client=client_id, round=h.round)
            if not folded:
                log.info("update_duplicate", client=client_id, round=h.round)
                return pb.SubmitUpdateResponse(accepted=True, duplicate=True, round=h.round)
            return pb.SubmitUpdateResponse(accepted=True, round=h.round, payload_bytes=asm.payload_bytes,
                                           message_bytes=msg_bytes)

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context):
        client_id = await self._client(context)
        coord = self.coord
        if problem := self._run_check(request.run_id):
            await self._abort(context, "FAILED_PRECONDITION", problem, client=client_id)
        async with self._downloads:  # one copy of the state per stream: bounded like deltas
            try:
                state, fp = await coord.snapshot(int(request.round))
            except RoundError as err:
                await self._abort(context, err.code, str(err), client=client_id)
            log.info("snapshot_sent", client=client_id, round=request.round)
            # a snapshot fetched to train the open round is that round's downlink, like deltas
            for msg, payload in snapshot_messages(int(request.round), state, fp, self.chunk):
                coord.count_download(client_id, payload, message_bytes(msg))
                yield msg
        coord.end_download(client_id)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        await self._client(context)
        return pb.HeartbeatResponse(run_finished=self.coord.finished, current_round=self.coord.completed)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        client_id = await self._client(context)
        await self.coord.leave(client_id, request.reason or "leave")
        return pb.LeaveResponse()


SERVER_OPTIONS = [
    # let clients keep idle connections alive with pings, without tripping too_many_pings
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


@contextlib.asynccontextmanager
async def run_server(coord: Coordinator, listen: str | None = None, count_bytes: bool = True):
    """Start the service; yields the bound public port (``listen`` may use port 0).

    With ``count_bytes`` the gRPC server binds a private loopback port and a CountingRelay
    takes the public address, so socket bytes are measured per client connection; under TLS
    the relay forwards the encrypted bytes, which are the bytes on the wire. Transport and
    credentials come from ``coord.cfg.security`` (ConfigError if they cannot be used)."""
    listen = listen or coord.cfg.server.listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    sec = coord.cfg.security
    creds = server_credentials(sec, listen)
    auth = AuthInterceptor(sec)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[auth])

    def bind(address: str) -> int:
        return server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)

    relay = None
    if count_bytes:
        relay = CountingRelay(host, int(port), "127.0.0.1", bind("127.0.0.1:0"))
    service = CoordinatorService(coord, auth, relay)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    if not count_bytes:
        public = bind(listen)
    await server.start()
    log.info("transport", tls=creds is not None, mutual_tls=sec.client_ca is not None and creds is not None,
             identity=auth.mode)
    if relay is not None:
        public = await relay.start()
    try:
        yield public
    finally:
        await server.stop(grace=2.0)
        if relay is not None:
            await relay.close()
