"""The client registry: who joined, who is alive, who left, and who is selected for a round.

Like Flower's client manager, it knows nothing of the transport or of rounds' contents: the
service registers and touches clients, the coordinator asks it for live clients and for a
deterministic selection.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import structlog

from ..common.subspace import stable_seed
from .rounds import RoundError

log = structlog.get_logger("fedkrso.server")
LIVENESS_S = 60.0  # a client not heard from for this long is not selected
LEAVE_GRACE_S = 3.0  # after its FINISHED stream, how long a client's Leave is waited for


@dataclass
class ClientState:
    client_id: str
    name: str
    num_samples: int
    eval_samples: int = 0  # rows of its held-out split: bounds what its evaluations may weigh
    last_seen: float = field(default_factory=time.monotonic)
    active: bool = True
    finished_at: float | None = None  # when its FINISHED stream was completely yielded


class ClientRegistry:
    """Clients by id, with liveness and selection."""

    def __init__(self, run_seed: int, liveness_s: float = LIVENESS_S):
        self.run_seed = run_seed
        self.liveness_s = liveness_s
        self.clients: dict[str, ClientState] = {}

    def join(self, client_id: str, name: str, num_samples: int, eval_samples: int = 0) -> ClientState:
        if num_samples < 1:
            raise RoundError("INVALID_ARGUMENT", "num_samples must be at least 1")
        client = ClientState(client_id, name, num_samples, eval_samples)
        self.clients[client_id] = client
        log.info("client_joined", client=client_id, name=name, samples=num_samples, eval_samples=eval_samples)
        return client

    def leave(self, client_id: str) -> None:
        client = self.clients.get(client_id)
        if client:
            client.active = False

    def touch(self, client_id: str) -> ClientState:
        """The joined, active client, marked as heard from now; UNAUTHENTICATED otherwise."""
        client = self.clients.get(client_id)
        if client is None or not client.active:
            raise RoundError("UNAUTHENTICATED", f"client {client_id!r} is not joined")
        client.last_seen = time.monotonic()
        return client

    def get(self, client_id: str) -> ClientState:
        return self.clients[client_id]

    def live(self) -> list[str]:
        """Active clients heard from within ``liveness_s``, sorted by id."""
        horizon = time.monotonic() - self.liveness_s
        return sorted(c.client_id for c in self.clients.values() if c.active and c.last_seen >= horizon)

    def select(self, round_id: int, exclude: set[str], n: int, secret: bool = False) -> list[str]:
        """Up to ``n`` live clients not in ``exclude``: a sample seeded by (run seed, round,
        how many are excluded), so a replacement draw differs from the first one; with
        ``secret``, from the operating system's entropy (DP's amplification by sampling needs
        a selection nobody can predict)."""
        pool = [c for c in self.live() if c not in exclude]
        rng = random.SystemRandom() if secret else random.Random(
            stable_seed("select", self.run_seed, round_id, len(exclude)))
        return sorted(rng.sample(pool, min(n, len(pool))))

    def by_staleness(self, ids: set[str]) -> list[str]:
        """``ids``, the longest unheard from first (unknown ids first of all)."""
        return sorted(ids, key=lambda c: (self.clients[c].last_seen if c in self.clients else -1.0, c))

    def mark_finished(self, client_id: str) -> None:
        client = self.clients.get(client_id)
        if client:
            client.finished_at = time.monotonic()

    def still_finishing(self) -> list[str]:
        """Live clients that neither left nor got their whole FINISHED stream
        ``LEAVE_GRACE_S`` ago (their Leave may still come)."""
        now = time.monotonic()
        return [c for c in self.live()
                if self.clients[c].finished_at is None or now - self.clients[c].finished_at < LEAVE_GRACE_S]
