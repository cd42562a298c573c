"""Metering a selected client's download of the open round: its bytes, and their durability.

A training client's download (the assignment's deltas, or a snapshot) is its round's downlink:
a fresh meter when it begins, marked at the connection's socket counters (wire bytes are
measured from that mark when the upload comes on the same connection), payload and message
bytes added as each message is sent, and, once it was sent whole, saved with the open round in
the background (group-committed with other downloads) so the figures survive a restart. A
client that is not selected for the open round is not metered. The port (``port.py``) calls
this as it yields the messages; it sees the open-round ledger (``ledger.py``) only.
"""

from __future__ import annotations

import asyncio

from ..common.accounting import ConnCounters, SocketMark, Traffic
from .ledger import RoundLedger
from .rounds import RoundState


class DownloadMeter:
    """The downlink figures of the open round's clients (module docstring)."""

    def __init__(self, ledger: RoundLedger):
        self.ledger = ledger

    def _open_traffic(self, client_id: str, round_id: int | None = None) -> Traffic | None:
        """The client's traffic meter in the open round, when it is selected there."""
        rs = self.ledger.current
        if rs is None or client_id not in rs.selected or (round_id is not None and rs.round != round_id):
            return None
        return rs.traffic_of(client_id)

    def begin(self, client_id: str, round_id: int, counters: ConnCounters | None) -> None:
        """A selected client starts downloading round ``round_id``: a fresh meter, marked at
        its connection's counters (None: not measured)."""
        if self._open_traffic(client_id, round_id) is not None:
            self.ledger.current.traffic[client_id] = Traffic(download=SocketMark.now(counters))

    def count(self, client_id: str, payload: int, message: int) -> None:
        """Bytes sent for the open round's download (deltas or snapshot) of ``client_id``."""
        traffic = self._open_traffic(client_id)
        if traffic is not None:
            traffic.add_down(payload, message)

    def end(self, client_id: str) -> None:
        """The download was sent whole: save its bytes with the open round, in the background."""
        rs = self.ledger.current
        if self._open_traffic(client_id) is None:
            return
        rs.unsaved_downloads = True
        if rs.record_flusher is None or rs.record_flusher.done():
            rs.record_flusher = asyncio.create_task(self._flush_record(rs))

    async def _flush_record(self, rs: RoundState) -> None:
        led = self.ledger
        while rs.unsaved_downloads:
            async with led.fold_lock:
                if not led.is_open(rs):
                    return
                await led.save_open(rs)
