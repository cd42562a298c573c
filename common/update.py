"""One update's record: what its header reports besides its tensors, on both sides of the wire.

The client builds it from what it trained (``PreparedUpdate.record``), the transport carries it
as the protobuf ``UpdateHeader`` and the server reads it back; each direction is written once,
here (``UpdateRecord.header``, ``UpdateRecord.of_header``), so a field added to the header is
added in one place. What a privacy mode keeps from the server is one function too
(``redacted``): an honest client sends the redacted record, and the server redacts whatever it
receives the same way, so a client that sends more reveals nothing more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedkrso.v1 import coordinator_pb2 as pb


@dataclass(frozen=True)
class UpdateRecord:
    """An update's header fields (``fedkrso.v1.UpdateHeader`` less the run id)."""

    round: int
    digest: str
    num_samples: int
    steps: int
    num_tensors: int = 0
    loss: float = 0.0
    train_seconds: float = 0.0
    peak_rss_bytes: int = 0
    train_state_bytes: int = 0
    seeds_used: tuple[int, ...] = ()
    eval_metrics: tuple[tuple[str, float], ...] = ()  # the client's evaluation of W^round, if due
    eval_examples: int = 0
    accelerator_peak_bytes: int = 0

    @classmethod
    def of_header(cls, h: pb.UpdateHeader) -> UpdateRecord:
        """The record a received header carries (unchecked: the server validates it)."""
        return cls(int(h.round), h.update_digest, int(h.num_samples), int(h.steps), int(h.num_tensors),
                   float(h.loss), float(h.train_seconds), int(h.peak_rss_bytes), int(h.train_state_bytes),
                   tuple(h.seeds_used), tuple((m.name, float(m.value)) for m in h.eval_metrics),
                   int(h.eval_examples), int(h.accelerator_peak_bytes))

    def header(self, run_id: str) -> pb.UpdateHeader:
        """The header that opens this update's stream (a zero or empty field is not sent)."""
        return pb.UpdateHeader(
            run_id=run_id, round=self.round, num_samples=self.num_samples, loss=self.loss, steps=self.steps,
            seeds_used=self.seeds_used, num_tensors=self.num_tensors, update_digest=self.digest,
            train_seconds=self.train_seconds, peak_rss_bytes=self.peak_rss_bytes,
            train_state_bytes=self.train_state_bytes,
            eval_metrics=[pb.EvalMetric(name=k, value=v) for k, v in sorted(self.eval_metrics)],
            eval_examples=self.eval_examples, accelerator_peak_bytes=self.accelerator_peak_bytes)

    def redacted(self, figures: bool, draws: bool) -> UpdateRecord:
        """This record without the client's own figures (``figures``: loss, timings, memory,
        evaluation) and without the seeds it names (``draws``): what a privacy mode lets the
        server keep even from a client that sent them, and all an honest client sends. The
        round, row count (the weight, the DP-SGD ledger's rate), steps (the ledger's step
        count), tensor count and digest stay: the protocol needs them (docs/PRIVACY.md)."""
        out = self
        if figures:
            out = dataclasses.replace(out, loss=0.0, train_seconds=0.0, peak_rss_bytes=0, train_state_bytes=0,
                                      eval_metrics=(), eval_examples=0, accelerator_peak_bytes=0)
        return dataclasses.replace(out, seeds_used=()) if draws else out
