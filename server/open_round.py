"""The open round's record on disk: written whole, then as a journal of what changed.

Every accepted update is durable before it is acknowledged, and so is every finished download
(``state.py``). Rewriting the whole record for each save (every client's submission and
traffic) made a round of N clients write O(N) for each of its group commits, O(N^2) a round:
at 1,000 clients a save took longer than the updates it covered, and the JSON encoding held
the interpreter lock against the event loop. So a save is one of two things:

* the whole record (``open_record``), when the round opened, or something besides
  submissions and traffic changed (the selection, the drop-outs, the declared shard sizes,
  the deadline), or when nothing was written since the store was loaded: it starts a new,
  empty journal;
* otherwise one journal line holding only the clients whose submission or traffic changed
  since the previous save (``RoundState.changed``), the aggregator's latest tensor file and
  the clock: O(updates it covers).

Loading merges the record and its journal's complete lines in order (``merge``); a torn last
line was never acknowledged, and nothing is appended after it: the first save after a load is
a whole record. Everything here runs on the event loop; ``state.RunStore`` does the I/O. Times
are the run's clock (``clock.py``), read by the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..common.accounting import Traffic
from ..common.aggregate import Aggregator, aggregator_from_state
from .deadlines import DeadlinePolicy
from .rounds import RoundState, Submission

Tensors = dict[str, torch.Tensor]


def open_record(rs: RoundState, now: float) -> dict:
    """The JSON record of an open round at ``now`` on the run's clock (its aggregator's tensors
    are saved beside it)."""
    return {"round": rs.round, "seeds": list(rs.seeds), "plan_fingerprint": rs.plan_fingerprint,
            "selected": sorted(rs.selected), "dropped": sorted(rs.dropped),
            "deadline_remaining_s": max(rs.deadline - now, 0.0), "elapsed_s": now - rs.started,
            "submissions": {c: asdict(s) for c, s in rs.submissions.items()}, "declared": dict(rs.declared),
            "traffic": {c: t.numbers() for c, t in rs.traffic.items()}}


def journal_line(rs: RoundState, clients: set[str], now: float) -> dict:
    """What changed for ``clients`` since the previous save, and the clock at ``now``."""
    return {"deadline_remaining_s": max(rs.deadline - now, 0.0), "elapsed_s": now - rs.started,
            "submissions": {c: asdict(rs.submissions[c]) for c in sorted(clients) if c in rs.submissions},
            "traffic": {c: rs.traffic[c].numbers() for c in sorted(clients) if c in rs.traffic}}


def merge(record: dict, lines: list[dict]) -> dict:
    """The record as of its journal's last line (each line as ``RunStore`` wrote it: the
    changes plus the aggregator's tensor file and meta)."""
    for line in lines:
        record["submissions"].update(line["submissions"])
        record.setdefault("traffic", {}).update(line["traffic"])
        for key in ("deadline_remaining_s", "elapsed_s", "tensors", "aggregator"):
            record[key] = line[key]
    return record


@dataclass
class OpenSave:
    """One save of the open round: the whole record or a journal line, and the aggregator's
    ``state()`` when an update was folded since the last save."""

    round: int
    record: dict | None = None
    line: dict | None = None
    aggregator: tuple[Tensors, dict] | None = None


class SavePlanner:
    """Chooses, on the event loop, between a whole record and a journal line (module docstring)."""

    def __init__(self) -> None:
        self.journal_open = False  # the last whole record and every line since are on disk
        self._shape: tuple | None = None  # what the last whole record holds besides the journal's part

    @staticmethod
    def _shape_of(rs: RoundState) -> tuple:
        # every change of these changes a count or the deadline: a replacement adds declared
        # sizes, a leave or a drop-out moves a client from selected to dropped
        return rs.round, len(rs.selected), len(rs.dropped), len(rs.declared), rs.deadline

    def plan(self, rs: RoundState, with_aggregate: bool, now: float) -> OpenSave:
        """What the next save of the open round writes: one journal line of what changed when the
        round's shape (selection, deadline) is as last written whole, else the whole record; the
        aggregate too when ``with_aggregate``. ``now``: the clock's reading the deadline is saved
        against."""
        aggregator = rs.aggregator.state() if with_aggregate else None
        changed, rs.changed = rs.changed, set()
        shape = self._shape_of(rs)
        if self.journal_open and shape == self._shape:
            return OpenSave(rs.round, line=journal_line(rs, changed, now), aggregator=aggregator)
        self.journal_open, self._shape = False, shape  # until the whole record is written
        return OpenSave(rs.round, record=open_record(rs, now), aggregator=aggregator)


def restore_round(o: dict, tensors: Tensors, fresh_aggregator: Aggregator, deadlines: DeadlinePolicy) -> RoundState:
    """The open round of a record, after a restart, on the clock of ``deadlines``, whose
    ``resumed`` gives it a deadline at least ``rounds.resume_grace_s`` away."""
    now = deadlines.clock.monotonic()
    rs = RoundState(o["round"], o["seeds"], o["plan_fingerprint"], set(o["selected"]),
                    deadlines.resumed(float(o["deadline_remaining_s"])),
                    started=now - o["elapsed_s"], dropped=set(o["dropped"]))
    rs.declared = {c: int(n) for c, n in o.get("declared", {}).items()}
    for client_id, numbers in o["traffic"].items():
        rs.traffic[client_id] = Traffic(**numbers)
    for client_id, sub in o["submissions"].items():
        rs.submissions[client_id] = Submission(**sub)
    rs.aggregator = aggregator_from_state(tensors, o["aggregator"]) if o["aggregator"] else fresh_aggregator
    return rs
