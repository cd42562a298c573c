"""Who may knock how often: Join rate limits per IP address, and a caller's IP address.

``JoinLimiter`` is a token bucket per peer address (``server.join_burst`` Joins at once, then
``server.join_rate_per_s``), so one address cannot enrol thousands of names in seconds. The
buckets themselves are bounded: full buckets carry no information and are dropped first.
"""

from __future__ import annotations

import time

from .rounds import RoundError

MAX_BUCKETS = 65536


def peer_host(peer: str) -> str:
    """The IP address of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``) or of a
    relay's ``host:port``; the string itself when it has no port."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


class JoinLimiter:
    """A token bucket of Joins per peer address (module docstring)."""

    def __init__(self, burst: int, rate_per_s: float, clock=time.monotonic):
        self.burst = burst
        self.rate = rate_per_s
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, when)

    def admit(self, host: str) -> None:
        """Take one Join from ``host``'s bucket; RESOURCE_EXHAUSTED when it is empty."""
        now = self.clock()
        tokens, when = self._buckets.get(host, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens < 1:
            self._buckets[host] = (tokens, now)
            raise RoundError("RESOURCE_EXHAUSTED", f"too many Joins from {host} (server.join_burst={self.burst}, "
                             f"join_rate_per_s={self.rate:g}); retry in {(1 - tokens) / self.rate:.1f} s")
        self._buckets[host] = (tokens - 1, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [h for h, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
        for h in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[h]
