"""The byte-counting TCP relay in front of the gRPC port: socket bytes per client connection.

The server binds gRPC on a private loopback port and this relay on the public address. Each
accepted connection opens one upstream connection; gRPC's ``context.peer()`` names that
upstream socket (``ipv4:127.0.0.1:PORT``), which ``lookup`` maps to the connection's
``ConnCounters`` (``common/accounting.py``). Under TLS the relay forwards the encrypted bytes,
which are the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from ..common.accounting import ConnCounters


@dataclass
class CountingRelay:
    """A TCP relay that counts the bytes of every connection it forwards (module docstring)."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    chunk: int = 1 << 16
    conns: dict[int, ConnCounters] = field(default_factory=dict)
    _server: asyncio.base_events.Server | None = None
    _tasks: set = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        return self._server.sockets[0].getsockname()[1]

    def lookup(self, peer: str) -> ConnCounters | None:
        """Counters for a gRPC peer string such as ``ipv4:127.0.0.1:54321``."""
        try:
            return self.conns.get(int(peer.rsplit(":", 1)[1]))
        except (ValueError, IndexError):
            return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        port = up_writer.get_extra_info("sockname")[1]
        counters = ConnCounters(client=f"{peer[0]}:{peer[1]}" if peer else "?")
        self.conns[port] = counters

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(self.chunk):
                    if up:
                        counters.up += len(data)
                    else:
                        counters.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        tasks = [asyncio.create_task(pipe(reader, up_writer, True)),
                 asyncio.create_task(pipe(up_reader, writer, False))]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # relay closing: the connection just ends
            pass
        self._tasks.difference_update(tasks)
        counters.open = False
        # keep closed connections' counters briefly: a round may still read them
        if len(self.conns) > 4096:
            for key in [k for k, c in self.conns.items() if not c.open][:2048]:
                del self.conns[key]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
