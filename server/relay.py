"""The byte-counting TCP relay in front of the gRPC port: socket bytes per client connection,
and the first line against connection floods.

The server binds gRPC on a private loopback port and this relay on the public address.
gRPC's ``context.peer()`` names the relay's upstream socket (``ipv4:127.0.0.1:PORT``), which
``lookup`` maps to the connection's ``ConnCounters`` (``common/accounting.py``). Under TLS the
relay forwards the encrypted bytes, which are the bytes on the wire.

A connection costs what it carries and no more (``RelayLimits``, from ``server.*``):

* at most ``max_connections`` at once and ``max_connections_per_peer`` from one IP address;
  more are reset as soon as they are accepted (the relay accepts one connection at a time,
  so a refused one never holds a descriptor past its accept);
* the upstream connection is opened only when the client sends its first bytes, so an idle
  TCP connection costs one socket, not three;
* a connection is *pending* until it completed a handshake round trip (the client spoke
  again after the server answered: a TLS handshake's client Finished, HTTP/2's SETTINGS
  acknowledgement). Pending connections must finish within ``handshake_timeout_s``, and
  beyond ``max_pending_connections`` one pending connection is closed for the newest: the
  oldest of the address holding the most, so a flood from many addresses evicts itself
  before it evicts a client's single handshake;
* a connection carrying no byte for ``connection_idle_s`` is closed (clients ping every 30 s).

Refusals are counted (``stats``) and logged as one summary line every few seconds, never one
line per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog

from ..common.accounting import ConnCounters
from ..common.config import ServerSection

log = structlog.get_logger("fedkrso.server")
FDS_PER_CONNECTION = 3  # the accepted socket, the relay's upstream socket, gRPC's end of it
FD_RESERVE = 256  # files, the model, gRPC's own pipes


@dataclass(frozen=True)
class RelayLimits:
    max_connections: int = 1024
    max_per_peer: int = 64
    max_pending: int = 128
    handshake_s: float = 10.0
    idle_s: float = 300.0

    @classmethod
    def of(cls, s: ServerSection) -> RelayLimits:
        return cls(s.max_connections, s.max_connections_per_peer, s.max_pending_connections,
                   s.handshake_timeout_s, s.connection_idle_s)


def fd_budget() -> int:
    """Connections this process's file-descriptor limit can hold, after raising the soft limit
    to the hard one (a connection costs ``FDS_PER_CONNECTION``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max((soft - FD_RESERVE) // FDS_PER_CONNECTION, 1)


@dataclass(eq=False)
class _Conn:
    host: str
    sock: socket.socket
    accepted: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    pending: bool = True
    server_spoke: bool = False
    closed: bool = False
    writer: asyncio.StreamWriter | None = None
    upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        """Close both sides now (a raw socket not yet handed to a transport included)."""
        self.closed = True
        if self.writer is None:
            self.sock.close()
        for w in (self.writer, self.upstream):
            if w is not None:
                w.transport.abort()


def _reset(sock: socket.socket) -> None:
    """Close with a RST: no FIN handshake, no TIME_WAIT; the descriptor is free at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class CountingRelay:
    """A TCP relay that counts the bytes of every connection it forwards (module docstring)."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    limits: RelayLimits = field(default_factory=RelayLimits)
    chunk: int = 1 << 16
    conns: dict[int, ConnCounters] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    _sock: socket.socket | None = None
    _acceptor: asyncio.Task | None = None
    _live: set[_Conn] = field(default_factory=set)
    _per_peer: Counter = field(default_factory=Counter)
    _pending: dict[str, dict[_Conn, None]] = field(default_factory=dict)  # host -> its pending, oldest first
    _pending_count: int = 0
    _sweeper: asyncio.Task | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        self._sock = socket.create_server((self.listen_host, self.listen_port), family=family, backlog=1024)
        self._sock.setblocking(False)
        self._acceptor = asyncio.create_task(self._accept())
        self._sweeper = asyncio.create_task(self._sweep())
        return self._sock.getsockname()[1]

    async def _accept(self) -> None:
        """Accept one connection at a time and admit it or reset it on the spot, so a refused
        connection never holds a descriptor past its accept."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._sock)
            except OSError:  # out of descriptors (EMFILE): let closing connections free some
                self.stats["accept_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            conn = self._admit(str(peer[0]), sock)
            if conn is None:
                _reset(sock)
            else:
                task = asyncio.create_task(self._handle(conn, peer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def lookup(self, peer: str) -> ConnCounters | None:
        """Counters for a gRPC peer string such as ``ipv4:127.0.0.1:54321``."""
        try:
            return self.conns.get(int(peer.rsplit(":", 1)[1]))
        except (ValueError, IndexError):
            return None

    def _admit(self, host: str, sock: socket.socket) -> _Conn | None:
        lim = self.limits
        if len(self._live) >= lim.max_connections:
            self.stats["refused_total_limit"] += 1
            return None
        if self._per_peer[host] >= lim.max_per_peer:
            self.stats["refused_peer_limit"] += 1
            return None
        conn = _Conn(host, sock)
        self._live.add(conn)
        self._per_peer[host] += 1
        self._pending.setdefault(host, {})[conn] = None
        self._pending_count += 1
        if self._pending_count > lim.max_pending:
            heaviest = max(self._pending.values(), key=len)
            self._drop(next(iter(heaviest)), "evicted_pending")
        return conn

    def _drop(self, conn: _Conn, why: str) -> None:
        """Close ``conn`` now and stop counting it at once (its task ends a moment later)."""
        self._release(conn)
        conn.abort()
        self.stats[why] += 1

    def _settle(self, conn: _Conn) -> None:
        """No longer pending (through its handshake, or closed)."""
        if not conn.pending:
            return
        conn.pending = False
        mine = self._pending[conn.host]
        del mine[conn]
        self._pending_count -= 1
        if not mine:
            del self._pending[conn.host]

    def _release(self, conn: _Conn) -> None:
        self._settle(conn)
        if conn in self._live:
            self._live.discard(conn)
            self._per_peer[conn.host] -= 1
            if not self._per_peer[conn.host]:
                del self._per_peer[conn.host]

    async def _handle(self, conn: _Conn, peer: tuple) -> None:
        try:
            if conn.closed:  # evicted before it was served
                return
            reader, writer = await asyncio.open_connection(sock=conn.sock)
            conn.writer = writer
            if conn.closed:
                return
            first = await reader.read(self.chunk)  # the sweeper closes it past handshake_s
            if not first or conn.closed:
                return
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
            conn.upstream = up_writer
            port = up_writer.get_extra_info("sockname")[1]
            counters = ConnCounters(client=f"{conn.host}:{peer[1]}")
            self.conns[port] = counters
            counters.up += len(first)
            up_writer.write(first)
            await self._relay(conn, counters, reader, writer, up_reader, up_writer)
            counters.open = False
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:  # relay closing: the connection just ends
            pass
        finally:
            self._release(conn)
            conn.abort()
        # keep closed connections' counters briefly: a round may still read them
        if len(self.conns) > 4096:
            for key in [k for k, c in self.conns.items() if not c.open][:2048]:
                del self.conns[key]

    async def _relay(self, conn: _Conn, counters: ConnCounters, reader, writer, up_reader, up_writer) -> None:
        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(self.chunk):
                    conn.last = time.monotonic()
                    if up:
                        counters.up += len(data)
                        if conn.pending and conn.server_spoke:
                            self._settle(conn)
                    else:
                        counters.down += len(data)
                        conn.server_spoke = True
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        tasks = [asyncio.create_task(pipe(reader, up_writer, True)),
                 asyncio.create_task(pipe(up_reader, writer, False))]
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for t in tasks:
                t.cancel()

    async def _sweep(self) -> None:
        """Close pending connections past ``handshake_s`` and idle ones past ``idle_s``; log
        what was refused since the last summary."""
        lim, logged, last_log = self.limits, Counter(), 0.0
        while True:
            await asyncio.sleep(min(1.0, lim.handshake_s / 4))
            now = time.monotonic()
            for conn in [c for mine in self._pending.values() for c in mine if now - c.accepted > lim.handshake_s]:
                self._drop(conn, "handshake_timeouts")
            for conn in [c for c in self._live if now - c.last > lim.idle_s]:
                self._drop(conn, "idle_closed")
            if self.stats != logged and now - last_log >= 5.0:
                log.warning("connections_refused", open=len(self._live), pending=self._pending_count,
                            **{k: v - logged[k] for k, v in self.stats.items()})
                logged, last_log = Counter(self.stats), now

    async def close(self) -> None:
        for task in (self._acceptor, self._sweeper, *self._tasks):
            if task is not None:
                task.cancel()
        for conn in list(self._live):
            conn.abort()
        if self._sock is not None:
            self._sock.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
