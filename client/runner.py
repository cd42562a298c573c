"""The gRPC client loop: join, verify the base model, then poll, catch up, train, submit.

What a client does in a round (catch up, check fingerprints, train, build the update and its
digest) is ``common.participant.Participant``; this module is its transport: the channel,
retries and re-joins, the long-poll, streaming deltas, snapshots and updates, and heartbeats.
Everything the server sends is checked (``streams.py``) against what the participant expects
(names, shapes, dtype, rounds, seeds, total size) before it is kept or applied; a server that
breaks the protocol makes the client stop with ``ClientError`` (exit 3), never allocate
without bound or apply a malformed delta.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

from ..common.accounting import peak_rss_bytes
from ..common.config import address_host, is_loopback
from ..common.data import load_client_eval, load_split
from ..common.logs import bounded, progress
from ..common.participant import Participant, PreparedUpdate, Shared
from ..common.precision import resolve_placement
from ..common.privacy.ledger import BudgetExceeded, SampleLedger
from ..common.privacy.secagg import SecAggError, fixed_point_bits
from ..common.protocol import TOKEN_HEADER, VERSION, bearer
from ..common.wire import WireError
from .secagg import SecureSubmission
from .streams import ClientError, RoundReader, SnapshotReader, check_join

log = structlog.get_logger("fedkrso.client")
RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # >= the server's min_recv_ping_interval (10 s)
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    # its own connection even beside other clients in one process (tests, an embedding): the
    # server bounds the streams of one connection (server.max_streams_per_connection)
    ("grpc.use_local_subchannel_pool", 1),
]


class CredentialRefused(RuntimeError):
    """The server refused Join with this client's credential (token file or certificate), or
    refused a call right after a fresh Join: fatal."""


class _SnapshotMoved(Exception):
    """The server closed a round between announcing a snapshot and serving it: poll again."""


@dataclass
class ClientOptions:
    """What ``fedkrso-client`` was asked to do: the server, the data, identity and transport, and timings."""

    server: str
    data: Path
    eval_data: Path | None = None  # held-out rows (default: <data>/eval when it exists)
    model: str | None = None
    name: str = "client"
    poll_seconds: float = 20.0
    heartbeat_seconds: float = 10.0
    report: Path | None = None
    reconnect_seconds: float = 300.0  # long enough to ride out a server restart
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token_file: Path | None = None
    insecure: bool = False
    server_name: str | None = None
    device: str | None = None  # overrides the run's model.device (None: FEDKRSO_DEVICE, then the run's)
    dtype: str | None = None  # overrides the run's model.dtype (None: FEDKRSO_DTYPE, then the run's)
    dp_ledger: Path | None = None  # this data's DP-SGD releases (None: <data>/dp_sgd_ledger.json)
    dp_sgd_budget: float | None = None  # this data owner's own epsilon budget (None: the run's)


@dataclass
class Report:
    """What a client did in a run (``--report``): its id, the rounds it trained, its last round and
    state fingerprint, and how it caught up."""

    client_id: str = ""
    rounds_trained: list[int] = field(default_factory=list)
    have_round: int = 0
    state_fingerprint: str = ""
    snapshots: int = 0
    deltas_applied: int = 0


def make_channel(opts: ClientOptions) -> grpc.Channel:
    """TLS unless the server is on loopback (and no CA or certificate is given) or ``insecure``
    was asked for. Without ``ca`` the system's root certificates verify the server."""
    if opts.insecure or (is_loopback(address_host(opts.server)) and not (opts.ca or opts.cert)):
        return grpc.insecure_channel(opts.server, options=CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(
        root_certificates=opts.ca.read_bytes() if opts.ca else None,
        private_key=opts.key.read_bytes() if opts.key else None,
        certificate_chain=opts.cert.read_bytes() if opts.cert else None)
    options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", opts.server_name)] if opts.server_name else [])]
    return grpc.secure_channel(opts.server, creds, options=options)


class FedClient:
    """One client process: joins, polls for rounds, catches up by deltas or a snapshot, trains its
    round (``Participant``) and submits, until the run finishes."""

    def __init__(self, opts: ClientOptions):
        self.opts = opts
        self.channel = make_channel(opts)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata: tuple = bearer(opts.token_file.read_text().strip()) if opts.token_file else ()
        self.run_id = ""
        self.model_fingerprint = ""
        self.participant: Participant | None = None
        self.dataset = self.eval_dataset = None  # the shard and its held-out rows, read at join
        self.report = Report()
        self.phase = "joining"
        self._stop = threading.Event()

    # -- RPC plumbing --------------------------------------------------------------------
    def _call(self, fn, *args, rejoin: bool = True, retry: frozenset = RETRY, **kwargs):
        """Call with exponential backoff and jitter on the codes of ``retry`` (UNAVAILABLE: a
        server restart, the network; RESOURCE_EXHAUSTED: the server asks to come back later),
        for up to ``reconnect_seconds``.

        UNAUTHENTICATED means the server lost this client (a restart: its session token or its
        membership) or refuses its credential. Join again under the same name, which keeps the
        id, and retry once per outage; a Join that is itself refused (a revoked token-file
        token, an unknown certificate) is final: CredentialRefused."""
        delay, attempt, rejoined = 0.5, 0, False
        give_up = time.monotonic() + self.opts.reconnect_seconds
        while True:
            try:
                return fn(*args, metadata=self.metadata, **kwargs)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    if not rejoin or rejoined:
                        raise CredentialRefused(bounded(err.details(), 200)) from None
                    log.warning("session_lost", reason=bounded(err.details()))
                    self._enrol()
                    rejoined = True
                    continue
                if err.code() not in retry or time.monotonic() >= give_up:
                    raise
                attempt += 1
                rejoined = False  # a new outage may need a new join
                log.warning("server_busy" if err.code() != grpc.StatusCode.UNAVAILABLE else "server_unavailable",
                            code=err.code().name, reason=bounded(err.details()), retry_in=round(delay, 2),
                            attempt=attempt)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 30.0)

    # -- lifecycle -------------------------------------------------------------------------
    def _enrol(self) -> pb.JoinResponse:
        """Join: with a fixed credential the server names the id; under open enrolment it
        answers with a session token in the initial metadata, used from then on. A name held
        by a live session (ALREADY_EXISTS: this client's earlier process, not yet timed out)
        is retried like an outage."""
        resp, call = self._call(self.stub.Join.with_call, pb.JoinRequest(
            name=self.opts.name, num_samples=len(self.dataset), software_version=VERSION,
            eval_samples=0 if self.eval_dataset is None else len(self.eval_dataset)), rejoin=False,
            retry=RETRY | {grpc.StatusCode.ALREADY_EXISTS}, timeout=60)
        cfg = check_join(resp)
        token = dict(call.initial_metadata()).get(TOKEN_HEADER)
        if token:
            self.metadata = bearer(token)
        if self.run_id and (resp.run_id != self.run_id or resp.model_fingerprint != self.model_fingerprint):
            raise ClientError(f"the server now runs {resp.run_id!r}, not {self.run_id!r}; refusing to mix them")
        if self.run_id:  # the weights are kept: the next poll catches them up (or sends a snapshot)
            log.info("rejoined", client=resp.client_id, server_round=resp.current_round, have_round=self.have)
        self.model_fingerprint = resp.model_fingerprint
        self.client_id, self.run_id = resp.client_id, resp.run_id
        self.report.client_id = resp.client_id
        self.cfg, self.chunk = cfg, resp.max_chunk_bytes
        return resp

    def join(self) -> None:
        """Load the data, enrol with the server, load the base model and check it against the run's
        fingerprint."""
        self.dataset = load_split(self.opts.data)
        o = self.opts
        self.eval_dataset = load_split(o.eval_data) if o.eval_data else load_client_eval(o.data)
        resp = self._enrol()
        structlog.contextvars.bind_contextvars(client=self.client_id)
        log.info("joined", run_id=self.run_id, method=self.cfg.method.name, samples=len(self.dataset))
        spec = self.opts.model or self.cfg.model.name
        m = self.cfg.model
        placement = resolve_placement(m.device, m.dtype, self.opts.device, self.opts.dtype)
        self.participant = Participant(self.cfg, self.client_id, self.dataset, Shared.load(self.cfg, spec, placement),
                                       self.eval_dataset, self._ledger())
        self.participant.check_base(resp.model_fingerprint, spec)

    def _ledger(self) -> SampleLedger | None:
        """Under DP-SGD, the ledger of this data's releases, checked against the data owner's
        budget (``--dp-sgd-budget``, else the run's): ``privacy.ledger``."""
        sgd, o = self.cfg.privacy.dp_sgd, self.opts
        if not sgd.enabled:
            return None
        budget = o.dp_sgd_budget if o.dp_sgd_budget is not None else sgd.epsilon_budget
        try:
            ledger = SampleLedger(o.dp_ledger or o.data / "dp_sgd_ledger.json", self.run_id, budget, sgd.delta)
        except ValueError as err:
            raise ClientError(str(err)) from None
        log.info("dp_sgd_ledger", path=str(ledger.path), releases=len(ledger.releases), budget=budget,
                 epsilon=round(ledger.epsilon(), 6))
        return ledger

    @property
    def have(self) -> int:
        """Rounds applied: the client holds W^have."""
        return self.participant.have if self.participant is not None else 0

    def run(self) -> Report:
        """Join, then take part in every round the server gives this client until the run finishes;
        returns what it did."""
        self.join()
        hb = threading.Thread(target=self._heartbeat, daemon=True)
        hb.start()
        try:
            while True:
                self.phase = "idle"
                header, deltas = self._poll()
                if header.status == pb.ROUND_STATUS_WAIT:
                    continue
                try:
                    self._catch_up(header, deltas)
                except _SnapshotMoved:
                    log.info("snapshot_moved_on", round=header.snapshot_round)
                    continue
                if header.status == pb.ROUND_STATUS_FINISHED:
                    log.info("run_finished", rounds=self.have, state_fingerprint=self.report.state_fingerprint[:16])
                    try:  # courtesy only: the run is over and the final state verified
                        self.stub.Leave(pb.LeaveRequest(run_id=self.run_id, reason="finished"),
                                        metadata=self.metadata, timeout=10)
                    except grpc.RpcError as err:
                        log.info("leave_not_acknowledged", code=err.code().name)
                    return self.report
                self._train_and_submit(header)
        finally:
            self._stop.set()
            if hb.is_alive():
                hb.join(timeout=15)
            self.channel.close()
            self._write_report()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.opts.heartbeat_seconds):
            try:
                self.stub.Heartbeat(pb.HeartbeatRequest(run_id=self.run_id, round=self.have, phase=self.phase),
                                    metadata=self.metadata, timeout=10)
            except grpc.RpcError:
                pass  # the main loop handles unavailability with backoff

    def _poll(self):
        """One long-poll: the header and the deltas streamed after it, checked and assembled
        by a ``RoundReader`` against what the participant expects."""

        def call(metadata):
            stream = self.stub.StartRound(pb.StartRoundRequest(
                run_id=self.run_id, have_round=self.have, wait_seconds=self.opts.poll_seconds,
                holds_run_seeds=self.participant is not None and bool(self.participant.fixed_seeds)),
                metadata=metadata, timeout=self.opts.poll_seconds + 600)
            reader = RoundReader(self.participant, self.cfg.method.wire_dtype)
            for msg in stream:
                reader.add(msg)
            return reader.finish()

        return self._call(call)

    def _catch_up(self, header: pb.RoundHeader, deltas) -> None:
        self.phase = "catching_up"
        if header.catch_up == pb.CATCH_UP_SNAPSHOT:
            self._load_snapshot(header.snapshot_round)
        for dh, asm in deltas:
            try:
                self.participant.apply_delta(dh.round, self.participant.seeds(list(dh.seeds)), asm.finish())
            except WireError as err:
                raise ClientError(f"malformed delta of round {dh.round}: {err}") from None
            self.report.deltas_applied += 1
        fp = self.participant.verify(header.target_round, header.state_fingerprint)
        self.report.have_round, self.report.state_fingerprint = self.have, fp

    def _load_snapshot(self, round_id: int) -> None:
        timeout = 600 + self.participant.state_bytes() / 1e6  # at least 1 MB/s

        def fetch(metadata) -> SnapshotReader:
            reader = SnapshotReader(self.participant, round_id)
            for msg in self.stub.GetSnapshot(pb.GetSnapshotRequest(run_id=self.run_id, round=round_id),
                                             metadata=metadata, timeout=timeout):
                reader.add(msg)
            if reader.header is None:
                raise ClientError(f"the snapshot stream of round {round_id} carried no header")
            return reader

        try:
            tensors = self._call(fetch).asm.finish(set(self.participant.state_spec()))
        except WireError as err:
            raise ClientError(f"malformed snapshot of round {round_id}: {err}") from None
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # a newer round closed meanwhile
                raise _SnapshotMoved(err.details()) from None
            raise
        self.participant.load_snapshot(round_id, tensors)
        self.report.snapshots += 1
        log.info("snapshot_loaded", round=round_id)

    def _train_and_submit(self, header: pb.RoundHeader) -> None:
        seeds = self.participant.seeds(list(header.seeds))
        self.participant.check_plan(header.round, seeds, header.plan_fingerprint)
        self.phase = "training"
        log.info("training", round=header.round, steps=self.cfg.method.local_steps())
        try:
            with progress(self.cfg.method.local_steps(), f"round {header.round} training", "step") as bar:
                update = self.participant.train(header.round, seeds, tick=bar.update)
        except BudgetExceeded as err:  # this data's own budget: leave the run rather than train past it
            log.warning("dp_sgd_budget_reached", round=header.round, reason=str(err))
            try:
                self.stub.Leave(pb.LeaveRequest(run_id=self.run_id, reason="dp-sgd budget reached"),
                                metadata=self.metadata, timeout=10)
            except grpc.RpcError as rpc:
                log.info("leave_not_acknowledged", code=rpc.code().name)
            raise
        self.phase = "submitting"
        if self.cfg.privacy.secure_aggregation.enabled:
            self._submit_securely(update, seeds)
        else:
            self._submit(update)
        self.report.rounds_trained.append(int(header.round))

    def _submit(self, update: PreparedUpdate) -> None:
        """Send the update, a fresh stream per attempt. DEADLINE_EXCEEDED (the server's upload
        clocks, ``server.upload_idle_s`` / ``upload_total_s``, ran out on this stream: a stall
        here, a busy server, a slow link) is retried like a busy server, and an update still
        not delivered when the retries give up is left: the round goes on without it and this
        client polls for the next one. A resubmission the server already folded is answered as
        a duplicate, so a retry never counts twice."""
        def send(metadata):
            stream = update.requests(self.run_id, peak_rss_bytes(), self.chunk)
            return self.stub.SubmitUpdate(stream, metadata=metadata, timeout=600)

        try:
            resp = self._call(send, retry=RETRY | {grpc.StatusCode.DEADLINE_EXCEEDED})
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
                log.warning("update_refused", round=update.round, code=err.code().name, reason=bounded(err.details()))
                return
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                log.warning("update_not_delivered", round=update.round, code=err.code().name,
                            reason=bounded(err.details()))
                return
            raise
        log.info("update_submitted", round=update.round, loss=round(update.loss, 4), payload_bytes=resp.payload_bytes,
                 duplicate=resp.duplicate, train_seconds=round(update.train_seconds, 2),
                 eval={k: round(v, 4) for k, v in update.eval_metrics.items()} or None)

    def _submit_securely(self, update: PreparedUpdate, seeds: list[int]) -> None:
        """The update through secure aggregation (``client/secagg.py``). A round whose protocol
        failed, or moved on without this client, is logged and left: the next poll goes on."""
        sa = self.cfg.privacy.secure_aggregation
        timeout = self.cfg.rounds.deadline_s + 4 * sa.phase_timeout_s + 60
        sub = SecureSubmission(self.stub, lambda fn, arg, t: self._call(fn, arg, timeout=t), self.run_id,
                               self.client_id, update, self.participant.delta_spec(seeds), sa, timeout,
                               fixed_point_bits(sa.value_bound, self.cfg.rounds.clients_per_round, sa.ring_bits))
        try:
            resp = sub.run(peak_rss_bytes(), self.chunk)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS):
                raise
            log.warning("secagg_round_failed", round=update.round, code=err.code().name, reason=err.details())
            return
        except SecAggError as err:
            log.warning("secagg_round_failed", round=update.round, reason=str(err))
            return
        log.info("update_submitted_securely", round=update.round, survivors=len(resp.survivors),
                 dropped=list(resp.dropped), train_seconds=round(update.train_seconds, 2))

    def _write_report(self) -> None:
        if self.opts.report:
            self.opts.report.parent.mkdir(parents=True, exist_ok=True)
            self.opts.report.write_text(json.dumps(self.report.__dict__, indent=2))
