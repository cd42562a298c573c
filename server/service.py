"""The gRPC face of the coordinator (``fedkrso.v1.Coordinator``), on grpc.aio.

A thin adapter over the round port (``port.py``): ``auth.AuthInterceptor`` authenticates the
caller before a handler runs; each handler decodes the request, asks the port (which alone
reaches the coordinator, the only one to change the run's state) and streams the port's
messages back; the port counts their bytes. Every
refusal is a ``RoundError`` that ``statuses.StatusInterceptor`` turns into a precise gRPC status
with a structured log event; nothing a client sends can change server state unless the whole
update validated. Update streams are read under ``uploads.UploadGate``'s clocks, turns and
slots; Joins are rate-limited per IP address (``admission.py``); connections are bounded by
the relay (``relay.py``) and gRPC's own options (``server_options``). Strings a client chose
are bounded (``logs.bounded``) wherever they are logged or echoed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

from ..common.accounting import ConnCounters
from ..common.config import ServerSection
from ..common.logs import bounded
from ..common.protocol import TOKEN_HEADER, bearer_token, valid_client_id
from .admission import JoinLimiter, peer_host
from .auth import AuthInterceptor, current_client, server_credentials
from .coordinator import Coordinator
from .port import RoundPort
from .relay import FDS_PER_CONNECTION, CountingRelay, RelayLimits, fd_budget
from .rounds import RoundError
from .secagg_service import SecAggServicer
from .statuses import StatusInterceptor
from .uploads import UploadGate, receive

log = structlog.get_logger("fedkrso.server")
MAX_POLL_S = 60.0
# a waiting poll wakes at least this often to mark its client as heard from (registry.LIVENESS_S)
POLL_TOUCH_S = 15.0
CALLS_PER_CLIENT = 4  # at most at once: a poll, an upload, a heartbeat, a Leave


class CoordinatorService(SecAggServicer, pb_grpc.CoordinatorServicer):
    """The handlers, over the round port. A refusal is a ``RoundError`` raised with its status
    code; the ``StatusInterceptor`` answers it (and anything unexpected) with a precise status."""

    def __init__(self, port: RoundPort, auth: AuthInterceptor, relay: CountingRelay | None = None):
        self.port = port
        self.relay = relay
        self.auth = auth
        s = port.cfg.server
        self.uploads = UploadGate(s.max_concurrent_uploads, s.upload_idle_s, s.upload_total_s)
        self.joins = JoinLimiter(s.join_burst, s.join_rate_per_s)

    def _client(self, polling: bool = False) -> str:
        client_id = current_client()  # set by AuthInterceptor, which refused the call otherwise
        self.port.touch(client_id, polling)
        return client_id

    def _counters(self, context) -> ConnCounters | None:
        """Socket counters of the connection this call came on (None without the relay)."""
        return self.relay.lookup(context.peer()) if self.relay else None

    def _peer_host(self, context) -> str:
        """The caller's IP address (behind the relay, the one the relay accepted)."""
        counters = self._counters(context)
        return peer_host(counters.client if counters is not None else context.peer())

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
        port = self.port
        if client_id is None and port.is_live(name):
            holder = self.auth.sessions.lookup(bearer_token(context.invocation_metadata()) or "")
            if holder != name:
                raise RoundError("ALREADY_EXISTS", f"client name {name!r} belongs to a live session; join under "
                                 "another name, or with that session's token")
        await port.join(client_id or name, name, int(request.num_samples), int(request.eval_samples),
                        request.software_version)
        if client_id is None:
            client_id = name
            sessions = self.auth.sessions
            await context.send_initial_metadata(((TOKEN_HEADER, sessions.enrol(name)),))
            if len(sessions) > len(port.known_clients()):  # some were forgotten: so are their sessions
                sessions.retain(port.known_clients())
        return pb.JoinResponse(
            client_id=client_id,
            run_id=port.run_id,
            config_json=port.cfg.model_dump_json(),
            model_fingerprint=port.coord.model_fingerprint,
            current_round=port.completed,
            max_chunk_bytes=port.chunk,
        )

    async def StartRound(self, request: pb.StartRoundRequest, context) -> AsyncIterator[pb.StartRoundResponse]:
        """A long-poll (at most ``MAX_POLL_S``) for work; then the assignment's stream."""
        client_id = self._client()
        port = self.port
        port.check_run(request.run_id)
        wait = 0.0 if math.isnan(request.wait_seconds) else request.wait_seconds  # NaN stalled the loop
        give_up = time.monotonic() + min(max(wait, 0.0), MAX_POLL_S)
        while True:
            port.touch(client_id, polling=True)  # a Leave meanwhile ends the poll (UNAUTHENTICATED)
            task = port.assignment(client_id, int(request.have_round), request.holds_run_seeds)
            if task is not None:
                break
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                yield pb.StartRoundResponse(header=pb.RoundHeader(
                    status=pb.ROUND_STATUS_WAIT, round=port.completed, target_round=port.completed))
                return
            await port.wait_for_work(client_id, min(remaining, POLL_TOUCH_S))
        async with contextlib.aclosing(port.assignment_stream(client_id, task, self._counters(context))) as stream:
            async for msg in stream:
                yield msg

    async def SubmitUpdate(self, request_iterator, context) -> pb.SubmitUpdateResponse:
        """Header, then tensor batches, read under the upload gate's clocks, turns and slots
        (``uploads.receive``); folded by the port only once the whole update validated."""
        client_id = self._client()
        counters = self._counters(context)
        down_at_submit = counters.down if counters is not None else None  # all of StartRound arrived
        got = await receive(self.uploads.open(request_iterator, client_id), "update",
                            lambda h: self.port.admit(client_id, h),
                            lambda adm, *sizes: self.port.fold(adm, *sizes, counters, down_at_submit))
        round_id = got.adm.record.round
        if not got.folded:
            log.info("update_duplicate", client=client_id, round=round_id)
            return pb.SubmitUpdateResponse(accepted=True, duplicate=True, round=round_id)
        return pb.SubmitUpdateResponse(accepted=True, round=round_id, payload_bytes=got.payload_bytes,
                                       message_bytes=got.message_bytes)

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context):
        """The state after a round, streamed (a client too far behind for deltas), counted into its
        download."""
        client_id = self._client()
        self.port.check_run(request.run_id)
        async with contextlib.aclosing(self.port.snapshot_stream(client_id, int(request.round))) as stream:
            async for msg in stream:
                yield msg

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        """The client is alive; answered with whether the run finished and the current round."""
        finished, completed = self.port.heartbeat(self._client())
        return pb.HeartbeatResponse(run_finished=finished, current_round=completed)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        """The client leaves the run; its session ends with it."""
        client_id = self._client()
        await self.port.leave(client_id, request.reason or "leave")
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
    service = CoordinatorService(RoundPort(coord), auth, relay)
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
