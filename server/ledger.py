"""The open-round ledger: what the round's collaborators may see and change of a run.

The update intake (``intake.py``) and secure aggregation (``secagg.py``) used to hold the whole
``Coordinator`` and reach into a dozen of its members; that made the import circle
coordinator <-> intake <-> secagg. They hold this ledger instead: the open round and the last
completed one, the digests of accepted updates (a resubmission is idempotent), the lock under
which updates are folded and saved, the save of the open round, the shard sizes that fix a
selected client's weight, and the change notification and clock of the round loop. The
coordinator owns the ledger and is the only one that opens, closes or finishes rounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from .clock import Clock
from .rounds import RoundState, Submission
from .state import RunStore


class RoundLedger:
    """One run's round bookkeeping (module docstring); everything on the event loop."""

    def __init__(self, run_id: str, clock: Clock, store: RunStore, shard_size: Callable[[str], int]):
        """``shard_size(client)``: the row count a client declared when it last joined."""
        self.run_id = run_id
        self.clock = clock
        self.store = store
        self.shard_size = shard_size
        self.current: RoundState | None = None
        self.completed = 0
        self.finished = False
        self.accepted_digests: dict[tuple[int, str], str] = {}  # (round, client) -> digest
        self.fold_lock = asyncio.Lock()
        self.changed = asyncio.Condition()  # anything changed: the round loop's own waits

    def is_open(self, rs: RoundState) -> bool:
        """``rs`` is still the open round and takes updates."""
        return self.current is rs and not rs.closing

    def declare(self, rs: RoundState, clients: Iterable[str]) -> None:
        """Fix the declared shard size, hence the weight (``weights.py``), of newly selected
        ``clients`` for round ``rs``: a later Join declaring another size does not change it."""
        for c in clients:
            rs.declared.setdefault(c, self.shard_size(c))

    def accepted(self, rs: RoundState, sub: Submission) -> None:
        """Record ``sub`` as ``rs``'s accepted update of its client (folded or summed)."""
        rs.submissions[sub.client_id] = sub
        self.accepted_digests[(rs.round, sub.client_id)] = sub.digest

    async def save_open(self, rs: RoundState, with_aggregate: bool = False) -> None:
        """Persist the open round; the caller holds ``fold_lock`` so that the submissions and
        the aggregate written together agree."""
        rs.unsaved_downloads = False
        plan = self.store.plan_open(rs, with_aggregate, self.clock.monotonic())
        await asyncio.to_thread(self.store.write_open, plan)

    async def notify(self) -> None:
        """Wake the round loop (and whoever else waits on a change)."""
        async with self.changed:
            self.changed.notify_all()

    async def wait_change(self, timeout: float) -> None:
        """Until something changed, or ``timeout`` seconds of the run's clock."""
        async with self.changed:
            await self.clock.wait(self.changed.wait(), timeout)
