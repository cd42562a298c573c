"""What a client accepts from a server: every answer checked before it is kept or applied.

A broken or malicious server must not make a client allocate without bound, loop forever or
apply a malformed delta. So, before anything is kept:

* a JoinResponse must carry a valid client id, a bounded run id, hex fingerprints, a chunk
  size in the range round.yaml allows and a run configuration that validates (``check_join``);
* a round stream is one header, then exactly the deltas the header announced: the rounds
  from the client's own to the target, in order, each with the seeds the method derives for
  its round, each assembled against the participant's spec, all of them together no larger
  than the state a snapshot would carry (the server sends deltas only when they are smaller);
  a TRAIN header names the seeds of its round, or none where the method's seeds are fixed for
  the run and the client holds them already (``RoundReader``);
* a snapshot stream is one header for the round asked, then at most the state's own bytes,
  in at most as many messages as that takes (``SnapshotReader``).

Anything else raises ``ClientError`` with a bounded description; the client exits 3.
"""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.config import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, RunConfig
from ..common.logs import bounded
from ..common.participant import Participant, ParticipantError
from ..common.protocol import valid_client_id
from ..common.tensors import spec_bytes
from ..common.wire import TensorAssembler, WireError

HEX64 = re.compile(r"[0-9a-f]{64}")
RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ClientError(RuntimeError):
    """A condition under which the client must not go on (e.g. a different base model, a
    malformed stream from the server)."""


def _fingerprint(value: str, what: str) -> str:
    if not HEX64.fullmatch(value):
        raise ClientError(f"the server sent a malformed {what} ({bounded(value)})")
    return value


def check_join(resp: pb.JoinResponse) -> RunConfig:
    """The run configuration of a JoinResponse whose every field is sane (module docstring)."""
    if not valid_client_id(resp.client_id):
        raise ClientError(f"the server assigned an invalid client id {bounded(resp.client_id)}")
    if not RUN_ID.fullmatch(resp.run_id):
        raise ClientError(f"the server sent an invalid run id {bounded(resp.run_id)}")
    _fingerprint(resp.model_fingerprint, "model fingerprint")
    if not MIN_CHUNK_BYTES <= resp.max_chunk_bytes <= MAX_CHUNK_BYTES:
        raise ClientError(f"the server's max_chunk_bytes={resp.max_chunk_bytes} is outside "
                          f"[{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    try:
        return RunConfig.model_validate_json(resp.config_json)
    except (ValidationError, json.JSONDecodeError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ClientError(f"the server's run configuration does not validate at {bounded(where, 60)}: "
                          f"{bounded(first['msg'], 120)}") from None


class RoundReader:
    """Reads one StartRound stream of ``participant`` (module docstring)."""

    def __init__(self, participant: Participant, wire_dtype: str):
        self.p = participant
        self.wire = wire_dtype
        self.header: pb.RoundHeader | None = None
        self.deltas: list[tuple[pb.DeltaHeader, TensorAssembler]] = []
        self._budget = participant.state_bytes()  # deltas together are never larger than a snapshot

    def add(self, msg: pb.StartRoundResponse) -> None:
        """Take in one message of the StartRound stream: its header, a delta's header or a batch of a
        delta's tensors; ``ClientError`` on a stream out of order or past what it announced."""
        kind = msg.WhichOneof("body")
        try:
            if kind == "header" and self.header is None:
                self.header = self._check_header(msg.header)
            elif kind == "delta" and self.header is not None and len(self.deltas) < self.header.num_deltas:
                self._start_delta(msg.delta)
            elif kind == "tensors" and self.deltas:
                asm = self.deltas[-1][1]
                before = asm.payload_bytes
                asm.add(msg.tensors)
                self._budget -= asm.payload_bytes - before
            else:
                raise ClientError(f"unexpected {kind!r} message in the round stream")
        except WireError as err:
            raise ClientError(f"malformed round delta from the server: {err}") from None

    def _check_header(self, h: pb.RoundHeader) -> pb.RoundHeader:
        if h.status not in (pb.ROUND_STATUS_TRAIN, pb.ROUND_STATUS_WAIT, pb.ROUND_STATUS_FINISHED):
            raise ClientError(f"round header with unknown status {h.status}")
        if h.status == pb.ROUND_STATUS_WAIT:
            return h
        total = self.p.cfg.rounds.total
        if h.target_round > total or (h.status == pb.ROUND_STATUS_TRAIN and h.round != h.target_round):
            raise ClientError(f"round header for round {h.round}, target {h.target_round}: not a round of this "
                              f"{total}-round run")
        _fingerprint(h.state_fingerprint, "state fingerprint")
        if h.status == pb.ROUND_STATUS_TRAIN:
            _fingerprint(h.plan_fingerprint, "plan fingerprint")
            self._check_seeds(list(h.seeds), h.round, "the server's seeds for round")
        lacking = h.target_round - self.p.have
        if h.catch_up == pb.CATCH_UP_DELTAS and h.num_deltas != lacking:
            raise ClientError(f"the server announced {h.num_deltas} deltas; from round {self.p.have} to "
                              f"{h.target_round} takes {lacking}")
        if h.catch_up != pb.CATCH_UP_DELTAS and h.num_deltas:
            raise ClientError(f"the server announced {h.num_deltas} deltas without a delta catch-up")
        if h.catch_up == pb.CATCH_UP_SNAPSHOT and h.snapshot_round != h.target_round:
            raise ClientError(f"snapshot of round {h.snapshot_round} announced for target {h.target_round}")
        return h

    def _check_seeds(self, sent: list[int], round_id: int, what: str) -> list[int]:
        """The seeds of ``round_id``: those sent, which must be the ones the run derives for
        it; for a method whose seeds are fixed for the run, none sent means the ones kept
        since they were (``Participant.seeds``)."""
        if (sent or self.p.method.seeds_per_round) and sent != self.p.method.round_seeds(round_id):
            raise ClientError(f"{what} {round_id} are not the ones this run derives")
        try:
            return self.p.seeds(sent)
        except ParticipantError as err:
            raise ClientError(str(err)) from None

    def _start_delta(self, dh: pb.DeltaHeader) -> None:
        expected = self.p.have + len(self.deltas)
        if dh.round != expected:
            raise ClientError(f"the server sent the delta of round {dh.round}, expected round {expected}")
        seeds = self._check_seeds(list(dh.seeds), dh.round, "the seeds of the delta of round")
        spec = self.p.delta_spec(seeds)
        limit = min(spec_bytes(spec, self.wire), max(self._budget, 0))
        self.deltas.append((dh, TensorAssembler(spec, self.wire, max_bytes=limit)))

    def finish(self) -> tuple[pb.RoundHeader, list[tuple[pb.DeltaHeader, TensorAssembler]]]:
        """The round header and every announced delta once the stream ended; ``ClientError`` when some
        were missing."""
        if self.header is None:
            raise ClientError("the server's round stream carried no header")
        if len(self.deltas) != self.header.num_deltas:
            raise ClientError(f"the server announced {self.header.num_deltas} deltas and sent {len(self.deltas)}")
        return self.header, self.deltas


class SnapshotReader:
    """Reads one GetSnapshot stream of round ``round_id`` (module docstring)."""

    def __init__(self, participant: Participant, round_id: int):
        self.round_id = round_id
        spec = participant.state_spec()
        size = participant.state_bytes()
        self.asm = TensorAssembler(spec, None, max_bytes=size)
        self.header: pb.RoundHeader | None = None
        self._messages_left = 2 + len(spec) + size // MIN_CHUNK_BYTES

    def add(self, msg: pb.GetSnapshotResponse) -> None:
        """Take in one message of the GetSnapshot stream; ``ClientError`` on a stream that goes past
        the state's size or names another round."""
        self._messages_left -= 1
        if self._messages_left < 0:
            raise ClientError(f"the snapshot of round {self.round_id} goes on past the state's size")
        kind = msg.WhichOneof("body")
        if kind == "header" and self.header is None:
            if msg.header.round != self.round_id:
                raise ClientError(f"asked for the snapshot of round {self.round_id}, got round {msg.header.round}")
            _fingerprint(msg.header.state_fingerprint, "snapshot fingerprint")
            self.header = msg.header
        elif kind == "tensors" and self.header is not None:
            try:
                self.asm.add(msg.tensors)
            except WireError as err:
                raise ClientError(f"malformed snapshot of round {self.round_id}: {err}") from None
        else:
            raise ClientError(f"unexpected {kind!r} message in the snapshot stream")
