"""Taking in updates: a header checked against the open round, the tensors folded into the
round's running aggregate, durably, before the acknowledgement.

Group commit: every accepted update must be on disk before it is acknowledged, but one write
of the open round saves every update folded so far, so the updates that arrive while a write
runs share the next one (``_persist_folds``).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

import structlog
import torch

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import ConnCounters
from ..common.logs import bounded
from ..common.privacy.config import PrivacySection
from ..common.tensors import element_size, non_finite
from . import client_eval
from .rounds import RoundError, RoundState, Submission, UpdateReport

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = structlog.get_logger("fedkrso.server")


def report_of(h: pb.UpdateHeader, privacy: PrivacySection) -> UpdateReport:
    """What an update's header reports besides its tensors (the service's and the
    simulator's one reading of it), less what ``privacy`` keeps from the server
    (``UpdateReport.redacted``); the evaluation part is checked by ``check_eval``."""
    report = UpdateReport(h.update_digest, int(h.num_samples), float(h.loss), int(h.steps), float(h.train_seconds),
                          int(h.peak_rss_bytes), int(h.train_state_bytes), tuple(h.seeds_used),
                          tuple((m.name, float(m.value)) for m in h.eval_metrics), int(h.eval_examples),
                          int(h.accelerator_peak_bytes))
    return report.redacted(figures=privacy.any, draws=privacy.secure_aggregation.enabled)


class UpdateIntake:
    """Validates and folds the updates of a coordinator's open round."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        # the open round's update spec, built once per round's seeds, not once per update
        self._spec: tuple[tuple[int, ...], dict[str, tuple[int, ...]], set[str]] | None = None

    def check_header(self, client_id: str, run_id: str, round_id: int, num_samples: int,
                     digest: str) -> RoundState | None:
        """Validate an update header. Returns the open round, or None for an idempotent
        resubmission of an update already accepted (same digest)."""
        c = self.coord
        if run_id != c.run_id:
            raise RoundError("FAILED_PRECONDITION", f"update for run {bounded(run_id)}, this run is {c.run_id!r}")
        rs = c.current
        if round_id < c.completed or (rs is None and round_id == c.completed and c.finished):
            prior = c.accepted_digests.get((round_id, client_id))
            if prior is not None and prior == digest:
                return None  # resubmission of an update already folded into a closed round
            raise RoundError("FAILED_PRECONDITION", f"stale update for round {round_id}; round "
                             f"{c.completed} is current{' (already accepted)' if prior else ''}")
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
        c.freeze_weights(rs, [client_id])  # a no-op unless restored from an older state format
        declared = rs.declared[client_id]
        if not 1 <= num_samples <= declared:
            raise RoundError("INVALID_ARGUMENT", f"num_samples={num_samples} outside [1, {declared}] "
                             "(the shard size declared when the round selected it)")
        return rs

    def max_update_bytes(self, round_id: int) -> int:
        """The most tensor bytes an update of round ``round_id`` can carry (wire dtype)."""
        method, model = self.coord.method, self.coord.model
        spec = method.update_spec(model, method.round_seeds(round_id))
        return sum(math.prod(s) for s in spec.values()) * element_size(self.coord.cfg.method.wire_dtype)
    def check_eval(self, rs: RoundState, client_id: str, report: UpdateReport) -> None:
        """The client's evaluation in ``report`` is one this run's clients send
        (``client_eval.check``): INVALID_ARGUMENT otherwise, before any tensor is read."""
        declared = self.coord.registry.get(client_id).eval_samples
        client_eval.check(self.coord.cfg, rs.round, report, declared)

    def update_spec(self, rs: RoundState) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """(name -> shape of what an update of ``rs`` may carry, the names it must carry)."""
        seeds = tuple(rs.seeds)
        if self._spec is None or self._spec[0] != seeds:
            method, model = self.coord.method, self.coord.model
            self._spec = (seeds, method.update_spec(model, rs.seeds), method.required_names(model, rs.seeds))
        return self._spec[1], self._spec[2]

    async def accept(self, rs: RoundState, client_id: str, report: UpdateReport,
                     tensors: dict[str, torch.Tensor], up_payload: int, up_message: int,
                     counters: ConnCounters | None, down_at_submit: int | None) -> bool:
        """Fold a validated update into the round's running sum. False: the same update was
        already folded (a duplicate), nothing changed.

        ``counters`` are the socket counters of the connection the update came on (None when
        not measured) and ``down_at_submit`` their downlink count when the upload began: the
        client's wire bytes are measured from its download's mark when both are on the same
        connection, and stay unmeasured (None) when the connection changed (a restart)."""
        bad = non_finite(tensors)
        if bad is not None:
            raise RoundError("INVALID_ARGUMENT", f"tensor {bad!r} has non-finite values")
        norm = await asyncio.to_thread(self._check_values, rs, client_id, tensors, list(report.seeds_used))
        async with self.coord.fold_lock:
            # checked under the lock: concurrent streams of one client must not both fold
            if rs.closing or self.coord.current is not rs:
                raise RoundError("FAILED_PRECONDITION", f"round {rs.round} closed before the update completed")
            weight = self.coord.weights.fold_weight(rs, client_id, report.num_samples)
            sub = Submission.of(client_id, report, weight, norm)
            prior = rs.submissions.get(sub.client_id)
            duplicate = prior is not None
            if duplicate and prior.digest != sub.digest:
                raise RoundError("ALREADY_EXISTS", f"an update for round {rs.round} was already accepted")
            if not duplicate:
                if self.coord.privacy.central:  # clipped to the DP bound in the same space (the weight change)
                    tensors = await asyncio.to_thread(self.coord.privacy.screen, rs, tensors)
                    norm = min(norm, self.coord.cfg.privacy.dp.clip)
                await asyncio.to_thread(rs.aggregator.add, tensors, sub.weight, norm)
                traffic = rs.traffic_of(sub.client_id)
                traffic.up_payload, traffic.up_message = up_payload, up_message
                mark = traffic.download
                if mark is not None and mark.same_connection(counters):
                    traffic.up_wire = counters.up - mark.up
                    traffic.down_wire = down_at_submit - mark.down
                else:
                    traffic.up_wire = None
                rs.submissions[sub.client_id] = sub
                self.coord.accepted_digests[(rs.round, sub.client_id)] = sub.digest
                rs.folds += 1
            fold = rs.folds
        # before the acknowledgement; a duplicate (the same update, folded by a concurrent
        # stream) is acknowledged only once the original is durable too
        await self._persist_folds(rs, fold)
        if duplicate:
            return False
        if self.coord.cfg.privacy.any:  # who was sampled, and each update's figures, stay out of the log
            log.info("update_accepted", round=rs.round, received=len(rs.submissions), selected=len(rs.selected))
        else:
            log.info("update_accepted", round=rs.round, client=sub.client_id, loss=round(sub.loss, 4),
                     weight=sub.weight, update_norm=round(norm, 6),
                     payload_bytes=up_payload, wire_bytes=rs.traffic[sub.client_id].up_wire,
                     received=len(rs.submissions), selected=len(rs.selected))
        await self.coord.notify()
        return True

    def _check_values(self, rs: RoundState, client_id: str, tensors: dict[str, torch.Tensor],
                      seeds_used: list[int]) -> float:
        """Refuse an update outside its client's keyed choices (the method recomputes them from
        run seed, round and client id) or larger than ``server.max_update_norm``; its size
        (``method.update_norm``: the norm of the weight change it implies) otherwise."""
        method, model, dp = self.coord.method, self.coord.model, self.coord.cfg.privacy.dp
        # local DP noises every tensor of the spec, drawn or not (common/privacy/dp.py): there
        # the keyed choices cannot be checked, the size bound below still holds
        if not (dp.enabled and dp.mode == "local"):
            problem = method.keyed_update_problem(model, rs.seeds, rs.round, client_id, tensors, seeds_used)
            if problem is not None:
                raise RoundError("INVALID_ARGUMENT", problem)
        norm = method.update_norm(model, rs.seeds, tensors)
        configured = self.coord.cfg.server.max_update_norm
        bound = self.coord.privacy.update_bound(rs, configured)
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
        async with self.coord.fold_lock:
            if rs.closing:  # _close_round commits every fold
                return
            folds = rs.folds
            await self.coord.save_open(rs, with_aggregate=True)
            rs.saved_folds = folds
