"""The server's message streams, built in one place for the gRPC service and the in-process
simulator, so that a simulated run counts exactly the message bytes a distributed run sends.

Each stream yields ``(message, payload bytes it carries)``: the payload layer of the byte
accounting (tensor bytes, plus ``SEED_BYTES`` per seed), next to the message itself whose
serialized size is the message layer (``accounting.message_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import payload_bytes, seeds_bytes
from ..common.wire import tensor_batches
from .rounds import Assignment, RoundDelta

CATCH_UP = {"none": pb.CATCH_UP_NONE, "deltas": pb.CATCH_UP_DELTAS, "snapshot": pb.CATCH_UP_SNAPSHOT}
STATUS = {"train": pb.ROUND_STATUS_TRAIN, "finished": pb.ROUND_STATUS_FINISHED}


def assignment_messages(task: Assignment, delta_messages: Callable[[RoundDelta], list[pb.StartRoundResponse]]
                        ) -> Iterator[tuple[pb.StartRoundResponse, int]]:
    """StartRound's answer to a client with work: the header, then each delta it lacks (its
    header and tensor batches, the latter from ``delta_messages``, e.g. a ``DeltaEncodings``)."""
    header = pb.RoundHeader(
        status=STATUS[task.status], round=task.round, seeds=task.seeds,
        plan_fingerprint=task.plan_fingerprint, catch_up=CATCH_UP[task.catch_up],
        target_round=task.target_round, state_fingerprint=task.state_fingerprint,
        num_deltas=len(task.deltas), snapshot_round=task.target_round if task.catch_up == "snapshot" else 0,
        deadline_unix=task.deadline_unix)
    yield pb.StartRoundResponse(header=header), seeds_bytes(len(task.seeds))
    for d in task.deltas:
        seeds = d.seeds if task.seeds_in_deltas else []
        head = pb.DeltaHeader(round=d.round, seeds=seeds, num_tensors=len(d.tensors))
        yield pb.StartRoundResponse(delta=head), d.tensor_bytes + seeds_bytes(len(seeds))
        for m in delta_messages(d):
            yield m, 0


class DeltaEncodings:
    """A delta's tensor messages, encoded once and shared by every client that needs it (N
    clients polling when a round opens must not mean N encoded copies); only the last
    ``keep_rounds`` rounds' encodings are kept."""

    def __init__(self, chunk: int, keep_rounds: int):
        self.chunk = chunk
        self.keep_rounds = keep_rounds
        self._encoded: dict[int, list[pb.StartRoundResponse]] = {}

    def __call__(self, delta: RoundDelta) -> list[pb.StartRoundResponse]:
        cached = self._encoded.get(delta.round)
        if cached is None:
            cached = [pb.StartRoundResponse(tensors=b) for b in tensor_batches(delta.tensors, None, self.chunk)]
            self._encoded[delta.round] = cached
            for old in [r for r in self._encoded if r < delta.round - self.keep_rounds]:
                del self._encoded[old]
        return cached


def snapshot_messages(round_id: int, state: dict[str, torch.Tensor], state_fingerprint: str,
                      chunk: int) -> Iterator[tuple[pb.GetSnapshotResponse, int]]:
    """GetSnapshot's answer: a header with the state's round and fingerprint, then the state."""
    header = pb.RoundHeader(round=round_id, target_round=round_id, state_fingerprint=state_fingerprint)
    yield pb.GetSnapshotResponse(header=header), payload_bytes(state)
    for batch in tensor_batches(state, None, chunk):
        yield pb.GetSnapshotResponse(tensors=batch), 0
