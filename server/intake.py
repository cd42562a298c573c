"""Taking in updates: a record checked against the open round, the tensors folded into the
round's running aggregate, durably, before the acknowledgement.

The intake sees the run through narrow parts only: the open-round ledger (``ledger.py``), the
method and model (the update's spec, keyed choices and size), the weights, the privacy guard
and the clients' declared held-out rows; never the coordinator.

Group commit: every accepted update must be on disk before it is acknowledged, but one write
of the open round saves every update folded so far, so the updates that arrive while a write
runs share the next one (``_persist_folds``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from ..common.accounting import ConnCounters
from ..common.config import RunConfig
from ..common.logs import bounded
from ..common.methods import Method
from ..common.privacy.config import PrivacySection
from ..common.tensors import non_finite, spec_bytes
from ..common.update import UpdateRecord
from . import client_eval
from .ledger import RoundLedger
from .privacy import PrivacyGuard
from .rounds import RoundError, RoundState, Submission
from .weights import RoundWeights

log = structlog.get_logger("fedkrso.server")
Spec = dict[str, tuple[int, ...]]


def kept(record: UpdateRecord, privacy: PrivacySection) -> UpdateRecord:
    """What the server keeps of a received record: less what ``privacy`` keeps from it
    (``UpdateRecord.redacted``), whatever the client sent."""
    return record.redacted(figures=privacy.any, draws=privacy.secure_aggregation.enabled)


@dataclass(frozen=True)
class Admission:
    """An update record that passed its checks: for the open round ``rs`` (None: the same
    update was accepted already, a duplicate to answer as such), and what its tensors may be
    (``spec`` names and shapes in ``wire`` dtype, ``required`` names)."""

    client_id: str
    record: UpdateRecord
    rs: RoundState | None
    spec: Spec
    required: frozenset[str]
    wire: str

    @property
    def duplicate(self) -> bool:
        """Whether the header is a resubmission of an update already folded (nothing to fold)."""
        return self.rs is None

    @property
    def max_bytes(self) -> int:
        """The most tensor bytes its stream may carry (a duplicate's is read and dropped)."""
        return spec_bytes(self.spec, self.wire)


class UpdateIntake:
    """Validates and folds the updates of the open round."""

    def __init__(self, ledger: RoundLedger, cfg: RunConfig, method: Method, model: nn.Module,
                 weights: RoundWeights, privacy: PrivacyGuard, eval_rows: Callable[[str], int]):
        """``eval_rows(client)``: the held-out rows the client declared when it joined."""
        self.ledger, self.cfg, self.method, self.model = ledger, cfg, method, model
        self.weights, self.privacy, self.eval_rows = weights, privacy, eval_rows
        # the open round's update spec, built once per round's seeds, not once per update
        self._spec: tuple[tuple[int, ...], Spec, set[str]] | None = None

    def admit(self, client_id: str, run_id: str, record: UpdateRecord) -> Admission:
        """Check ``record`` (as received) against the open round and the client's evaluation;
        the ``Admission``, holding the record less what the run's privacy keeps from the server
        (``UpdateRecord.redacted``), or a ``RoundError`` naming the status to answer with."""
        for name in ("loss", "train_seconds"):  # reported figures end up in metrics.jsonl
            if not math.isfinite(getattr(record, name)):
                raise RoundError("INVALID_ARGUMENT", f"header {name} is not finite")
        record = kept(record, self.cfg.privacy)
        rs = self.check_header(client_id, run_id, record.round, record.num_samples, record.digest)
        wire = self.cfg.method.wire_dtype
        if rs is None:
            spec = self.method.update_spec(self.model, self.method.round_seeds(record.round))
            return Admission(client_id, record, None, spec, frozenset(), wire)
        self.check_eval(rs, client_id, record)
        spec, required = self.update_spec(rs)
        return Admission(client_id, record, rs, spec, frozenset(required), wire)

    def check_header(self, client_id: str, run_id: str, round_id: int, num_samples: int,
                     digest: str) -> RoundState | None:
        """Validate an update header. Returns the open round, or None for an idempotent
        resubmission of an update already accepted (same digest)."""
        led = self.ledger
        if run_id != led.run_id:
            raise RoundError("FAILED_PRECONDITION", f"update for run {bounded(run_id)}, this run is {led.run_id!r}")
        rs = led.current
        if round_id < led.completed or (rs is None and round_id == led.completed and led.finished):
            prior = led.accepted_digests.get((round_id, client_id))
            if prior is not None and prior == digest:
                return None  # resubmission of an update already folded into a closed round
            raise RoundError("FAILED_PRECONDITION", f"stale update for round {round_id}; round "
                             f"{led.completed} is current{' (already accepted)' if prior else ''}")
        if rs is None or round_id != rs.round:
            raise RoundError("FAILED_PRECONDITION", f"update for round {round_id}, which is not open "
                             f"(open: {rs.round if rs else 'none'})")
        if client_id in rs.submissions:
            if rs.submissions[client_id].digest == digest:
                return None
            raise RoundError("ALREADY_EXISTS", f"a different update for round {round_id} was already accepted")
        if client_id in rs.dropped:
            raise RoundError("FAILED_PRECONDITION", f"client was dropped from round {round_id} after its deadline")
        if client_id not in rs.selected:
            raise RoundError("PERMISSION_DENIED", f"client is not selected for round {round_id}")
        if rs.closing:
            raise RoundError("FAILED_PRECONDITION", f"round {round_id} is closing; update too late")
        led.declare(rs, [client_id])  # a no-op unless restored from an older state format
        declared = rs.declared[client_id]
        if not 1 <= num_samples <= declared:
            raise RoundError("INVALID_ARGUMENT", f"num_samples={num_samples} outside [1, {declared}] "
                             "(the shard size declared when the round selected it)")
        return rs

    def check_eval(self, rs: RoundState, client_id: str, record: UpdateRecord) -> None:
        """The client's evaluation in ``record`` is one this run's clients send
        (``client_eval.check``): INVALID_ARGUMENT otherwise, before any tensor is read."""
        client_eval.check(self.cfg, rs.round, record, self.eval_rows(client_id))

    def update_spec(self, rs: RoundState) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """(name -> shape of what an update of ``rs`` may carry, the names it must carry)."""
        seeds = tuple(rs.seeds)
        if self._spec is None or self._spec[0] != seeds:
            method, model = self.method, self.model
            self._spec = (seeds, method.update_spec(model, rs.seeds), method.required_names(model, rs.seeds))
        return self._spec[1], self._spec[2]

    async def accept(self, adm: Admission, tensors: dict[str, torch.Tensor], up_payload: int, up_message: int,
                     counters: ConnCounters | None, down_at_submit: int | None) -> bool:
        """Fold the tensors of an admitted update into the round's running sum (as float32).
        False: the same update was already folded (a duplicate), nothing changed.

        ``counters`` are the socket counters of the connection the update came on (None when
        not measured) and ``down_at_submit`` their downlink count when the upload began: the
        client's wire bytes are measured from its download's mark when both are on the same
        connection, and stay unmeasured (None) when the connection changed (a restart)."""
        rs, client_id, report = adm.rs, adm.client_id, adm.record
        tensors = {k: v.float() for k, v in tensors.items()}
        bad = non_finite(tensors)
        if bad is not None:
            raise RoundError("INVALID_ARGUMENT", f"tensor {bad!r} has non-finite values")
        norm = await asyncio.to_thread(self._check_values, rs, client_id, tensors, list(report.seeds_used))
        led = self.ledger
        async with led.fold_lock:
            # checked under the lock: concurrent streams of one client must not both fold
            if not led.is_open(rs):
                raise RoundError("FAILED_PRECONDITION", f"round {rs.round} closed before the update completed")
            weight = self.weights.fold_weight(rs, client_id, report.num_samples)
            sub = Submission.of(client_id, report, weight, norm)
            prior = rs.submissions.get(sub.client_id)
            duplicate = prior is not None
            if duplicate and prior.digest != sub.digest:
                raise RoundError("ALREADY_EXISTS", f"an update for round {rs.round} was already accepted")
            if not duplicate:
                if self.privacy.central:  # clipped to the DP bound in the same space (the weight change)
                    tensors = await asyncio.to_thread(self.privacy.screen, rs, tensors)
                    norm = min(norm, self.cfg.privacy.dp.clip)
                await asyncio.to_thread(rs.aggregator.add, tensors, sub.weight, norm)
                traffic = rs.traffic_of(sub.client_id)
                traffic.up_payload, traffic.up_message = up_payload, up_message
                mark = traffic.download
                if mark is not None and mark.same_connection(counters):
                    traffic.up_wire = counters.up - mark.up
                    traffic.down_wire = down_at_submit - mark.down
                else:
                    traffic.up_wire = None
                led.accepted(rs, sub)
                rs.folds += 1
            fold = rs.folds
        # before the acknowledgement; a duplicate (the same update, folded by a concurrent
        # stream) is acknowledged only once the original is durable too
        await self._persist_folds(rs, fold)
        if duplicate:
            return False
        if self.cfg.privacy.any:  # who was sampled, and each update's figures, stay out of the log
            log.info("update_accepted", round=rs.round, received=len(rs.submissions), selected=len(rs.selected))
        else:
            log.info("update_accepted", round=rs.round, client=sub.client_id, loss=round(sub.loss, 4),
                     weight=sub.weight, update_norm=round(norm, 6),
                     payload_bytes=up_payload, wire_bytes=rs.traffic[sub.client_id].up_wire,
                     received=len(rs.submissions), selected=len(rs.selected))
        await led.notify()
        return True

    def _check_values(self, rs: RoundState, client_id: str, tensors: dict[str, torch.Tensor],
                      seeds_used: list[int]) -> float:
        """Refuse an update outside its client's keyed choices (the method recomputes them from
        run seed, round and client id) or larger than ``server.max_update_norm``; its size
        (``method.update_norm``: the norm of the weight change it implies) otherwise."""
        method, model, dp = self.method, self.model, self.cfg.privacy.dp
        # local DP noises every tensor of the spec, drawn or not (common/privacy/dp.py): there
        # the keyed choices cannot be checked, the size bound below still holds
        if not (dp.enabled and dp.mode == "local"):
            problem = method.keyed_update_problem(model, rs.seeds, rs.round, client_id, tensors, seeds_used)
            if problem is not None:
                raise RoundError("INVALID_ARGUMENT", problem)
        norm = method.update_norm(model, rs.seeds, tensors)
        configured = self.cfg.server.max_update_norm
        bound = self.privacy.update_bound(rs, configured)
        if not norm <= (math.inf if bound is None else bound):  # NaN (an overflow) is refused too
            what = f"server.max_update_norm={bound:g}" if bound == configured else \
                f"{bound:.6g}, what local DP's clip and noise allow (privacy.dp)"
            raise RoundError("INVALID_ARGUMENT", f"update norm {norm:.6g} (of the weight change it implies) "
                             f"exceeds {what}")
        return norm

    async def _persist_folds(self, rs: RoundState, fold: int) -> None:
        """Return once the first ``fold`` updates of ``rs`` are on disk: in the open round's
        state, or in the round commit when the round closed meanwhile.

        Group commit: a write takes ``fold_lock`` and saves every update folded so far, so
        the updates that arrive while one write runs share the next one. With N clients per
        round that is far fewer than N writes of the aggregate, each acknowledgement still
        comes after its update is durable."""
        while rs.saved_folds < fold:
            if rs.closing:
                await rs.committed.wait()
                return
            if rs.flusher is None or rs.flusher.done():
                rs.flusher = asyncio.create_task(self._flush_open(rs))
            await asyncio.shield(rs.flusher)

    async def _flush_open(self, rs: RoundState) -> None:
        async with self.ledger.fold_lock:
            if rs.closing:  # _close_round commits every fold
                return
            folds = rs.folds
            await self.ledger.save_open(rs, with_aggregate=True)
            rs.saved_folds = folds
