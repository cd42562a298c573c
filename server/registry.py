"""The client registry: who joined, who is alive, who left, and who is selected for a round.

Like Flower's client manager, it knows nothing of the transport or of rounds' contents: the
service registers and touches clients, the coordinator asks it for live clients and for a
deterministic selection.

Two rules keep a flood of names from taking real clients' places: a client is selectable only
once it asked for work (a ``StartRound`` poll, ``touch(..., polling=True)``) and while it is
heard from, so names that only Join are never selected; and the table holds at most
``max_clients`` entries, forgetting clients that left or went silent first.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import structlog

from ..common.logs import bounded
from ..common.subspace import stable_seed
from .rounds import RoundError

log = structlog.get_logger("fedkrso.server")
LIVENESS_S = 60.0  # a client not heard from for this long is not selected
LEAVE_GRACE_S = 3.0  # after its FINISHED stream, how long a client's Leave is waited for


@dataclass
class ClientState:
    """One client as the server knows it: its id and name, declared shard and evaluation sizes, when it
    was last heard from, whether it is active and asked for work."""

    client_id: str
    name: str
    num_samples: int
    eval_samples: int = 0  # rows of its held-out split: bounds what its evaluations may weigh
    last_seen: float = field(default_factory=time.monotonic)
    active: bool = True
    polled: bool = False  # asked for work at least once since it joined
    finished_at: float | None = None  # when its FINISHED stream was completely yielded
    dropped: bool = False  # silent past a round's deadline and not heard from since


class ClientRegistry:
    """Clients by id, with liveness and selection."""

    def __init__(self, run_seed: int, liveness_s: float = LIVENESS_S, max_clients: int = 1 << 30):
        self.run_seed = run_seed
        self.liveness_s = liveness_s
        self.max_clients = max_clients
        self.clients: dict[str, ClientState] = {}
        self._asked = 0  # active clients that asked for work (``selectable_bound``)

    def join(self, client_id: str, name: str, num_samples: int, eval_samples: int = 0, keep: Collection[str] = (),
             software_version: str = "") -> ClientState:
        """Register (or register again) ``client_id``. A new id in a full table first evicts
        clients that left or went silent, never one in ``keep`` (the open round's)."""
        if num_samples < 1:
            raise RoundError("INVALID_ARGUMENT", "num_samples must be at least 1")
        if client_id not in self.clients and len(self.clients) >= self.max_clients:
            self._evict(keep)
        old = self.clients.get(client_id)
        if old is not None:
            self._count(old, -1)
        client = ClientState(client_id, name, num_samples, eval_samples)
        self.clients[client_id] = client
        log.info("client_joined", client=client_id, name=name, samples=num_samples, eval_samples=eval_samples,
                 software_version=bounded(software_version, 40))
        return client

    def _evict(self, keep: Collection[str]) -> None:
        """Forget the client that left, or was heard from least recently, outside ``keep`` and
        not live; RESOURCE_EXHAUSTED when every entry is live or kept."""
        horizon = time.monotonic() - self.liveness_s
        gone = [c for c in self.clients.values()
                if c.client_id not in keep and (not c.active or c.last_seen < horizon)]
        if not gone:
            raise RoundError("RESOURCE_EXHAUSTED", f"the client table is full ({self.max_clients} live clients, "
                             "server.max_clients); try again later")
        victim = min(gone, key=lambda c: (c.active, c.last_seen))
        self._count(victim, -1)
        del self.clients[victim.client_id]
        log.info("client_forgotten", client=victim.client_id, table=len(self.clients))

    def leave(self, client_id: str) -> None:
        """Mark ``client_id`` as left (no longer selectable)."""
        client = self.clients.get(client_id)
        if client:
            self._count(client, -1)
            client.active = False

    def touch(self, client_id: str, polling: bool = False) -> ClientState:
        """The joined, active client, marked as heard from now (and as asking for work when
        ``polling``); UNAUTHENTICATED otherwise (it never joined, the server restarted, or it
        left: it joins again)."""
        client = self.clients.get(client_id)
        if client is None:
            raise RoundError("UNAUTHENTICATED", f"client {client_id!r} is not joined")
        if not client.active:
            raise RoundError("UNAUTHENTICATED", f"client {client_id!r} left the run; join again to take part")
        client.last_seen = time.monotonic()
        if polling and not client.polled:
            client.polled = True
            self._count(client, +1)
        client.dropped = False
        return client

    def _count(self, client: ClientState, sign: int) -> None:
        if client.active and client.polled:
            self._asked += sign

    def selectable_bound(self) -> int:
        """At least ``len(selectable())``, in O(1): the active clients that asked for work,
        counted as they change. Whether they are still live takes a scan of the table, which
        the coordinator waiting for clients makes only once this bound is high enough (a scan
        on every Join made joining N clients O(N^2 log N))."""
        return self._asked

    def get(self, client_id: str) -> ClientState:
        """The client's record (KeyError for an unknown id)."""
        return self.clients[client_id]

    def is_live(self, client_id: str) -> bool:
        """Joined, not left, and heard from within ``liveness_s``."""
        c = self.clients.get(client_id)
        return c is not None and c.active and c.last_seen >= time.monotonic() - self.liveness_s

    def live(self) -> list[str]:
        """Active clients heard from within ``liveness_s``, by id."""
        horizon = time.monotonic() - self.liveness_s
        return sorted(c.client_id for c in self.clients.values() if c.active and c.last_seen >= horizon)

    def selectable(self) -> list[str]:
        """Live clients that asked for work: the ones a round may select and count on."""
        return [c for c in self.live() if self.clients[c].polled]

    def select(self, round_id: int, exclude: set[str], n: int, secret: bool = False) -> list[str]:
        """Up to ``n`` selectable clients not in ``exclude``: a sample seeded by (run seed,
        round, how many are excluded), so a replacement draw differs from the first one; with
        ``secret``, from the operating system's entropy (DP's amplification by sampling needs
        a selection nobody can predict)."""
        pool = [c for c in self.selectable() if c not in exclude]
        rng = random.SystemRandom() if secret else random.Random(
            stable_seed("select", self.run_seed, round_id, len(exclude)))
        return sorted(rng.sample(pool, min(n, len(pool))))

    def by_staleness(self, ids: set[str]) -> list[str]:
        """``ids``, the longest unheard from first (unknown ids first of all)."""
        return sorted(ids, key=lambda c: (self.clients[c].last_seen if c in self.clients else -1.0, c))

    def mark_finished(self, client_id: str) -> None:
        """``client_id`` received the run's FINISHED stream (now only its Leave is awaited)."""
        client = self.clients.get(client_id)
        if client:
            client.finished_at = time.monotonic()

    def mark_dropped(self, client_ids) -> None:
        """These clients missed a round's deadline: until heard from again they are not
        waited for at the end of the run (``still_finishing``)."""
        for c in client_ids:
            if c in self.clients:
                self.clients[c].dropped = True

    def still_finishing(self) -> list[str]:
        """Live clients that neither left nor got their whole FINISHED stream
        ``LEAVE_GRACE_S`` ago (their Leave may still come); a client dropped at a deadline and
        silent since is not waited for."""
        now = time.monotonic()
        return [c for c in self.live() if not self.clients[c].dropped and (
                self.clients[c].finished_at is None or now - self.clients[c].finished_at < LEAVE_GRACE_S)]
