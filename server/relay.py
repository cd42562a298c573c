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
    """The relay's connection limits, from round.yaml's ``server`` section (``of``)."""

    max_connections: int = 1024
    max_per_peer: int = 64
    max_pending: int = 128
    handshake_s: float = 10.0
    idle_s: float = 300.0

    @classmethod
    def of(cls, s: ServerSection) -> RelayLimits:
        """The limits that ``server`` configures."""
        return cls(s.max_connections, s.max_connections_per_peer, s.max_pending_connections,
                   s.handshake_timeout_s, s.connection_idle_s)


def fd_budget(per_connection: int = FDS_PER_CONNECTION) -> int:
    """Connections this process's file-descriptor limit can hold, after raising the soft limit
    to the hard one (a relayed connection costs ``FDS_PER_CONNECTION``, one gRPC serves
    directly costs one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max((soft - FD_RESERVE) // per_connection, 1)


@dataclass(eq=False)
class _Conn:
    host: str
    sock: socket.socket
    accepted: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    pending: bool = True
    server_spoke: bool = False
    closed: bool = False
    client: asyncio.Transport | None = None  # the accepted connection
    upstream: asyncio.Transport | None = None  # the relay's connection to gRPC
    counters: ConnCounters | None = None
    lost: int = 0  # sides whose connection is gone

    def abort(self) -> None:
        """Close both sides now (a raw socket not yet handed to a transport included)."""
        self.closed = True
        if self.client is None:
            self.sock.close()
        for t in (self.client, self.upstream):
            if t is not None:
                t.abort()


class _Side(asyncio.Protocol):
    """One side of a relayed connection. Bytes go straight from ``data_received`` to the other
    side's transport: no task, no await per chunk (the relay carries every byte of every
    client, so its cost per chunk is the server's). When the other side's write buffer fills,
    this side stops reading until it drained (asyncio's flow control: ``pause_writing``)."""

    def __init__(self, relay: CountingRelay, conn: _Conn):
        self.relay, self.conn = relay, conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def other(self) -> asyncio.Transport | None:
        raise NotImplementedError

    def pause_writing(self) -> None:
        other = self.other()
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other()
        if other is not None and not other.is_closing():
            other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other()
        if other is not None:
            other.close()  # what it still buffers is written first
        self.relay._side_lost(self.conn)


class _ClientSide(_Side):
    """The accepted connection. Its first bytes open the upstream connection (an idle TCP
    connection costs one socket, not three)."""

    def __init__(self, relay: CountingRelay, conn: _Conn, port: int):
        super().__init__(relay, conn)
        self.port = port
        self.first: list[bytes] | None = None  # read while the upstream connection opens

    def other(self) -> asyncio.Transport | None:
        return self.conn.upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.conn.client = transport
        if self.conn.closed:  # evicted before it was served
            transport.abort()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.last = time.monotonic()
        if conn.upstream is None:
            if self.first is None:
                self.first = []
                self.transport.pause_reading()
                self.relay._spawn(self._open_upstream())
            self.first.append(data)
            return
        conn.counters.up += len(data)
        if conn.pending and conn.server_spoke:
            self.relay._settle(conn)
        if not conn.upstream.is_closing():
            conn.upstream.write(data)

    async def _open_upstream(self) -> None:
        conn, relay = self.conn, self.relay
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: _UpstreamSide(relay, conn), relay.target_host, relay.target_port)
        except OSError:
            conn.abort()
            return
        if conn.closed:
            conn.abort()
            return
        port = conn.upstream.get_extra_info("sockname")[1]
        conn.counters = ConnCounters(client=f"{conn.host}:{self.port}")
        relay.conns[port] = conn.counters
        first, self.first = b"".join(self.first), None
        conn.counters.up += len(first)
        conn.upstream.write(first)
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the client is done: close, and the upstream side after it


class _UpstreamSide(_Side):
    """The relay's connection to the gRPC port."""

    def other(self) -> asyncio.Transport | None:
        return self.conn.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.conn.upstream = transport

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.last = time.monotonic()
        conn.counters.down += len(data)
        conn.server_spoke = True
        if not conn.client.is_closing():
            conn.client.write(data)

    def eof_received(self) -> bool:
        return False


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
        """Listen on the public address and start accepting; returns the bound port."""
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
                self._spawn(self._serve(conn, peer))

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

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Conn, peer: tuple) -> None:
        """Hand the accepted socket to a transport; its protocol (``_ClientSide``) relays."""
        if conn.closed:  # evicted before it was served
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: _ClientSide(self, conn, peer[1]),
                                                                     conn.sock)
        except OSError:
            self._release(conn)
            conn.abort()

    def _side_lost(self, conn: _Conn) -> None:
        """A side of ``conn`` closed. Once both did (or the client's, when the upstream one
        never opened) it stops counting against the limits and its counters are final; until
        then the other side is flushing what it holds, bounded by the idle sweep."""
        conn.lost += 1
        if conn.lost < (2 if conn.upstream is not None else 1):
            return
        self._release(conn)
        conn.closed = True
        if conn.counters is not None:
            conn.counters.open = False
        # keep closed connections' counters briefly: a round may still read them
        if len(self.conns) > 4096:
            for key in [k for k, c in self.conns.items() if not c.open][:2048]:
                del self.conns[key]

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
        """Stop accepting and abort every relayed connection."""
        for task in (self._acceptor, self._sweeper, *self._tasks):
            if task is not None:
                task.cancel()
        for conn in list(self._live):
            conn.abort()
        if self._sock is not None:
            self._sock.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
