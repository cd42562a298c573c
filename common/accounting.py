"""Byte accounting, all in one place: formulas, efficiency, and measured socket bytes.

Three layers are reported for every transfer:

* payload: raw tensor bytes (plus 8 bytes per seed on the downlink);
* message: serialized protobuf bytes plus gRPC's 5-byte frame per message;
* wire: bytes actually read from and written to the TCP socket, measured by ``CountingRelay``,
  a byte-counting TCP relay that the server puts in front of its gRPC port. That includes
  HTTP/2 framing, headers, flow control, pings and (when on) TLS records.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from torch import nn

SEED_BYTES = 8


def fedkrso_uplink_bytes(sum_dm: int, k_used: int, rank: int, dense: int, b: int) -> int:
    """ALGORITHM.md section 6: ``K_used * r * sum_m d_m * b + dense * b`` (tensor payload)."""
    return k_used * rank * sum_dm * b + dense * b


def fedkrso_downlink_bytes(sum_dm: int, k: int, rank: int, dense: int, b: int) -> int:
    """ALGORITHM.md section 6: ``K * r * sum_m d_m * b + dense * b + K * 8`` for one delta
    (a client one round behind), plus the ``K * 8`` bytes of the new round's seeds."""
    return k * rank * sum_dm * b + dense * b + 2 * k * SEED_BYTES


def full_model_bytes(model: nn.Module, b: int = 4) -> int:
    """Bytes of every parameter at ``b`` bytes per element: one FedAvg exchange, one way."""
    return sum(p.numel() for p in model.parameters()) * b


def wire_efficiency(payload_bytes: int, wire_bytes: int) -> float:
    """Payload bytes / bytes on the wire (like nanoGPT's MFU: achieved over the limit).

    1.0 means every byte on the socket was tensor data; the gap is protobuf field tags and
    names, gRPC frames, HTTP/2 frames and headers, flow control and TLS overhead."""
    return payload_bytes / wire_bytes if wire_bytes else 0.0


@dataclass
class ConnCounters:
    """Bytes through one relayed TCP connection, per direction."""

    client: str
    up: int = 0  # client -> server
    down: int = 0  # server -> client
    open: bool = True


@dataclass
class CountingRelay:
    """A TCP relay that counts the bytes of every connection it forwards.

    The server binds gRPC on a private loopback port and the relay on the public address.
    Each accepted connection opens one upstream connection; gRPC's ``context.peer()`` names
    that upstream socket (``ipv4:127.0.0.1:PORT``), which ``lookup`` maps to the counters."""

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
