"""Round state of a run: clients, selection, deadlines, streaming aggregation, deltas.

No gRPC here: the service (``service.py``) translates RPCs into calls on ``Coordinator`` and
its answers into messages, so the state machine can be read (and tested) on its own. All
state lives on one asyncio loop; heavy work (aggregation, applying deltas, evaluation) runs
in a worker thread while ``self.model_lock`` or ``self.fold_lock`` is held.

Every state change that must survive a crash goes through ``server/state.py`` before it is
acknowledged: a round's delta when it closes, the open round when an update is accepted or
the selection changes. A restarted server with the same config resumes from there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog
import torch

from ..common.aggregate import Aggregator, aggregator_from_state, build_aggregator
from ..common.config import RunConfig
from ..common.logs import progress
from ..common.methods import build_method
from ..common.models import load_model, load_tokenizer, model_fingerprint
from ..common.subspace import stable_seed
from ..common.accounting import full_model_bytes, wire_efficiency
from ..common.tensors import DTYPES, element_size
from .metrics import MetricsWriter
from .state import RunStore, SavedRun, StateError, move_aside

log = structlog.get_logger("fedkrso.server")
LEAVE_GRACE_S = 3.0  # after its FINISHED stream, how long a client's Leave is waited for


def run_identity(cfg: RunConfig) -> str:
    """``<run name>-<hash>`` of every setting that shapes the results. Where the server
    listens, its credentials and its output folder are left out: a restart may move the port or
    rotate certificates and still resume the same run."""
    shaping = cfg.model_dump(mode="json", exclude={"security": True, "run": {"output_dir"},
                                                     "server": {"listen"}})
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.run.name}-{digest}"


class RoundError(Exception):
    """An update or request that the current round state refuses; ``code`` names the gRPC
    status the service answers with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ClientState:
    client_id: str
    name: str
    num_samples: int
    last_seen: float = field(default_factory=time.monotonic)
    active: bool = True
    finished_at: float | None = None  # when its FINISHED stream was completely yielded


@dataclass
class RoundDelta:
    """The canonical bytes of one round's aggregated delta (in the wire dtype)."""

    round: int
    seeds: list[int]
    tensors: dict[str, torch.Tensor]
    state_fingerprint: str  # state after applying it

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + 8 * len(self.seeds)


@dataclass
class Traffic:
    """What one client exchanged in one round, at the three accounting layers."""

    down_payload: int = 0
    down_message: int = 0
    down_wire: int | None = None
    up_payload: int = 0
    up_message: int = 0
    up_wire: int | None = None
    counters: object | None = None
    up_start: int = 0
    down_start: int = 0

    def numbers(self) -> dict:
        """The byte counts (what persists across a restart; the live counters do not)."""
        return {k: getattr(self, k) for k in
                ("down_payload", "down_message", "down_wire", "up_payload", "up_message", "up_wire")}


@dataclass
class Submission:
    client_id: str
    digest: str
    num_samples: int
    loss: float
    steps: int
    train_seconds: float
    peak_rss_bytes: int
    train_state_bytes: int
    seeds_used: list[int]


@dataclass
class RoundState:
    round: int
    seeds: list[int]
    plan_fingerprint: str
    selected: set[str]
    deadline: float
    started: float = field(default_factory=time.monotonic)
    submissions: dict[str, Submission] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    traffic: dict[str, Traffic] = field(default_factory=dict)
    aggregator: Aggregator | None = None
    closing: bool = False
    # group commit of accepted updates: ``folds`` counts updates folded into ``aggregator``,
    # ``saved_folds`` those on disk; one ``flusher`` task writes for every update waiting
    folds: int = 0
    saved_folds: int = 0
    flusher: asyncio.Task | None = None
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # set once the round is on disk

    def is_open_for(self, client_id: str) -> bool:
        return not self.closing and client_id in self.selected and client_id not in self.submissions


class Coordinator:
    """The state of one federated run on the server."""

    def __init__(self, cfg: RunConfig, fresh: bool = False):
        """Load the base model and, unless ``fresh``, resume the saved state of this run_id
        from ``<output_dir>/state`` (``StateError`` if it belongs to another run or does not
        replay to its recorded fingerprints)."""
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_id = run_identity(cfg)
        self.method = build_method(cfg.method, cfg.run.seed)
        self.model = load_model(cfg.model.name, cfg.model.task, cfg.model.num_labels, cfg.run.seed)
        self.method.prepare(self.model)
        self.model.eval()
        self.model_fingerprint = model_fingerprint(self.model)
        self.state_bytes = sum(
            t.numel() * t.element_size() for t in self.method.state_parameters(self.model).values()
        )
        self.completed = 0
        self.deltas: dict[int, RoundDelta] = {}
        self.accepted_digests: dict[tuple[int, str], str] = {}  # (round, client) -> digest
        self.state_fingerprints = {0: self.method.state_fingerprint(self.model)}
        self.clients: dict[str, ClientState] = {}
        self.current: RoundState | None = None
        self.finished = False
        self._last_row: dict | None = None
        self.changed = asyncio.Condition()
        self.model_lock = asyncio.Lock()
        self.fold_lock = asyncio.Lock()
        self.fedavg_bytes = full_model_bytes(self.model)
        self._tokenizer = None
        self._eval_data = None
        self.store = RunStore(self.out / "state", self.run_id)
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
        if saved.state_fingerprints[0] != self.state_fingerprints[0]:
            raise StateError("the base model's state differs from the one the saved run started from; "
                             "restart with --fresh to start a new run")
        start = saved.checkpoint_round
        if start:
            with torch.no_grad():
                state = self.method.state_parameters(self.model)
                for name, t in self.store.checkpoint().items():
                    state[name].copy_(t)
            self._check_rebuilt(start, saved.state_fingerprints[start])
        keep = max(0, saved.completed - self.cfg.server.snapshot_after_rounds)  # for catch-up
        for r in range(min(start, keep), saved.completed):
            delta = RoundDelta(r, saved.seeds[r], self.store.delta(r), saved.state_fingerprints[r + 1])
            if r >= start:
                self.method.apply(self.model, delta.seeds, delta.tensors)
                self._check_rebuilt(r + 1, delta.state_fingerprint)
            if r >= keep:
                self.deltas[r] = delta
        self.completed = saved.completed
        self.state_fingerprints = dict(saved.state_fingerprints)
        self.accepted_digests = dict(saved.accepted_digests)
        self._last_row = saved.last_row
        accepted = 0
        if saved.open_round is not None:
            self.current = self._restore_round(saved.open_round, saved.open_tensors)
            accepted = len(self.current.submissions)
        log.info("run_resumed", round=self.completed, accepted=accepted, checkpoint=start,
                 replayed=self.completed - start, open_round=self.current is not None)

    def _check_rebuilt(self, round_id: int, recorded: str) -> None:
        fp = self.method.state_fingerprint(self.model)
        if fp != recorded:
            raise StateError(f"state rebuilt at round {round_id} has fingerprint {fp[:12]}, the saved run "
                             f"recorded {recorded[:12]}; refusing to resume (--fresh starts over)")

    def _restore_round(self, o: dict, tensors: dict[str, torch.Tensor]) -> RoundState:
        now = time.monotonic()
        rs = RoundState(o["round"], o["seeds"], o["plan_fingerprint"], set(o["selected"]),
                        now + o["deadline_remaining_s"], started=now - o["elapsed_s"],
                        dropped=set(o["dropped"]))
        for client_id, sub in o["submissions"].items():
            rs.traffic[client_id] = Traffic(**sub.pop("traffic"))
            rs.submissions[client_id] = Submission(**sub)
            self.accepted_digests[(rs.round, client_id)] = sub["digest"]
        rs.aggregator = aggregator_from_state(tensors, o["aggregator"]) if o["aggregator"] else self._aggregator()
        return rs

    def _aggregator(self) -> Aggregator:
        s = self.cfg.server
        return build_aggregator(s.aggregation, s.clip_norm, s.trim_fraction)

    def _open_record(self, rs: RoundState) -> dict:
        now = time.monotonic()
        return {"round": rs.round, "seeds": list(rs.seeds), "plan_fingerprint": rs.plan_fingerprint,
                "selected": sorted(rs.selected), "dropped": sorted(rs.dropped),
                "deadline_remaining_s": max(rs.deadline - now, 0.0), "elapsed_s": now - rs.started,
                "submissions": {c: {**asdict(s), "traffic": rs.traffic.get(c, Traffic()).numbers()}
                                for c, s in rs.submissions.items()}}

    async def _save_open(self, rs: RoundState, with_aggregate: bool = False) -> None:
        """Persist the open round; the caller holds ``fold_lock`` so that the submissions and
        the aggregate written together agree."""
        record = self._open_record(rs)
        aggregate = rs.aggregator.state() if with_aggregate else None
        await asyncio.to_thread(self.store.save_open_round, record, aggregate)

    # -- clients -------------------------------------------------------------------------
    def live_clients(self) -> list[str]:
        horizon = time.monotonic() - self.liveness_s
        return sorted(c.client_id for c in self.clients.values() if c.active and c.last_seen >= horizon)

    @property
    def liveness_s(self) -> float:
        return 60.0

    def touch(self, client_id: str) -> ClientState:
        client = self.clients.get(client_id)
        if client is None or not client.active:
            raise RoundError("UNAUTHENTICATED", f"client {client_id!r} is not joined")
        client.last_seen = time.monotonic()
        return client

    async def join(self, client_id: str, name: str, num_samples: int) -> None:
        if num_samples < 1:
            raise RoundError("INVALID_ARGUMENT", "num_samples must be at least 1")
        self.clients[client_id] = ClientState(client_id, name, num_samples)
        log.info("client_joined", client=client_id, name=name, samples=num_samples)
        await self.notify()

    async def leave(self, client_id: str, reason: str) -> None:
        client = self.clients.get(client_id)
        if client:
            client.active = False
        rs = self.current
        if rs and client_id in rs.selected and client_id not in rs.submissions:
            async with self.fold_lock:
                rs.selected.discard(client_id)
                rs.dropped.add(client_id)
                if self.current is rs and not rs.closing:
                    await self._save_open(rs)
        log.info("client_left", client=client_id, reason=reason)
        await self.notify()

    async def finished_stream_sent(self, client_id: str) -> None:
        """Its FINISHED stream (the final deltas) was completely yielded: it is done, and only
        its Leave is still waited for, briefly (``wait_for_clients_to_finish``)."""
        client = self.clients.get(client_id)
        if client:
            client.finished_at = time.monotonic()
        await self.notify()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_change(self, timeout: float) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
            except TimeoutError:
                pass

    # -- the run ---------------------------------------------------------------------------
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
            await self._run_round(t)
        await self.finish()

    async def _wait_for_clients(self) -> None:
        r = self.cfg.rounds
        give_up = time.monotonic() + r.start_timeout_s
        with progress(total=r.clients_per_round, desc="clients joined", unit="client") as bar:
            while True:
                n = len(self.live_clients())
                bar.update(min(n, bar.total) - bar.n)
                if n >= r.clients_per_round or (n >= r.min_clients and time.monotonic() >= give_up):
                    return
                if time.monotonic() >= give_up + r.start_timeout_s:
                    raise RuntimeError(f"only {n} client(s) joined; need {r.min_clients}")
                await self.wait_change(1.0)

    def _select(self, round_id: int, exclude: set[str], n: int) -> list[str]:
        pool = [c for c in self.live_clients() if c not in exclude]
        rng = random.Random(stable_seed("select", self.cfg.run.seed, round_id, len(exclude)))
        return sorted(rng.sample(pool, min(n, len(pool))))

    async def _run_round(self, t: int) -> None:
        r = self.cfg.rounds
        while len(self.live_clients()) < r.min_clients:
            log.warning("round_waiting_for_quorum", round=t, live=len(self.live_clients()))
            await self.wait_change(5.0)
        seeds = self.method.round_seeds(t)
        plan_fp = await asyncio.to_thread(self.method.plan_fingerprint, self.model, seeds)
        selected = set(self._select(t, set(), r.clients_per_round))
        rs = RoundState(t, seeds, plan_fp, selected, time.monotonic() + r.deadline_s,
                        aggregator=self._aggregator())
        async with self.fold_lock:
            await self._save_open(rs)
            self.current = rs
        log.info("round_started", round=t, clients=sorted(selected), seeds=len(seeds))
        await self.notify()
        await self._await_round(rs)

    async def _await_round(self, rs: RoundState) -> None:
        """Until every selected client submitted, or the deadline passed with a quorum."""
        with progress(total=len(rs.selected), desc=f"round {rs.round} updates", unit="update") as bar:
            while True:
                bar.total = len(rs.selected)
                bar.update(len(rs.submissions) - bar.n)
                if rs.selected and rs.selected <= set(rs.submissions):
                    break
                if time.monotonic() >= rs.deadline:
                    if len(rs.submissions) >= self.cfg.rounds.min_clients:
                        rs.dropped |= rs.selected - set(rs.submissions)  # silent past the deadline
                        break
                    async with self.fold_lock:
                        self._replace_silent(rs)
                        await self._save_open(rs)
                    continue
                await self.wait_change(min(1.0, max(0.05, rs.deadline - time.monotonic())))
        await self._close_round(rs)

    def _replace_silent(self, rs: RoundState) -> None:
        """Deadline passed without quorum: drop the silent, select others, extend."""
        silent = rs.selected - set(rs.submissions)
        rs.selected -= silent
        rs.dropped |= silent
        room = self.cfg.rounds.clients_per_round - len(rs.selected)
        fresh = self._select(rs.round, rs.selected | rs.dropped, room)
        rs.selected |= set(fresh)
        rs.deadline = time.monotonic() + self.cfg.rounds.deadline_s
        log.warning("round_extended", round=rs.round, dropped=sorted(silent), added=fresh,
                    submitted=len(rs.submissions))

    async def _close_round(self, rs: RoundState) -> None:
        rs.closing = True
        async with self.fold_lock:
            mean = await asyncio.to_thread(rs.aggregator.result)
        wire = self.cfg.method.wire_dtype
        canonical = {k: v.to(DTYPES[wire]) for k, v in mean.items()}
        async with self.model_lock:
            await asyncio.to_thread(self.method.apply, self.model, rs.seeds, canonical)
            fp = await asyncio.to_thread(self.method.state_fingerprint, self.model)
            self.state_fingerprints[rs.round + 1] = fp
            row = self.round_row(rs)
            due = (rs.round + 1) % self.cfg.server.checkpoint_every == 0
            checkpoint = ({k: v.detach().clone() for k, v in self.method.state_parameters(self.model).items()}
                          if due else None)
            digests = {c: s.digest for c, s in rs.submissions.items()}
            await asyncio.to_thread(self.store.commit_round, rs.round, rs.seeds, canonical, fp, digests, row,
                                    checkpoint)
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
        evaluation = await asyncio.to_thread(self.evaluate)
        row = {**row, **evaluation}
        if started is not None:
            row["round_seconds"] = time.monotonic() - started
        self.metrics.write(row)
        log.info("round_closed", **{k: v for k, v in row.items() if k != "per_client"})

    def round_row(self, rs: RoundState) -> dict:
        """One metrics.jsonl object without its evaluation: sums over the aggregated clients,
        and per client."""
        ids = sorted(rs.submissions)
        traffic = [rs.traffic.get(c, Traffic()) for c in ids]

        def total(attr: str) -> int:
            return sum((getattr(t, attr) or 0) for t in traffic)

        up_p, up_w, down_p, down_w = total("up_payload"), total("up_wire"), total("down_payload"), total("down_wire")
        n = max(len(ids), 1)
        subs = [rs.submissions[c] for c in ids]
        row = {
            "round": rs.round,
            "clients": ids,
            "dropped": sorted(rs.dropped),
            "uplink_payload_bytes": up_p,
            "uplink_message_bytes": total("up_message"),
            "uplink_wire_bytes": up_w,
            "downlink_payload_bytes": down_p,
            "downlink_message_bytes": total("down_message"),
            "downlink_wire_bytes": down_w,
            "uplink_payload_bytes_per_client": up_p / n,
            "uplink_wire_bytes_per_client": up_w / n,
            "downlink_payload_bytes_per_client": down_p / n,
            "downlink_wire_bytes_per_client": down_w / n,
            "uplink_wire_efficiency": wire_efficiency(up_p, up_w),
            "downlink_wire_efficiency": wire_efficiency(down_p, down_w),
            "wire_efficiency": wire_efficiency(up_p + down_p, up_w + down_w),
            "fedavg_equivalent_bytes": 2 * self.fedavg_bytes * len(ids),
            "train_loss": sum(s.loss * s.num_samples for s in subs) / max(sum(s.num_samples for s in subs), 1),
            "client_train_seconds": max((s.train_seconds for s in subs), default=0.0),
            "client_peak_rss_bytes": max((s.peak_rss_bytes for s in subs), default=0),
            "client_train_state_bytes": max((s.train_state_bytes for s in subs), default=0),
            "round_seconds": time.monotonic() - rs.started,
            "state_fingerprint": self.state_fingerprints[rs.round + 1],
            "per_client": {
                c: {"uplink_payload_bytes": t.up_payload, "uplink_wire_bytes": t.up_wire,
                    "downlink_payload_bytes": t.down_payload, "downlink_wire_bytes": t.down_wire,
                    "seeds_used": len(rs.submissions[c].seeds_used), "loss": rs.submissions[c].loss}
                for c, t in zip(ids, traffic)
            },
        }
        return row

    async def finish(self) -> None:
        self.finished = True
        self.current = None
        await self.notify()
        await asyncio.to_thread(self.save_final)
        log.info("run_finished", rounds=self.completed, output_dir=str(self.out))

    # -- evaluation and output ---------------------------------------------------------------
    def evaluate(self) -> dict:
        if self.cfg.eval.data is None:
            return {}
        from ..common.data import load_split
        from ..common.evaluate import evaluate

        if self._eval_data is None:
            self._eval_data = load_split(self.cfg.eval.data)
            self._tokenizer = load_tokenizer(self.cfg.model.name)
        m = self.cfg.model
        return evaluate(self.model, self._eval_data, self._tokenizer, m.task, m.max_length,
                        self.cfg.eval.batch_size, self.cfg.eval.max_examples)

    def save_final(self) -> Path:
        """save_pretrained into ``<output_dir>/final`` (plus adapters.safetensors if any)."""
        from safetensors.torch import save_file

        path = self.out / "final"
        exported = self.method.export(self.model)
        exported.save_pretrained(path)
        try:
            load_tokenizer(self.cfg.model.name).save_pretrained(path)
        except (OSError, ValueError) as err:  # tokenizer is a convenience, not the result
            log.warning("tokenizer_not_saved", error=str(err))
        extra = self.method.export_extra(self.model)
        if extra:
            save_file({k: v.contiguous() for k, v in extra.items()}, str(path / "adapters.safetensors"))
        (self.out / "final_state_fingerprint.txt").write_text(self.state_fingerprints[self.completed] + "\n")
        return path

    # -- helpers for the service --------------------------------------------------------------
    def catch_up_plan(self, have: int) -> tuple[str, list[RoundDelta]]:
        """("none" | "deltas" | "snapshot", deltas) to take a client from ``have`` to now."""
        if have == self.completed:
            return "none", []
        if have > self.completed or any(r not in self.deltas for r in range(have, self.completed)):
            return "snapshot", []
        deltas = [self.deltas[r] for r in range(have, self.completed)]
        if sum(d.payload_bytes for d in deltas) > self.state_bytes:  # whichever is smaller
            return "snapshot", []
        return "deltas", deltas

    def wire_itemsize(self) -> int:
        return element_size(self.cfg.method.wire_dtype)

    # -- updates ------------------------------------------------------------------------------
    def check_update_header(self, client_id: str, run_id: str, round_id: int, num_samples: int,
                            digest: str) -> RoundState | None:
        """Validate an update header. Returns the open round, or None for an idempotent
        resubmission of an update already accepted (same digest)."""
        if run_id != self.run_id:
            raise RoundError("FAILED_PRECONDITION", f"update for run {run_id!r}, this run is {self.run_id!r}")
        rs = self.current
        if round_id < self.completed or (rs is None and round_id == self.completed and self.finished):
            prior = self._prior_digest(client_id, round_id)
            if prior is not None and prior == digest:
                return None  # resubmission of an update already folded into a closed round
            raise RoundError("FAILED_PRECONDITION", f"stale update for round {round_id}; round "
                             f"{self.completed} is current{' (already accepted)' if prior else ''}")
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
        declared = self.clients[client_id].num_samples
        if not 1 <= num_samples <= declared:
            raise RoundError("INVALID_ARGUMENT", f"num_samples={num_samples} outside [1, {declared}] "
                             "(the shard size declared at join)")
        return rs

    def _prior_digest(self, client_id: str, round_id: int) -> str | None:
        return self.accepted_digests.get((round_id, client_id))

    def update_spec(self, rs: RoundState) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        spec = self.method.update_spec(self.model, rs.seeds)
        return spec, self.method.required_names(self.model, rs.seeds)

    async def accept(self, rs: RoundState, sub: Submission, tensors: dict[str, torch.Tensor],
                     traffic: Traffic) -> bool:
        """Fold a validated update into the round's running sum. False: the same update was
        already folded (a duplicate), nothing changed."""
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise RoundError("INVALID_ARGUMENT", f"tensor {name!r} has non-finite values")
        bound = self.cfg.server.max_update_norm
        if bound is not None:
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))
            if norm > bound:
                raise RoundError("INVALID_ARGUMENT", f"update L2 norm {norm:.6g} exceeds "
                                 f"server.max_update_norm={bound:g}")
        weight = float(sub.num_samples) if self.cfg.training.weighting == "samples" else 1.0
        async with self.fold_lock:
            # checked under the lock: concurrent streams of one client must not both fold
            if rs.closing or self.current is not rs:
                raise RoundError("FAILED_PRECONDITION", f"round {rs.round} closed before the update completed")
            prior = rs.submissions.get(sub.client_id)
            duplicate = prior is not None
            if duplicate and prior.digest != sub.digest:
                raise RoundError("ALREADY_EXISTS", f"an update for round {rs.round} was already accepted")
            if not duplicate:
                await asyncio.to_thread(rs.aggregator.add, tensors, weight)
                rs.submissions[sub.client_id] = sub
                rs.traffic[sub.client_id] = traffic
                self.accepted_digests[(rs.round, sub.client_id)] = sub.digest
                rs.folds += 1
            fold = rs.folds
        # before the acknowledgement; a duplicate (the same update, folded by a concurrent
        # stream) is acknowledged only once the original is durable too
        await self._persist_folds(rs, fold)
        if duplicate:
            return False
        log.info("update_accepted", round=rs.round, client=sub.client_id, loss=round(sub.loss, 4),
                 payload_bytes=traffic.up_payload, wire_bytes=traffic.up_wire,
                 received=len(rs.submissions), selected=len(rs.selected))
        await self.notify()
        return True

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
        async with self.fold_lock:
            if rs.closing:  # _close_round commits every fold
                return
            folds = rs.folds
            await self._save_open(rs, with_aggregate=True)
            rs.saved_folds = folds

    async def wait_for_clients_to_finish(self, timeout: float) -> None:
        """After the run, before the server stops: wait (at most ``timeout``) until every live
        client has left, or got its whole FINISHED stream ``LEAVE_GRACE_S`` ago (its Leave
        was lost). A client counts as finished only then, not when its FINISHED header was
        produced, so its final catch-up and Leave are not refused by a stopping server."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            now = time.monotonic()
            waiting = [c for c in self.live_clients()
                       if self.clients[c].finished_at is None or now - self.clients[c].finished_at < LEAVE_GRACE_S]
            if not waiting:
                return
            await self.wait_change(0.5)
