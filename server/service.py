"""The gRPC face of the coordinator (``fedkrso.v1.Coordinator``), on grpc.aio.

A thin adapter: ``auth.AuthInterceptor`` authenticates the caller before a handler runs; each
handler validates the request, forwards it to the ``Coordinator`` (which alone changes the
run's state) and streams the answer through ``common.wire``, counting bytes as it goes. Every
refusal is a ``RoundError`` that ``statuses.StatusInterceptor`` turns into a precise gRPC status
with a structured log event; nothing a client sends can change server state unless the whole
update validated. Update streams are read under ``uploads.UploadGate``'s clocks, turns and
slots; Joins are rate-limited per IP address (``admission.py``); connections are bounded by
the relay (``relay.py``) and gRPC's own options (``server_options``). Strings a client chose
are bounded (``logs.bounded``) wherever they are logged or echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

from ..common.accounting import ConnCounters, message_bytes
from ..common.config import ServerSection
from ..common.logs import bounded
from ..common.protocol import TOKEN_HEADER, bearer_token, valid_client_id
from .admission import JoinLimiter, peer_host
from .auth import AuthInterceptor, current_client, server_credentials
from .coordinator import Coordinator
from .intake import report_of
from .messages import DeltaEncodings, assignment_messages, snapshot_messages
from .relay import FDS_PER_CONNECTION, CountingRelay, RelayLimits, fd_budget
from .rounds import Assignment, RoundError
from .secagg_service import SecAggServicer
from .statuses import StatusInterceptor
from .uploads import UploadGate, assemble, check_report, drain

log = structlog.get_logger("fedkrso.server")
MAX_POLL_S = 60.0
# a waiting poll wakes at least this often to mark its client as heard from (registry.LIVENESS_S)
POLL_TOUCH_S = 15.0
CALLS_PER_CLIENT = 4  # at most at once: a poll, an upload, a heartbeat, a Leave


class CoordinatorService(SecAggServicer, pb_grpc.CoordinatorServicer):
    """The handlers. A refusal is a ``RoundError`` raised with its status code; the
    ``StatusInterceptor`` answers it (and anything unexpected) with a precise status."""

    def __init__(self, coord: Coordinator, auth: AuthInterceptor, relay: CountingRelay | None = None):
        self.coord = coord
        self.relay = relay
        self.auth = auth
        s = coord.cfg.server
        self.chunk = s.max_chunk_bytes
        self._deltas = DeltaEncodings(self.chunk, s.snapshot_after_rounds)
        # every long-poll is released at once when a round opens; each stream's serialized
        # copies sit in gRPC's buffers until its client reads them, so bound the streams
        self._downloads = asyncio.Semaphore(s.max_concurrent_downloads)
        self.uploads = UploadGate(s.max_concurrent_uploads, s.upload_idle_s, s.upload_total_s)
        self.joins = JoinLimiter(s.join_burst, s.join_rate_per_s)

    def _client(self, polling: bool = False) -> str:
        client_id = current_client()  # set by AuthInterceptor, which refused the call otherwise
        self.coord.touch(client_id, polling)
        return client_id

    def _counters(self, context) -> ConnCounters | None:
        """Socket counters of the connection this call came on (None without the relay)."""
        return self.relay.lookup(context.peer()) if self.relay else None

    def _peer_host(self, context) -> str:
        """The caller's IP address (behind the relay, the one the relay accepted)."""
        counters = self._counters(context)
        return peer_host(counters.client if counters is not None else context.peer())

    def _check_run(self, run_id: str) -> None:
        if run_id != self.coord.run_id:
            raise RoundError("FAILED_PRECONDITION", f"run {bounded(run_id)} is not this run ({self.coord.run_id!r})")

    # -- RPCs ------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        """With a credential the id is the credential's and ``name`` only a display name; under
        open enrolment the id is ``name``, and a name whose client is live is taken only with
        that client's current session token (which a new one then replaces)."""
        self.joins.admit(self._peer_host(context))
        name = request.name or "client"
        if not valid_client_id(name):
            raise RoundError("INVALID_ARGUMENT", f"invalid client name {bounded(name)}: 1 to 48 ASCII letters, "
                             "digits, '-' or '_'")
        client_id = current_client()
        if client_id is None and self.coord.registry.is_live(name):
            holder = self.auth.sessions.lookup(bearer_token(context.invocation_metadata()) or "")
            if holder != name:
                raise RoundError("ALREADY_EXISTS", f"client name {name!r} belongs to a live session; join under "
                                 "another name, or with that session's token")
        await self.coord.join(client_id or name, name, int(request.num_samples), int(request.eval_samples),
                              request.software_version)
        if client_id is None:
            client_id = name
            sessions = self.auth.sessions
            await context.send_initial_metadata(((TOKEN_HEADER, sessions.enrol(name)),))
            if len(sessions) > len(self.coord.registry.clients):  # some were forgotten: so are their sessions
                sessions.retain(self.coord.registry.clients)
        return pb.JoinResponse(
            client_id=client_id,
            run_id=self.coord.run_id,
            config_json=self.coord.cfg.model_dump_json(),
            model_fingerprint=self.coord.model_fingerprint,
            current_round=self.coord.completed,
            max_chunk_bytes=self.chunk,
        )

    async def StartRound(self, request: pb.StartRoundRequest, context) -> AsyncIterator[pb.StartRoundResponse]:
        client_id = self._client()
        self._check_run(request.run_id)
        coord = self.coord
        wait = 0.0 if math.isnan(request.wait_seconds) else request.wait_seconds  # NaN stalled the loop
        give_up = time.monotonic() + min(max(wait, 0.0), MAX_POLL_S)
        while True:
            coord.touch(client_id, polling=True)  # a Leave meanwhile ends the poll (UNAUTHENTICATED)
            task = coord.assignment(client_id, int(request.have_round), request.holds_run_seeds)
            if task is not None:
                break
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                yield pb.StartRoundResponse(header=pb.RoundHeader(
                    status=pb.ROUND_STATUS_WAIT, round=coord.completed, target_round=coord.completed))
                return
            await coord.wait_for_work(client_id, min(remaining, POLL_TOUCH_S))
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
        """Header, then tensor batches, read under the upload gate's clocks, turns and slots
        (``uploads.py``); folded only once the whole update validated."""
        client_id = self._client()
        counters = self._counters(context)
        down_at_submit = counters.down if counters is not None else None  # all of StartRound arrived
        upload = self.uploads.open(request_iterator, client_id)
        first = await upload.next()
        if first is None:
            raise RoundError("INVALID_ARGUMENT", "empty update stream")
        if first.WhichOneof("body") != "header":
            raise RoundError("INVALID_ARGUMENT", "update stream must start with a header")
        h = first.header
        check_report(h)
        report = report_of(h, self.coord.cfg.privacy)
        intake = self.coord.intake
        rs = intake.check_header(client_id, h.run_id, h.round, h.num_samples, h.update_digest)  # refuse before waiting
        if rs is not None:
            intake.check_eval(rs, client_id, report)
        async with upload.turn():
            # again: this client's previous stream may have been accepted while this one waited
            rs = intake.check_header(client_id, h.run_id, h.round, h.num_samples, h.update_digest)
            if rs is None:  # idempotent resubmission: read it, bounded, change nothing
                await drain(upload, intake.max_update_bytes(h.round))
                log.info("update_duplicate", client=client_id, round=h.round)
                return pb.SubmitUpdateResponse(accepted=True, duplicate=True, round=h.round)
            async with upload.slot():
                tensors, asm, msg_bytes = await assemble(upload, h, *intake.update_spec(rs),
                                                         self.coord.cfg.method.wire_dtype, message_bytes(first))
                folded = await intake.accept(rs, client_id, report, {k: v.float() for k, v in tensors.items()},
                                             asm.payload_bytes, msg_bytes, counters, down_at_submit)
        if not folded:
            log.info("update_duplicate", client=client_id, round=h.round)
            return pb.SubmitUpdateResponse(accepted=True, duplicate=True, round=h.round)
        return pb.SubmitUpdateResponse(accepted=True, round=h.round, payload_bytes=asm.payload_bytes,
                                       message_bytes=msg_bytes)

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context):
        client_id = self._client()
        coord = self.coord
        self._check_run(request.run_id)
        async with self._downloads:  # one copy of the state per stream: bounded like deltas
            state, fp = await coord.snapshot(int(request.round))
            log.info("snapshot_sent", client=client_id, round=request.round)
            # a snapshot fetched to train the open round is that round's downlink, like deltas
            for msg, payload in snapshot_messages(int(request.round), state, fp, self.chunk):
                coord.count_download(client_id, payload, message_bytes(msg))
                yield msg
        coord.end_download(client_id)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        self._client()
        return pb.HeartbeatResponse(run_finished=self.coord.finished, current_round=self.coord.completed)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        client_id = self._client()
        await self.coord.leave(client_id, request.reason or "leave")
        self.auth.sessions.revoke(client_id)  # open enrolment: the session ends with it
        return pb.LeaveResponse()


def server_options(s: ServerSection, behind_relay: bool) -> list[tuple[str, int]]:
    """gRPC's own limits, behind the relay (``relay.py``, which admits connections) or facing
    clients directly (then gRPC caps the connections too)."""
    cap = [] if behind_relay else [("grpc.max_allowed_incoming_connections", s.max_connections)]
    return cap + [
        # let clients keep idle connections alive with pings, without tripping too_many_pings
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # a peer that stops answering pings is dropped after keepalive_time + timeout; one that
        # never finishes its handshake, or holds a connection without calls, sooner
        ("grpc.server_handshake_timeout_ms", int(s.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(s.connection_idle_s * 1000)),
        ("grpc.max_concurrent_streams", s.max_streams_per_connection),
        # calls that arrived but that the event loop has not taken up yet wait in gRPC's queue,
        # which by default refuses beyond 1000 (at random from there to 3000): a round opening
        # for 2,000 clients (their uploads and next polls at once) lost calls there. Room for
        # every connection's honest calls at once, and no more (refused beyond, as before)
        ("grpc.server.max_pending_requests", s.max_connections * CALLS_PER_CLIENT),
        ("grpc.server.max_pending_requests_hard_limit", s.max_connections * CALLS_PER_CLIENT),
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
    limits = RelayLimits.of(coord.cfg.server)
    budget = fd_budget(FDS_PER_CONNECTION if count_bytes else 1)
    if limits.max_connections > budget:
        log.warning("max_connections_lowered", configured=limits.max_connections, to=budget,
                    reason="the process's file-descriptor limit")
        limits = dataclasses.replace(limits, max_connections=budget)
    options = server_options(coord.cfg.server.model_copy(update={"max_connections": limits.max_connections}),
                             behind_relay=count_bytes)
    server = grpc.aio.server(options=options, interceptors=[StatusInterceptor(current_client), auth])

    def bind(address: str) -> int:
        return server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)

    relay = None
    if count_bytes:
        relay = CountingRelay(host, int(port), "127.0.0.1", bind("127.0.0.1:0"), limits)
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
