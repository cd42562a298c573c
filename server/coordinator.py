"""The round loop of a run: wait for clients, open a round, fold updates, close it, repeat.

No gRPC here: every transport (the gRPC service, the simulator) drives a round through the
round port (``port.py``), which calls the methods under "for the port"; no transport touches
the state below. The coordinator's
collaborators each hold one concept: the client registry (``registry.py``: join, leave,
liveness, selection), the round records (``rounds.py``), persistence (``state.py``), the
metrics row (``metrics.py``) and where else it goes (``trackers.py``: ``run.report_to``),
evaluation and the final model (``results.py``), the deadline policy (``deadlines.py``) on
the run's clock (``clock.py``), and the open-round ledger (``ledger.py``) that the update
intake (``intake.py``) and secure aggregation (``secagg.py``) see instead of the coordinator.
Transports reach it only through the round port (``port.py``). All state lives on one asyncio
loop; heavy work (aggregation, applying deltas, evaluation) runs in a
worker thread while ``model_lock`` or ``fold_lock`` is held.

Every state change that must survive a crash goes through ``state.py`` before it is
acknowledged: a round's delta when it closes, the open round when an update is accepted or
the selection changes (and, in the background, when a download finished). A restarted server
with the same config resumes from there.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

import structlog
import torch

from ..common.accounting import full_model_bytes, payload_bytes, seeds_bytes
from ..common.aggregate import Aggregator, build_aggregator
from ..common.config import RunConfig
from ..common.logs import bounded, progress
from ..common.models import base_identity
from ..common.participant import Shared
from ..common.precision import Placement
from ..common.tensors import DTYPES
from .clock import Clock, RealClock
from .deadlines import DeadlinePolicy
from .intake import UpdateIntake
from .ledger import RoundLedger
from .metrics import MetricsWriter, round_row
from .polls import PollWaiters
from .privacy import PrivacyGuard
from .secagg import SecureAggregation
from .registry import ClientRegistry
from .results import ServerEvaluator, save_final
from .rounds import Assignment, RoundDelta, RoundError, RoundState, StateCopy
from .open_round import restore_round
from .state import RunStore, SavedRun, move_aside, rebuild, run_identity, shaping_config
from .trackers import Trackers
from .weights import RoundWeights

log = structlog.get_logger("fedkrso.server")


class Coordinator:
    """The state of one federated run on the server."""

    def __init__(self, cfg: RunConfig, fresh: bool = False, *, registry: ClientRegistry | None = None,
                 deadlines: bool = True, placement: Placement | None = None, clock: Clock | None = None):
        """Load the base model (on ``placement``, default round.yaml's ``model.device`` and
        ``model.dtype``; one copy, common/precision.py) and, unless ``fresh``, resume the
        saved state of this run_id from ``<output_dir>/state`` (``StateError`` if it belongs
        to another run or does not replay to its recorded fingerprints). The in-process
        simulator passes a registry in which clients stay live and turns ``deadlines`` off: it
        trains clients one after the other and every selected client always submits. ``clock``
        (default the host's): the time of deadlines and phase timeouts; a test passes a
        ``clock.FakeClock`` to move it by hand."""
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_id = run_identity(cfg)
        self.trackers = Trackers(cfg.run.report_to, self.out, self.run_id, shaping_config(cfg))  # fails fast
        self.shared = Shared.load(cfg, placement=placement)
        self.method, self.model = self.shared.method, self.shared.model
        self.model.eval()
        self.base = base_identity(cfg.model.name, self.model, self.shared.identity)
        self.model_fingerprint = self.shared.identity
        self.state_bytes = payload_bytes(self.method.snapshot_tensors(self.model))  # a snapshot's payload
        self.fedavg_bytes = full_model_bytes(self.model)
        self.privacy = PrivacyGuard(cfg, self.method, self.model)
        self.registry = registry or ClientRegistry(cfg.run.seed, max_clients=cfg.server.max_clients)
        self.clock = clock or RealClock()
        self.deadlines = DeadlinePolicy(cfg.rounds, self.clock, enabled=deadlines)
        self.evaluate = ServerEvaluator(cfg)
        self.weights = RoundWeights(cfg.training)
        self.store = RunStore(self.out / "state", self.run_id, shaping_config(cfg), self.base)
        self.ledger = RoundLedger(self.run_id, self.clock, self.store, lambda c: self.registry.get(c).num_samples)
        self.intake = UpdateIntake(self.ledger, cfg, self.method, self.model, self.weights, self.privacy,
                                   lambda c: self.registry.get(c).eval_samples)
        self.secagg = SecureAggregation(self.ledger, cfg, lambda seeds: self.method.update_spec(self.model, seeds)) \
            if cfg.privacy.secure_aggregation.enabled else None
        self.deltas: dict[int, RoundDelta] = {}
        self.state_fingerprints = {0: self.method.state_fingerprint(self.model)}
        self._last_row: dict | None = None
        self._snapshot_copy: tuple[int, weakref.ref] = (-1, lambda: None)  # round, its shared copy
        self.polls = PollWaiters()  # clients' long-polls: woken only when their answer may change
        self.model_lock = asyncio.Lock()
        self._wakeups: set[asyncio.Task] = set()  # notifications scheduled by ``touch``
        saved = None if fresh else self.store.load()
        if saved is None:
            move_aside(self.out)
            self.store.start(self.state_fingerprints[0])
        self.metrics = MetricsWriter(self.out / "metrics.jsonl")
        log.info("run_loaded", run_id=self.run_id, method=cfg.method.name, model=cfg.model.name,
                 state_bytes=self.state_bytes)
        if saved is not None:
            self._resume(saved)

    # -- resuming ------------------------------------------------------------------------------
    def _resume(self, saved: SavedRun) -> None:
        """Rebuild the model at the last completed round (checkpoint + replay of the later
        deltas, each checked against its recorded fingerprint) and restore the open round."""
        keep = max(0, saved.completed - self.cfg.server.snapshot_after_rounds)  # for catch-up

        def kept(r: int, tensors: dict[str, torch.Tensor]) -> None:
            if r >= keep:
                self.deltas[r] = RoundDelta(r, saved.seeds[r], tensors, saved.state_fingerprints[r + 1])

        start = rebuild(self.method, self.model, self.store.history(saved), saved.completed,
                        "refusing to resume (--fresh starts over)", visit=kept)
        for r in range(keep, start):  # before the checkpoint: read, not replayed
            kept(r, self.store.delta(r))
        self.method.load_plan_state(saved.plan_state)  # decided before the checkpoint too
        self.privacy.load(saved.privacy)
        self.completed = saved.completed
        self.state_fingerprints = dict(saved.state_fingerprints)
        self.ledger.accepted_digests = dict(saved.accepted_digests)
        self._last_row = saved.last_row
        if saved.open_round is not None:
            self.current = restore_round(saved.open_round, saved.open_tensors, self._aggregator(), self.deadlines)
            if self.secagg is not None:  # its protocol was not saved: it starts again, fresh keys
                self.current.submissions.clear()
            for client_id, sub in self.current.submissions.items():
                self.accepted_digests[(self.current.round, client_id)] = sub.digest
        rs = self.current
        log.info("run_resumed", round=self.completed, checkpoint=start, replayed=self.completed - start,
                 open_round=rs is not None, accepted=len(rs.submissions) if rs else 0,
                 deadline_remaining_s=round(rs.deadline - self.clock.monotonic(), 1) if rs else None)

    def _aggregator(self) -> Aggregator:
        s = self.cfg.server
        return build_aggregator(s.aggregation, s.clip_norm, s.trim_fraction)

    # -- the ledger's state, read here as the coordinator's ----------------------------------
    current = property(lambda self: self.ledger.current, lambda self, rs: setattr(self.ledger, "current", rs),
                       doc="The open round, if any.")
    completed = property(lambda self: self.ledger.completed,
                         lambda self, n: setattr(self.ledger, "completed", n), doc="Rounds completed.")
    finished = property(lambda self: self.ledger.finished,
                        lambda self, done: setattr(self.ledger, "finished", done), doc="The run is over.")
    accepted_digests = property(lambda self: self.ledger.accepted_digests, doc="(round, client) -> digest.")
    fold_lock = property(lambda self: self.ledger.fold_lock, doc="Held while updates are folded or saved.")
    changed = property(lambda self: self.ledger.changed, doc="Notified on any change of the run.")

    async def save_open(self, rs: RoundState, with_aggregate: bool = False) -> None:
        """Persist the open round (``RoundLedger.save_open``; the aggregate too with ``with_aggregate``)."""
        await self.ledger.save_open(rs, with_aggregate)

    # -- waiting -------------------------------------------------------------------------------
    async def notify(self) -> None:
        """Wake whatever waits on the run's state (``RoundLedger.notify``)."""
        await self.ledger.notify()

    async def wait_change(self, timeout: float) -> None:
        """Wait until the run's state changes, or ``timeout`` seconds on the run's clock."""
        await self.ledger.wait_change(timeout)

    async def wait_for_work(self, client_id: str, timeout: float) -> None:
        """A poll of ``client_id`` that got no assignment waits here: until a round opens, the
        run finishes, the client is added to the open round or leaves (``polls.py``), or
        ``timeout``."""
        await self.polls.wait(client_id, timeout)

    # -- the run -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Wait for clients, run every round, then finish and save the model. After a restart:
        first the metrics row a crash kept from being written, then the restored open round."""
        if self._last_row is not None and not self.metrics.has(self._last_row["round"]):
            await self._write_row(self._last_row)
        if self.current is not None:
            await self._await_round(self.current)
        if self.completed < self.cfg.rounds.total:
            await self._wait_for_clients()
        for t in range(self.completed, self.cfg.rounds.total):
            if not await self._run_round(t):
                break  # the privacy budget would be exceeded: stop here, saving the model
        await self.finish()

    async def _wait_for_clients(self) -> None:
        r = self.cfg.rounds
        clock = self.clock
        give_up = clock.monotonic() + r.start_timeout_s
        with progress(total=r.clients_per_round, desc="clients joined", unit="client") as bar:
            while True:
                n = self.registry.selectable_bound()
                if n >= r.min_clients:  # enough asked for work: how many are live
                    n = len(self.registry.selectable())
                bar.update(min(n, bar.total) - bar.n)
                if n >= r.clients_per_round or (n >= r.min_clients and clock.monotonic() >= give_up):
                    return
                if clock.monotonic() >= give_up + r.start_timeout_s:
                    raise RuntimeError(f"only {n} client(s) joined; need {r.min_clients}")
                await self.wait_change(1.0)

    async def _run_round(self, t: int) -> bool:
        """Run round ``t``; False when its privacy cost would exceed the budget (not opened)."""
        r = self.cfg.rounds
        while len(self.registry.selectable()) < r.min_clients:
            log.warning("round_waiting_for_quorum", round=t, live=len(self.registry.selectable()))
            await self.wait_change(5.0)
        seeds = self.method.round_seeds(t)
        plan_fp = await asyncio.to_thread(self.method.plan_fingerprint, self.model, seeds)
        pool = self.registry.selectable()  # what the selection samples from: the amplification's population
        selected = set(self.registry.select(t, set(), r.clients_per_round, secret=self.privacy.secret_selection))
        rows = {c: self.registry.get(c).num_samples for c in selected}
        if not self.privacy.allows(t, len(selected), len(pool), rows):
            return False
        rs = RoundState(t, seeds, plan_fp, selected, self.deadlines.deadline(), started=self.clock.monotonic(),
                        aggregator=self._aggregator())
        self.ledger.declare(rs, selected)
        async with self.fold_lock:
            await self.save_open(rs)
            self.current = rs
        named = {} if self.cfg.privacy.any else {"clients": sorted(selected)}  # the sample stays out of the log
        log.info("round_started", round=t, selected=len(selected), seeds=len(seeds), **named)
        self.polls.wake_all()
        await self.notify()
        await self._await_round(rs)
        return True

    async def _await_round(self, rs: RoundState) -> None:
        """Until every selected client submitted, or the deadline passed with a quorum
        (``deadlines.py``; with secure aggregation: until its protocol unmasked the sum or
        failed)."""
        if self.secagg is not None:
            await self.secagg.run(rs)
            return await self._close_round(rs)
        policy = self.deadlines
        with progress(total=len(rs.selected), desc=f"round {rs.round} updates", unit="update") as bar:
            while True:
                bar.total = len(rs.selected)
                bar.update(len(rs.submissions) - bar.n)
                verdict = policy.verdict(rs)
                if verdict == "complete":
                    break
                if verdict == "quorum":
                    silent = policy.silent(rs)
                    rs.dropped |= silent
                    self.registry.mark_dropped(silent)
                    break
                if verdict == "short":
                    async with self.fold_lock:
                        self._replace_silent(rs)
                        await self.save_open(rs)
                    continue
                await self.wait_change(policy.next_check_s(rs))
        await self._close_round(rs)

    def _replace_silent(self, rs: RoundState) -> None:
        """The deadline passed without a quorum: the policy swaps silent clients for fresh
        live ones the registry and privacy allow, and extends the deadline."""
        policy = self.deadlines
        silent = self.registry.by_staleness(policy.silent(rs))
        # a secret sample charged at its size takes no replacements
        fresh = [] if self.privacy.secret_selection else \
            self.registry.select(rs.round, rs.selected | rs.dropped, policy.room(rs))
        fresh = [c for c in fresh if self.privacy.may_join(rs.round, c, self.registry.get(c).num_samples)]
        dropped = policy.replace(rs, silent, fresh)
        self.registry.mark_dropped(dropped)
        self.ledger.declare(rs, fresh)
        self.polls.wake(fresh)
        log.warning("round_extended", round=rs.round, dropped=dropped, added=fresh,
                    submitted=len(rs.submissions))

    async def _close_round(self, rs: RoundState) -> None:
        rs.closing = True
        async with self.fold_lock:
            mean = await asyncio.to_thread(self.privacy.release, rs)
        canonical = {k: v.to(DTYPES[self.cfg.method.wire_dtype]) for k, v in mean.items()}
        async with self.model_lock:
            await asyncio.to_thread(self.method.apply, self.model, rs.seeds, canonical)
            fp = await asyncio.to_thread(self.method.state_fingerprint, self.model)
            self.state_fingerprints[rs.round + 1] = fp
            row = {**round_row(rs, fp, self.fedavg_bytes, private=self.cfg.privacy.any, now=self.clock.monotonic()),
                   **self.privacy.row(len(self.registry.selectable())),
                   **(self.secagg.row(rs) if self.secagg else {})}
            due = (rs.round + 1) % self.cfg.server.checkpoint_every == 0
            checkpoint = self.method.snapshot(self.model) if due else None
            digests = {c: s.digest for c, s in rs.submissions.items()}
            await asyncio.to_thread(self.store.commit_round, rs.round, rs.seeds, canonical, fp, digests, row,
                                    checkpoint, self.method.plan_state(), self.privacy.state())
        rs.committed.set()
        self.deltas[rs.round] = RoundDelta(rs.round, rs.seeds, canonical, fp)
        # catch-up keeps the last snapshot_after_rounds deltas in memory (all are on disk);
        # a client further behind gets a snapshot, so server memory does not grow with rounds
        self.deltas.pop(rs.round - self.cfg.server.snapshot_after_rounds, None)
        self.completed = rs.round + 1
        self.current = None
        await self.notify()
        await self._write_row(row, rs.started)

    async def _write_row(self, row: dict, started: float | None = None) -> None:
        """Evaluate the model (at the round the row is of) and append the row to metrics.jsonl;
        ``started`` (monotonic) makes round_seconds include the evaluation, as before a crash."""
        evaluation = await asyncio.to_thread(self.evaluate, self.model)
        row = {**row, **evaluation}
        if started is not None:
            row["round_seconds"] = self.clock.monotonic() - started
        if self.metrics.write(row):
            await self.trackers.log(row, self.metrics.rows)
        log.info("round_closed", **{k: v for k, v in row.items() if k != "per_client"})

    async def finish(self) -> None:
        """End the run: no open round, every poll woken, the final model saved."""
        self.finished = True
        self.current = None
        self.polls.wake_all()
        await self.notify()
        await asyncio.to_thread(save_final, self.cfg, self.method, self.model, self.out,
                                self.state_fingerprints[self.completed])
        await self.trackers.close()
        log.info("run_finished", rounds=self.completed, output_dir=str(self.out))

    async def wait_for_clients_to_finish(self, timeout: float) -> None:
        """After the run, before the server stops: wait (at most ``timeout``) until every live
        client has left, or got its whole FINISHED stream a moment ago (its Leave was lost),
        so its final catch-up and Leave are not refused by a stopping server. The ones still
        waited for at ``timeout`` (``server.finish_wait_s``) are logged (``finish_wait_over``)."""
        give_up = self.clock.monotonic() + timeout
        while self.clock.monotonic() < give_up and self.registry.still_finishing():
            # on a clock, not on every change: each check scans the client table, and N
            # clients leaving one after the other made the wake-up per Leave O(N^2)
            await self.clock.wait(asyncio.Event().wait(), 0.25)
        if waiting := self.registry.still_finishing():
            log.warning("finish_wait_over", waited_s=timeout, clients=len(waiting), first=waiting[:5],
                        setting="server.finish_wait_s")

    # -- for the port: clients ----------------------------------------------------------------
    def touch(self, client_id: str, polling: bool = False) -> None:
        """``client_id`` was heard from (``polling``: it asks for work). A client asking for the
        first time may let a waiting round start: the round loop is woken then (once per
        client), so it never waits for a clock to notice."""
        asked = self.registry.selectable_bound()
        self.registry.touch(client_id, polling)
        if self.registry.selectable_bound() != asked:
            task = asyncio.get_running_loop().create_task(self.notify())
            self._wakeups.add(task)
            task.add_done_callback(self._wakeups.discard)

    async def join(self, client_id: str, name: str, num_samples: int, eval_samples: int = 0,
                   software_version: str = "") -> None:
        """Register ``client_id``; a full client table never forgets the open round's clients."""
        rs = self.current
        keep = (rs.selected | set(rs.submissions)) if rs is not None else set()
        self.registry.join(client_id, name, num_samples, eval_samples, keep, software_version)
        await self.notify()

    async def leave(self, client_id: str, reason: str) -> None:
        """``client_id`` leaves the run: out of the client table and of the open round, its poll ended."""
        self.registry.leave(client_id)
        await self.drop_from_round(client_id)
        log.info("client_left", client=client_id, reason=bounded(reason))
        self.polls.wake([client_id])  # its own poll ends (UNAUTHENTICATED)

    async def drop_from_round(self, client_id: str) -> None:
        """``client_id`` will not submit to the open round (it left, or its update was refused
        where nobody can retry it: the simulator): the round stops waiting for it."""
        rs = self.current
        if rs and client_id in rs.selected and client_id not in rs.submissions:
            async with self.fold_lock:
                rs.selected.discard(client_id)
                rs.dropped.add(client_id)
                if self.current is rs and not rs.closing:
                    await self.save_open(rs)
        await self.notify()

    async def finished_stream_sent(self, client_id: str) -> None:
        """Its FINISHED stream (the final deltas) was completely yielded: it is done, and only
        its Leave is still waited for, briefly (``wait_for_clients_to_finish``)."""
        self.registry.mark_finished(client_id)
        await self.notify()

    # -- for the port: downloads --------------------------------------------------------------
    def assignment(self, client_id: str, have: int, holds_seeds: bool = False) -> Assignment | None:
        """The run is over, or ``client_id`` is selected for the open round: what to do and how
        to catch up from ``have``; None while it has to wait. ``holds_seeds``: the client says
        it kept the run's fixed seeds (a method whose seeds do not change), so they are not resent."""
        rs = self.current
        if self.finished:
            status, round_id = "finished", self.completed
        elif rs is not None and rs.is_open_for(client_id) and rs.round == self.completed:
            status, round_id = "train", rs.round
        else:
            return None
        mode, deltas = self.catch_up_plan(have)
        # a method whose seeds are fixed for the run sends them once, to a client holding none
        seeds_travel = self.method.seeds_per_round or not holds_seeds
        a = Assignment(status, round_id, self.completed, self.state_fingerprints[self.completed], mode, deltas,
                       seeds_in_deltas=self.method.seeds_per_round)
        if status == "train":
            a.seeds = list(rs.seeds) if seeds_travel else []
            a.plan_fingerprint = rs.plan_fingerprint
            a.deadline_unix = self.clock.wall() + (rs.deadline - self.clock.monotonic())
        return a

    def catch_up_plan(self, have: int) -> tuple[str, list[RoundDelta]]:
        """("none" | "deltas" | "snapshot", deltas) to take a client from ``have`` to now."""
        if have == self.completed:
            return "none", []
        if have > self.completed or any(r not in self.deltas for r in range(have, self.completed)):
            return "snapshot", []
        deltas = [self.deltas[r] for r in range(have, self.completed)]
        seeds = self.method.seeds_per_round  # fixed seeds are not resent with deltas
        cost = sum(d.tensor_bytes + (seeds_bytes(len(d.seeds)) if seeds else 0) for d in deltas)
        if cost > self.state_bytes:  # whichever is smaller
            return "snapshot", []
        return "deltas", deltas

    async def snapshot(self, round_id: int) -> tuple[dict[str, torch.Tensor], str]:
        """A copy of the state after ``round_id`` rounds (the current one) and its fingerprint.

        One copy per round, shared by every stream that serves it and freed when the last of
        them lets go (a weak reference): for a billion-parameter model, 32 concurrent
        snapshot downloads must not mean 32 copies of the state."""
        async with self.model_lock:
            if round_id != self.completed:
                raise RoundError("FAILED_PRECONDITION",
                                 f"snapshot of round {round_id} unavailable; current is {self.completed}")
            state = self._snapshot_copy[1]() if self._snapshot_copy[0] == round_id else None
            if state is None:
                state = StateCopy(self.method.snapshot_tensors(self.model))
                self._snapshot_copy = (round_id, weakref.ref(state))
            return state, self.state_fingerprints[self.completed]
