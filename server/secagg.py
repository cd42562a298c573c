"""The server's side of secure aggregation (``common.privacy.secagg``): the phases of one
round, driven by the coordinator, fed by the service's RPC handlers.

Phases, each closed when every client of the previous one answered (a client that left the
round counts as answered) or at its deadline: *advertise* (until the round's deadline: clients
train first), *share*, *confirm*, *masked*, *unmask* (``secure_aggregation.phase_timeout_s``
each). A client absent from a phase is out of the round (moved to ``dropped``), and so is one
whose key is refused (it cannot agree, or repeats another client's) and one whose secrets
fewer than t members hold a good share of after the complaints of *confirm*
(``masking_set``). When fewer than the threshold t remain at any phase, or a secret cannot be
rebuilt from the shares revealed (each checked against its owner's commitment), the round
fails cleanly: every held call gets ABORTED with the reason, the round closes with no change
to the model (``RoundState.failed``, the metrics row's ``secagg_failed``) and the run goes on
with the next round. Nothing of the protocol is saved: after a restart an open round starts
its protocol again with fresh keys (clients train again, to the same bytes).

The masked inputs are summed as they arrive (one ring vector in memory, whatever the number of
clients); the server never holds an individual input beyond its stream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from ..common.aggregate import StreamingAggregator
from ..common.privacy.secagg import (MASK_KEY, SELF_MASK, Roster, SealedShare, SecAggError, commitment,
                                     decode, fixed_point_bits, key_point, masking_set, pair, threshold,
                                     unmask, usable_key)
from ..common.privacy.shamir import SHARE_BYTES
from ..common.config import RunConfig
from ..common.tensors import spec_numel
from ..common.update import UpdateRecord
from .ledger import RoundLedger
from .rounds import RoundError, RoundState, Submission

log = structlog.get_logger("fedkrso.server")
PHASES = ("advertise", "share", "confirm", "masked", "unmask")
MAX_CIPHERTEXT = 512  # bytes of one encrypted share pair (about 180 in practice)
COMMITMENT_BYTES = 32  # SHA-256


@dataclass
class Phase:
    """One phase of a round's protocol: who is expected, until when, what each sent, and whether it closed."""

    name: str
    expected: set[str]
    until: float
    got: dict[str, object] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class SecAggRound:
    """One round's protocol state (module docstring)."""

    def __init__(self, ledger: RoundLedger, cfg: RunConfig, spec: dict[str, tuple[int, ...]], rs: RoundState):
        """``spec``: the names and shapes of an update of ``rs`` (summed as one vector)."""
        sa = cfg.privacy.secure_aggregation
        self.ledger, self.rs, self.cfg = ledger, rs, sa
        self.min_clients = cfg.rounds.min_clients
        self.bits = sa.ring_bits
        self.f = fixed_point_bits(sa.value_bound, cfg.rounds.clients_per_round, self.bits)
        self.spec = spec
        self.numel = spec_numel(spec)
        self.total = np.zeros(self.numel, dtype=np.uint32 if self.bits == 32 else np.uint64)
        self.phases: dict[str, Phase] = {"advertise": Phase("advertise", set(rs.selected), rs.deadline)}
        self.roster: Roster | None = None
        self.members: list[str] = []  # the masking set
        self.disputed: set[tuple[str, str]] = set()
        self.survivors: list[str] = []
        self.dropped: list[str] = []
        self.revealed: dict[tuple[str, str], dict[int, bytes]] = {}
        self.failure: str | None = None
        self.protocol_bytes: dict[str, int] = {}
        self.unmask_seconds = 0.0

    # -- for the service ---------------------------------------------------------------------------
    def _open(self, name: str, client: str) -> Phase:
        if self.failure:
            raise RoundError("ABORTED", self.failure)
        ph = self.phases.get(name)
        if ph is None or ph.closed.is_set():
            now = next((p for p in PHASES if p in self.phases and not self.phases[p].closed.is_set()), "none")
            raise RoundError("FAILED_PRECONDITION", f"secure aggregation of round {self.rs.round} is not collecting "
                             f"{name} (collecting: {now})")
        if client not in ph.expected or client not in self.rs.selected:
            raise RoundError("PERMISSION_DENIED", f"client is not in the {name} phase of round {self.rs.round}")
        if client in ph.got:
            raise RoundError("ALREADY_EXISTS", f"client already answered the {name} phase of round {self.rs.round}")
        return ph

    async def _result(self, ph: Phase) -> None:
        await self.ledger.notify()
        await ph.closed.wait()
        if self.failure:
            raise RoundError("ABORTED", self.failure)

    def count_bytes(self, client: str, n: int) -> None:
        """Add ``n`` protocol bytes (keys, shares, reveals) to ``client``'s count."""
        self.protocol_bytes[client] = self.protocol_bytes.get(client, 0) + n

    async def _leave(self, client: str, why: str) -> None:
        """Take ``client`` out of the round now (its phases stop waiting for it)."""
        self._out(client, why)
        await self.ledger.notify()

    def _out(self, client: str, why: str) -> None:
        self.rs.selected.discard(client)
        self.rs.dropped.add(client)
        log.warning("secagg_client_out", round=self.rs.round, client=client, reason=why)

    async def advertise(self, client: str, cipher_key: bytes, mask_key: bytes) -> Roster:
        """Hold the call until the roster is fixed. A key that cannot agree (its shared secrets
        would be known to all: the peers' shares and masks for it public), or a point another
        client advertised (a copied mask key cancels masks inside an honest input), is refused
        and the client is out of the round: no key of it could be used."""
        ph = self._open("advertise", client)
        if not (usable_key(cipher_key) and usable_key(mask_key)):
            await self._leave(client, "unusable key")
            raise RoundError("INVALID_ARGUMENT", "a public key is not a usable X25519 key (32 raw bytes, not a "
                             f"low-order point); this client is out of round {self.rs.round}")
        taken = {key_point(k) for keys in ph.got.values() for k in keys}
        if {key_point(cipher_key), key_point(mask_key)} & taken:
            await self._leave(client, "repeated key")
            raise RoundError("INVALID_ARGUMENT", "a public key another client of this round advertised; this "
                             f"client is out of round {self.rs.round}")
        ph.got[client] = (cipher_key, mask_key)
        await self._result(ph)
        return self.roster

    async def share(self, client: str, shares: dict[str, SealedShare]) -> dict[str, SealedShare]:
        """Take ``client``'s encrypted share pairs for every other client of the roster; hold the call
        until the phase closes; the pairs sent to ``client``."""
        ph = self._open("share", client)
        others = set(self.roster.keys) - {client}
        if set(shares) != others:
            raise RoundError("INVALID_ARGUMENT", f"expected one share for each of the {len(others)} other clients "
                             "of the roster")
        if any(len(s.ciphertext) > MAX_CIPHERTEXT for s in shares.values()):
            raise RoundError("INVALID_ARGUMENT", f"an encrypted share exceeds {MAX_CIPHERTEXT} bytes")
        if any(len(c) != COMMITMENT_BYTES for s in shares.values()
               for c in (s.mask_key_commitment, s.self_mask_commitment)):
            raise RoundError("INVALID_ARGUMENT", f"a share commitment is {COMMITMENT_BYTES} bytes")
        ph.got[client] = shares
        await self._result(ph)
        return {sender: sent[client] for sender, sent in ph.got.items() if sender != client}

    async def confirm(self, client: str, complaints: list[str]) -> tuple[list[str], list[str]]:
        """Hold the call until the masking set is fixed; the set and the members ``client``
        disputes."""
        ph = self._open("confirm", client)
        if len(set(complaints)) != len(complaints):
            raise RoundError("INVALID_ARGUMENT", "two complaints about one client")
        if not set(complaints) <= set(self.phases["share"].got) - {client}:
            raise RoundError("INVALID_ARGUMENT", "a complaint names a client that sent this client no share pair")
        ph.got[client] = set(complaints)
        await self._result(ph)
        if client not in self.members:
            raise RoundError("PERMISSION_DENIED", f"fewer than t={self.roster.t} clients of the masking set hold a "
                             f"good share pair of this client; it is out of round {self.rs.round}")
        return self.members, sorted(v for v in self.members if pair(client, v) in self.disputed)

    @property
    def wire(self) -> str:
        """The dtype a masked input travels in: the ring's width."""
        return "int32" if self.bits == 32 else "int64"

    async def add_masked(self, client: str, report: UpdateRecord, vector: np.ndarray) -> None:
        """Sum ``client``'s masked ring vector into the round's total (its header kept for the row)."""
        ph = self._open("masked", client)
        if vector.shape != (self.numel,):
            raise RoundError("INVALID_ARGUMENT", f"masked input has {vector.size} values, the round's spec {self.numel}")
        ph.got[client] = report
        self.total += vector
        # summed unweighted (config: weighting uniform, no pinned weights); its size is hidden
        self.ledger.accepted(self.rs, Submission.of(client, report, 1.0, None))
        await self.ledger.notify()

    async def unmasking(self, client: str) -> tuple[list[str], list[str]]:
        """Hold until the masked phase closes; (survivors, dropped): whose shares ``client`` must reveal."""
        if self.failure:
            raise RoundError("ABORTED", self.failure)
        ph = self.phases.get("masked")
        if ph is None or client not in ph.got:
            raise RoundError("FAILED_PRECONDITION", f"client sent no masked input for round {self.rs.round}")
        await self._result(ph)
        return self.survivors, self.dropped

    def _committed(self, owner: str, holder: str, kind: str, share: bytes) -> bool:
        """Whether ``share`` is the one ``owner`` committed to for ``holder`` (an owner's own
        share was never sent: it is its own to reveal)."""
        if owner == holder:
            return True
        sealed = self.phases["share"].got[owner][holder]
        made = sealed.mask_key_commitment if kind == MASK_KEY else sealed.self_mask_commitment
        return commitment(self.ledger.run_id, self.rs.round, owner, holder, kind, share) == made

    async def reveal(self, client: str, shares: list[tuple[str, str, bytes]]) -> None:
        """Keep ``client``'s revealed shares if every one was asked for (of a pair it did not
        complain of) and is the one its owner committed to: a wrong share refuses the whole
        call, so what is kept rebuilds exactly what the owners shared."""
        ph = self._open("unmask", client)
        refused = self.phases["confirm"].got[client]
        wanted = {(v, SELF_MASK) for v in self.survivors} | {(v, MASK_KEY) for v in self.dropped}
        for owner, kind, share in shares:
            if (owner, kind) not in wanted or owner in refused:
                raise RoundError("INVALID_ARGUMENT", f"share of {owner!r} ({kind}) was not asked for")
            if len(share) != SHARE_BYTES:
                raise RoundError("INVALID_ARGUMENT", f"a share is {SHARE_BYTES} bytes")
            if not self._committed(owner, client, kind, share):
                raise RoundError("INVALID_ARGUMENT", f"share of {owner!r} ({kind}) is not the one its owner "
                                 "committed to")
        point = self.roster.point(client)
        for owner, kind, share in shares:
            self.revealed.setdefault((owner, kind), {})[point] = share
        ph.got[client] = True
        await self.ledger.notify()

    # -- for the coordinator ---------------------------------------------------------------------
    async def _collect(self, ph: Phase, prune: bool = True) -> list[str]:
        """Wait until every expected client still in the round answered, or the deadline; with
        ``prune`` the silent ones leave the round."""
        while True:
            waiting = (ph.expected & self.rs.selected) - set(ph.got)
            clock = self.ledger.clock
            if not waiting or clock.monotonic() >= ph.until:
                break
            await self.ledger.wait_change(min(1.0, max(0.05, ph.until - clock.monotonic())))
        members = sorted(ph.got)
        if not prune:
            return members
        out = self.rs.selected - set(members)
        self.rs.selected -= out
        self.rs.dropped |= out
        if out:
            log.warning("secagg_dropouts", round=self.rs.round, phase=ph.name, dropped=sorted(out))
        return members

    def _next(self, name: str, expected: list[str]) -> Phase:
        ph = Phase(name, set(expected), self.ledger.clock.monotonic() + self.cfg.phase_timeout_s)
        self.phases[name] = ph
        return ph

    def _fail(self, reason: str) -> None:
        self.failure = f"secure aggregation of round {self.rs.round} failed: {reason}"
        self.rs.failed = self.failure
        self.rs.submissions.clear()
        for ph in self.phases.values():
            ph.closed.set()
        log.warning("secagg_round_failed", round=self.rs.round, reason=reason)

    async def run(self) -> None:
        """Drive the phases; on success the round's aggregator holds the exact sum of the
        survivors' (clamped, fixed-point) updates, on failure ``rs.failed`` says why."""
        rs, need = self.rs, max(2, self.min_clients)
        advertised = await self._collect(self.phases["advertise"])
        if len(advertised) < need:
            return self._fail(f"{len(advertised)} client(s) advertised keys before the deadline, {need} needed")
        ads = self.phases["advertise"].got
        self.roster = Roster({c: ads[c] for c in advertised}, threshold(len(advertised), self.cfg.threshold))
        t = self.roster.t
        share = self._next("share", advertised)
        self.phases["advertise"].closed.set()  # the held AdvertiseKeys calls answer with the roster
        shared = await self._collect(share)
        if len(shared) < t:
            return self._fail(f"{len(shared)} client(s) shared keys, fewer than the threshold t={t}")
        confirm = self._next("confirm", shared)
        share.closed.set()
        confirmed = await self._collect(confirm)
        if not self._fix_masking_set(confirmed):
            return
        masked = self._next("masked", self.members)
        confirm.closed.set()
        survivors = await self._collect(masked)
        if len(survivors) < t:
            return self._fail(f"{len(survivors)} client(s) sent masked inputs, fewer than the threshold t={t}")
        self.survivors, self.dropped = survivors, sorted(set(self.members) - set(survivors))
        reveal = self._next("unmask", survivors)
        masked.closed.set()
        revealed = await self._collect(reveal, prune=False)  # a silent survivor's input is in the sum
        if len(revealed) < t:
            return self._fail(f"{len(revealed)} client(s) revealed shares, fewer than the threshold t={t}")
        started = time.perf_counter()  # a measurement of work, not a deadline
        try:
            total = await asyncio.to_thread(unmask, self.total, self.roster, self.survivors, self.dropped,
                                            self.disputed, self.revealed, self.ledger.run_id, rs.round, self.bits)
        except SecAggError as err:
            return self._fail(str(err))
        sums = await asyncio.to_thread(decode, total, self.spec, self.f, self.bits)
        self.unmask_seconds = time.perf_counter() - started
        agg = StreamingAggregator()
        agg.sums, agg.count, agg.total_weight = sums, len(self.survivors), float(len(self.survivors))
        rs.aggregator = agg
        self.phases["unmask"].closed.set()
        log.info("secagg_unmasked", round=rs.round, survivors=len(self.survivors), dropped=self.dropped,
                 threshold=t, seconds=round(self.unmask_seconds, 3))

    def _fix_masking_set(self, confirmed: list[str]) -> bool:
        """The masking set from the complaints (``masking_set``); a confirmed client it leaves
        out is out of the round. False when fewer than t remain (the round failed)."""
        t, got = self.roster.t, self.phases["confirm"].got
        self.members, self.disputed = masking_set(confirmed, got, t)
        for client in sorted(set(confirmed) - set(self.members)):
            self._out(client, f"fewer than t={t} good share holders")
        if self.disputed:
            log.warning("secagg_disputed_pairs", round=self.rs.round, pairs=sorted(self.disputed))
        if len(self.members) < t:
            self._fail(f"{len(self.members)} client(s) left to mask with good shares, fewer than the threshold t={t}")
            return False
        return True

    def row(self) -> dict:
        """The metrics fields of the round: counts, no client named (docs/PRIVACY.md section 4;
        the log names who dropped and which pairs were disputed)."""
        n = len(self.phases["advertise"].got)
        return {"secagg": {
            "advertised": n, "survivors": len(self.survivors), "dropped_after_sharing": len(self.dropped),
            "disputed_pairs": len(self.disputed),
            "threshold": self.roster.t if self.roster else None, "failed": self.failure,
            "fixed_point_step": 2.0 ** -self.f, "ring_bits": self.bits,
            "protocol_bytes_per_client": sum(self.protocol_bytes.values()) / n if n else 0,
            "unmask_seconds": self.unmask_seconds}}


class SecureAggregation:
    """A run's secure aggregation: the open round's protocol, if any."""

    def __init__(self, ledger: RoundLedger, cfg: RunConfig, spec_of):
        """``spec_of(seeds)``: the names and shapes of an update of a round with ``seeds``."""
        self.ledger, self.cfg, self.spec_of = ledger, cfg, spec_of
        self.current: SecAggRound | None = None
        self.last_failure: tuple[int, str] | None = None  # (round, reason) of the last round that failed

    def round_for(self, round_id: int) -> SecAggRound:
        """The protocol of round ``round_id`` while it runs. A call that comes after that
        round's protocol failed (a survivor that reaches Unmasking once the round is closing)
        gets ABORTED with the reason, as the calls held at the failure did; FAILED_PRECONDITION
        for a round with no protocol running."""
        cur = self.current
        if cur is not None and cur.rs.round == round_id and cur.failure:
            raise RoundError("ABORTED", cur.failure)
        if self.last_failure is not None and self.last_failure[0] == round_id:  # the next round already began
            raise RoundError("ABORTED", self.last_failure[1])
        if cur is None or cur.rs.round != round_id or cur.rs.closing:
            raise RoundError("FAILED_PRECONDITION", f"no secure aggregation is running for round {round_id}")
        return cur

    async def run(self, rs: RoundState) -> None:
        """Run round ``rs``'s protocol to its end (the sum unmasked, or a clean failure)."""
        self.current = sa = SecAggRound(self.ledger, self.cfg, self.spec_of(rs.seeds), rs)
        try:
            await sa.run()
        finally:
            if sa.failure:
                self.last_failure = (rs.round, sa.failure)

    def row(self, rs: RoundState) -> dict:
        """The metrics fields of round ``rs``'s protocol (counts only)."""
        cur = self.current
        return cur.row() if cur is not None and cur.rs is rs else {}
