"""The client loop: join, verify the base model, then poll, catch up, train, submit.

The client holds the global weights W^t between rounds. For a round it snapshots the
method's state, trains (which moves the weights), uploads the change, and restores the
snapshot, so it is back at W^t, bit for bit, before it applies the next global delta.
"""

from __future__ import annotations

import json
import random
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import torch

from fedkrso.v1 import coordinator_pb2 as pb
from fedkrso.v1 import coordinator_pb2_grpc as pb_grpc

from ..common.config import RunConfig, address_host, is_loopback
from ..common.data import batches, load_split
from ..common.logs import progress
from ..common.methods import build_method
from ..common.models import load_model, load_tokenizer, model_fingerprint
from ..common.subspace import stable_seed
from ..common.wire import TensorAssembler, tensor_batches
from ..server.auth import TOKEN_HEADER

log = structlog.get_logger("fedkrso.client")
VERSION = "0.1.0"
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # >= the server's min_recv_ping_interval (10 s)
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
]


class ClientError(RuntimeError):
    """A condition under which the client must not go on (e.g. a different base model)."""


class CredentialRefused(RuntimeError):
    """The server refused Join with this client's credential (token file or certificate), or
    refused a call right after a fresh Join: fatal."""


class _SnapshotMoved(Exception):
    """The server closed a round between announcing a snapshot and serving it: poll again."""


@dataclass
class ClientOptions:
    server: str
    data: Path
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


@dataclass
class Report:
    client_id: str = ""
    rounds_trained: list[int] = field(default_factory=list)
    have_round: int = 0
    state_fingerprint: str = ""
    snapshots: int = 0
    deltas_applied: int = 0


def _counted(items, bar):
    """``items``, ticking ``bar`` once per item taken (one batch per local step)."""
    for item in items:
        bar.update()
        yield item


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def _bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


class FedClient:
    def __init__(self, opts: ClientOptions):
        self.opts = opts
        self.channel = make_channel(opts)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata: tuple = _bearer(opts.token_file.read_text().strip()) if opts.token_file else ()
        self.run_id = ""
        self.model_fingerprint = ""
        self.have = 0  # rounds applied: the client holds W^have
        self.report = Report()
        self.phase = "joining"
        self._stop = threading.Event()

    # -- RPC plumbing --------------------------------------------------------------------
    def _call(self, fn, *args, rejoin: bool = True, **kwargs):
        """Call with exponential backoff and jitter on UNAVAILABLE (server restart, network),
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
                        raise CredentialRefused(err.details()) from None
                    log.warning("session_lost", reason=err.details())
                    self._enrol()
                    rejoined = True
                    continue
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                    raise
                attempt += 1
                rejoined = False  # a new outage may need a new join
                log.warning("server_unavailable", retry_in=round(delay, 2), attempt=attempt)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 30.0)

    # -- lifecycle -------------------------------------------------------------------------
    def _enrol(self) -> pb.JoinResponse:
        """Join: with a fixed credential the server names the id; under open enrolment it
        answers with a session token in the initial metadata, used from then on."""
        resp, call = self._call(self.stub.Join.with_call, pb.JoinRequest(
            name=self.opts.name, num_samples=len(self.dataset), software_version=VERSION), rejoin=False)
        token = dict(call.initial_metadata()).get(TOKEN_HEADER)
        if token:
            self.metadata = _bearer(token)
        if self.run_id and (resp.run_id != self.run_id or resp.model_fingerprint != self.model_fingerprint):
            raise ClientError(f"the server now runs {resp.run_id!r}, not {self.run_id!r}; refusing to mix them")
        if self.run_id:  # the weights are kept: the next poll catches them up (or sends a snapshot)
            log.info("rejoined", client=resp.client_id, server_round=resp.current_round, have_round=self.have)
        self.model_fingerprint = resp.model_fingerprint
        self.client_id, self.run_id = resp.client_id, resp.run_id
        self.report.client_id = resp.client_id
        return resp

    def join(self) -> None:
        self.dataset = load_split(self.opts.data)
        resp = self._enrol()
        self.cfg = RunConfig.model_validate_json(resp.config_json)
        self.chunk = resp.max_chunk_bytes
        structlog.contextvars.bind_contextvars(client=self.client_id)
        log.info("joined", run_id=self.run_id, method=self.cfg.method.name, samples=len(self.dataset))
        m = self.cfg.model
        model_spec = self.opts.model or m.name
        self.method = build_method(self.cfg.method, self.cfg.run.seed)
        self.model = load_model(model_spec, m.task, m.num_labels, self.cfg.run.seed)
        self.method.prepare(self.model)
        fp = model_fingerprint(self.model)
        if fp != resp.model_fingerprint:
            raise ClientError(f"base model {model_spec!r} differs from the server's "
                              f"(fingerprint {fp[:12]} != {resp.model_fingerprint[:12]}); refusing to train")
        self.tokenizer = load_tokenizer(model_spec)
        self.have = 0

    def run(self) -> Report:
        self.join()
        hb = threading.Thread(target=self._heartbeat, daemon=True)
        hb.start()
        self._hb = hb
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
            if getattr(self, "_hb", None) is not None:
                self._hb.join(timeout=15)
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
        """One long-poll: the header, and the deltas streamed after it (still encoded)."""
        def call(metadata):
            stream = self.stub.StartRound(pb.StartRoundRequest(
                run_id=self.run_id, have_round=self.have, wait_seconds=self.opts.poll_seconds),
                metadata=metadata, timeout=self.opts.poll_seconds + 600)
            header, deltas = None, []
            for msg in stream:
                kind = msg.WhichOneof("body")
                if kind == "header":
                    header = msg.header
                elif kind == "delta":
                    deltas.append((msg.delta, TensorAssembler()))
                elif kind == "tensors":
                    deltas[-1][1].add(msg.tensors)
            return header, deltas

        return self._call(lambda metadata: call(metadata))

    def _catch_up(self, header: pb.RoundHeader, deltas) -> None:
        self.phase = "catching_up"
        if header.catch_up == pb.CATCH_UP_SNAPSHOT:
            self._load_snapshot(header.snapshot_round)
        for dh, asm in deltas:
            if dh.round != self.have:
                raise ClientError(f"delta for round {dh.round} but the client holds round {self.have}")
            tensors = {k: v.float() for k, v in asm.finish().items()}
            self.method.apply(self.model, list(dh.seeds), tensors)
            self.have = dh.round + 1
            self.report.deltas_applied += 1
        if self.have != header.target_round:
            raise ClientError(f"caught up to round {self.have}, server expects {header.target_round}")
        fp = self.method.state_fingerprint(self.model)
        if fp != header.state_fingerprint:
            raise ClientError(f"rebuilt state at round {self.have} differs from the server's "
                              f"({fp[:12]} != {header.state_fingerprint[:12]})")
        self.report.have_round, self.report.state_fingerprint = self.have, fp

    def _load_snapshot(self, round_id: int) -> None:
        state = self.method.state_parameters(self.model)

        def fetch(metadata) -> TensorAssembler:
            asm = TensorAssembler({k: tuple(v.shape) for k, v in state.items()})
            for msg in self.stub.GetSnapshot(pb.GetSnapshotRequest(run_id=self.run_id, round=round_id),
                                             metadata=metadata):
                if msg.WhichOneof("body") == "tensors":
                    asm.add(msg.tensors)
            return asm

        try:
            asm = self._call(fetch)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # a newer round closed meanwhile
                raise _SnapshotMoved(err.details()) from None
            raise
        tensors = asm.finish(set(state))
        with torch.no_grad():
            for k, v in tensors.items():
                state[k].copy_(v)
        self.have = round_id
        self.report.snapshots += 1
        log.info("snapshot_loaded", round=round_id)

    def _train_and_submit(self, header: pb.RoundHeader) -> None:
        seeds = list(header.seeds)
        plan_fp = self.method.plan_fingerprint(self.model, seeds)
        if plan_fp != header.plan_fingerprint:
            raise ClientError(f"rebuilt subspaces for round {header.round} differ from the server's")
        self.phase = "training"
        snapshot = {k: v.detach().clone() for k, v in self.method.state_parameters(self.model).items()}
        m, t = self.cfg.model, self.cfg.training
        data = batches(self.dataset, self.tokenizer, m.task, m.max_length, t.batch_size,
                       seed=stable_seed("batches", self.cfg.run.seed, header.round, self.opts.name))
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]), \
                progress(self.cfg.method.local_steps(), f"round {header.round} training", "step") as bar:
            # dropout: the same update whenever it is (re)trained
            torch.manual_seed(stable_seed("dropout", self.cfg.run.seed, header.round, self.opts.name) % (2**63))
            update = self.method.train_round(self.model, _counted(data, bar), header.round, seeds, self.opts.name)
        train_seconds = time.perf_counter() - started
        state_bytes = getattr(self.method, "last_train_state_bytes", 0)
        with torch.no_grad():
            for k, p in self.method.state_parameters(self.model).items():
                p.copy_(snapshot[k])
        del snapshot
        self.phase = "submitting"
        self._submit(header.round, update, train_seconds, state_bytes)
        self.report.rounds_trained.append(int(header.round))

    def _submit(self, round_id: int, update, train_seconds: float, state_bytes: int) -> None:
        from ..server.service import update_digest  # one definition of an update's identity
        from ..common.tensors import DTYPES

        wire = self.cfg.method.wire_dtype
        tensors = {k: v.to(DTYPES[wire]) for k, v in update.tensors.items()}
        header = pb.UpdateHeader(
            run_id=self.run_id, round=round_id, num_samples=len(self.dataset), loss=update.loss,
            steps=update.steps, seeds_used=update.seeds_used, num_tensors=len(tensors),
            update_digest=update_digest(tensors), train_seconds=train_seconds,
            peak_rss_bytes=_peak_rss_bytes(), train_state_bytes=state_bytes)

        def messages():
            yield pb.SubmitUpdateRequest(header=header)
            for batch in tensor_batches(tensors, None, self.chunk):
                yield pb.SubmitUpdateRequest(tensors=batch)

        try:
            resp = self._call(lambda metadata: self.stub.SubmitUpdate(messages(), metadata=metadata, timeout=600))
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
                log.warning("update_refused", round=round_id, code=err.code().name, reason=err.details())
                return
            raise
        log.info("update_submitted", round=round_id, loss=round(update.loss, 4), payload_bytes=resp.payload_bytes,
                 duplicate=resp.duplicate, train_seconds=round(train_seconds, 2))

    def _write_report(self) -> None:
        if self.opts.report:
            self.opts.report.parent.mkdir(parents=True, exist_ok=True)
            self.opts.report.write_text(json.dumps(self.report.__dict__, indent=2))
