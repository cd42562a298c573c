"""Long-polls waiting for work, woken only when their answer may have changed.

A ``StartRound`` poll of a client with nothing to do waits here. One condition woken on every
change of the run (``Coordinator.notify``) woke every waiting poll on every accepted update: with
N clients a round, the ones that had already submitted were woken again by each later update,
O(N^2) wakeups a round. A poll's answer (``Coordinator.assignment``) changes only when a round
opens, the run finishes, or the client itself is added to the open round or leaves, so those
wake it and nothing else does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class PollWaiters:
    """The waiting polls, by client id."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future]] = {}

    async def wait(self, client_id: str, timeout: float) -> None:
        """Until ``client_id`` is woken (``wake``, ``wake_all``) or ``timeout`` seconds passed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        mine = self._waiting.setdefault(client_id, set())
        mine.add(fut)
        timer = loop.call_later(max(timeout, 0.0), _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            mine.discard(fut)
            if not mine and self._waiting.get(client_id) is mine:
                del self._waiting[client_id]

    def wake(self, client_ids: Iterable[str]) -> None:
        """Wake the polls of these clients (added to the open round, or left)."""
        for client_id in client_ids:
            for fut in self._waiting.pop(client_id, ()):
                _resolve(fut)

    def wake_all(self) -> None:
        """Wake every poll (a round opened, or the run finished)."""
        waiting, self._waiting = self._waiting, {}
        for futs in waiting.values():
            for fut in futs:
                _resolve(fut)
