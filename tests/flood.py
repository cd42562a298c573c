"""A bounded connection flood on loopback, and what it costs the server (test infrastructure).

``Flood`` opens raw TCP connections to a server from many loopback source addresses
(127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to ``lo``), keeps up to ``per_address``
open per address and opens a new one for every one the server closes, for ``seconds`` or
``max_attempts`` connections, whichever comes first: it stops by itself. Each connection
sends nothing (``payload=b""``: an idle TCP connection) or a few bytes and then nothing (the
first bytes of a TLS ClientHello: a handshake that never completes).

``Usage`` samples a process's resident memory and open file descriptors (psutil) while the
flood runs.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import psutil

# a TLS record header announcing a 512-byte handshake message that never comes
PARTIAL_CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC])


@dataclass
class Flood:
    port: int
    addresses: int = 40
    per_address: int = 100
    seconds: float = 8.0
    max_attempts: int = 6000
    payload: bytes = b""
    attempts: int = 0
    closed_by_server: int = 0
    peak_open: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Flood:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait(self) -> None:
        self._thread.join(self.seconds + 30)

    def _open(self, sel: selectors.BaseSelector, source: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close: no TIME_WAIT
        s.bind((source, 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self.attempts += 1
        sel.register(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.payload else 0), source)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sources = [f"127.0.0.{2 + i}" for i in range(self.addresses)]
        open_by = dict.fromkeys(sources, 0)
        end = time.monotonic() + self.seconds
        try:
            while time.monotonic() < end and not self._stop.is_set():
                for src in sources:
                    while open_by[src] < self.per_address and self.attempts < self.max_attempts:
                        try:
                            self._open(sel, src)
                        except OSError:
                            break
                        open_by[src] += 1
                self.peak_open = max(self.peak_open, sum(open_by.values()))
                for key, events in sel.select(timeout=0.05):
                    s = key.fileobj
                    if events & selectors.EVENT_WRITE:  # connected: send the payload once, then only read
                        with contextlib.suppress(OSError):
                            s.send(self.payload)
                        sel.modify(s, selectors.EVENT_READ, key.data)
                        continue
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if not data:  # the server closed it
                        sel.unregister(s)
                        s.close()
                        open_by[key.data] -= 1
                        self.closed_by_server += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()


@dataclass
class Usage:
    """Peak RSS and open file descriptors of process ``pid``, sampled every ``every`` s."""

    pid: int
    every: float = 0.1
    rss_peak: int = 0
    fds_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int]:
        p = psutil.Process(self.pid)
        return p.memory_info().rss, p.num_fds()

    def __enter__(self) -> Usage:
        def run() -> None:
            while not self._stop.wait(self.every):
                with contextlib.suppress(psutil.Error):
                    rss, fds = self.sample()
                    self.rss_peak, self.fds_peak = max(self.rss_peak, rss), max(self.fds_peak, fds)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
