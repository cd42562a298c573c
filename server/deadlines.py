"""When a round stops waiting: the deadline, the quorum and the replacement of silent clients.

A round waits until every selected client submitted. At its deadline (``rounds.deadline_s``
after it opened or was last extended) it closes with what it has if that is a quorum
(``rounds.min_clients``), the silent clients recorded as dropped; without a quorum the silent
clients are replaced by fresh live ones where there are any, the longest unheard first, and the
deadline moves on by ``deadline_s``. A silent client with nobody to replace it stays selected:
dropping it would leave the round nobody to wait for (a slow start is not a death). After a
restart an open round's deadline is at least ``rounds.resume_grace_s`` away, so clients still
reconnecting with backoff are not dropped by a restart that came near it.

The policy decides; the coordinator acts (who is selectable, what privacy allows, saving).
Its time is the coordinator's ``Clock``, so the policy is tested on a fake one in milliseconds.
The simulator turns it off (``enabled=False``): every selected client there always submits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..common.config import RoundsSection
from .clock import Clock
from .rounds import RoundState

Verdict = Literal["complete", "quorum", "short", "wait"]


@dataclass
class DeadlinePolicy:
    """The deadline rules of a run's rounds (module docstring), on ``clock``."""

    rounds: RoundsSection
    clock: Clock
    enabled: bool = True

    def deadline(self) -> float:
        """The deadline of a round opened or extended now."""
        return self.clock.monotonic() + self.rounds.deadline_s

    def resumed(self, remaining_s: float) -> float:
        """The deadline of a round restored with ``remaining_s`` left when it was saved."""
        return self.clock.monotonic() + max(remaining_s, self.rounds.resume_grace_s)

    def verdict(self, rs: RoundState) -> Verdict:
        """``complete``: every selected client submitted; ``quorum``: the deadline passed with
        enough updates (close without the silent); ``short``: it passed without (replace the
        silent and extend); ``wait``: neither yet."""
        # every submitter is selected: compare counts first, sets only when they agree
        # (building the set on each of N wakeups made a round O(N^2))
        if rs.selected and len(rs.submissions) >= len(rs.selected) and rs.selected.issubset(rs.submissions):
            return "complete"
        if not self.enabled or self.clock.monotonic() < rs.deadline:
            return "wait"
        return "quorum" if len(rs.submissions) >= self.rounds.min_clients else "short"

    def silent(self, rs: RoundState) -> set[str]:
        """The selected clients that have not submitted."""
        return rs.selected - set(rs.submissions)

    def room(self, rs: RoundState) -> int:
        """How many fresh clients a short round may take in."""
        return self.rounds.clients_per_round - len(rs.submissions)

    def replace(self, rs: RoundState, silent_by_staleness: list[str], fresh: list[str]) -> list[str]:
        """Swap the longest unheard of the silent clients for ``fresh`` ones (as many as there
        are) and extend the deadline; the clients dropped."""
        dropped = silent_by_staleness[:len(fresh)]
        rs.selected = (rs.selected - set(dropped)) | set(fresh)
        rs.dropped |= set(dropped)
        rs.deadline = self.deadline()
        return dropped

    def next_check_s(self, rs: RoundState) -> float:
        """How long the round loop may sleep before it must look again (a change wakes it
        sooner)."""
        if not self.enabled:
            return 1.0  # as often as before: nothing is due
        return min(1.0, max(0.05, rs.deadline - self.clock.monotonic()))
