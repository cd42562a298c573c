"""Reading update streams so that a stalled or greedy client costs nobody else their round.

Each ``SubmitUpdate`` (and ``SubmitMaskedInput``) stream is read through an ``Upload`` of the
service's ``UploadGate``, by ``receive``:

* clocks: every message, the first included, must arrive within ``server.upload_idle_s`` of
  the previous one, and the whole stream within ``server.upload_total_s`` of its start
  (waiting for its turn included); a stream past either is refused with DEADLINE_EXCEEDED;
* one upload per client at a time (``turn``): a client's second concurrent stream waits for
  the first to end (then is usually a duplicate), at most ``MAX_WAITING`` of them, beyond
  which RESOURCE_EXHAUSTED. It never takes a slot, so N streams of one client hold one;
* ``server.max_concurrent_uploads`` slots (``slot``) bound the updates assembled at once.
  A slot is taken only after the header validated and the client's turn came, and is
  released on every exit path (an ``async with``): a refusal, a timeout, a cancelled call.

So a client that opens more streams than there are slots and stalls holds one slot for at
most ``upload_idle_s`` (silent) or ``upload_total_s`` (trickling), and only colluding
selected clients at least as many as the slots can make others wait, at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fedkrso.v1 import coordinator_pb2 as pb

from ..common.accounting import message_bytes
from ..common.wire import TensorAssembler, WireError
from .intake import Admission
from .rounds import RoundError

MAX_WAITING = 4  # streams of one client waiting for its turn (an honest client retries one)


class UploadGate:
    """Per-client turns, global slots and the clocks of every update stream."""

    def __init__(self, slots: int, idle_s: float, total_s: float):
        self.idle_s = idle_s
        self.total_s = total_s
        self._slots = asyncio.Semaphore(slots)
        self._turns: dict[str, asyncio.Lock] = {}
        self._queued: dict[str, int] = {}  # streams holding or waiting for a client's turn

    def open(self, stream: AsyncIterator, client_id: str) -> Upload:
        """Start the clocks of one stream of ``client_id``."""
        return Upload(self, stream.__aiter__(), client_id)


class Upload:
    """One update stream under the gate's limits (module docstring)."""

    def __init__(self, gate: UploadGate, stream, client_id: str):
        self.gate = gate
        self.stream = stream
        self.client_id = client_id
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self.deadline = loop.time() + gate.total_s

    def _left(self) -> float:
        return self.deadline - self._clock()

    async def next(self):
        """The next message, or None at the end of the stream; DEADLINE_EXCEEDED when it does
        not come within ``upload_idle_s`` or the stream's total time is used up."""
        wait = min(self.gate.idle_s, self._left())
        try:
            return await asyncio.wait_for(self.stream.__anext__(), max(wait, 0.0))
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if self._left() <= 0:
                raise RoundError("DEADLINE_EXCEEDED", f"update stream took longer than "
                                 f"server.upload_total_s={self.gate.total_s:g} s") from None
            raise RoundError("DEADLINE_EXCEEDED", f"no message of the update stream for "
                             f"server.upload_idle_s={self.gate.idle_s:g} s") from None

    async def _acquire(self, waiter, what: str) -> None:
        try:
            await asyncio.wait_for(waiter, max(self._left(), 0.0))
        except TimeoutError:
            raise RoundError("DEADLINE_EXCEEDED", f"update stream waited for {what} longer than "
                             f"server.upload_total_s={self.gate.total_s:g} s") from None

    @contextlib.asynccontextmanager
    async def turn(self):
        """This client's only upload in progress, for the ``async with`` block."""
        gate, cid = self.gate, self.client_id
        if gate._queued.get(cid, 0) > MAX_WAITING:
            raise RoundError("RESOURCE_EXHAUSTED", f"client {cid!r} already has {MAX_WAITING + 1} update streams "
                             "open; one is read at a time")
        lock = gate._turns.setdefault(cid, asyncio.Lock())
        gate._queued[cid] = gate._queued.get(cid, 0) + 1
        try:
            await self._acquire(lock.acquire(), "its client's previous stream to end")
            try:
                yield
            finally:
                lock.release()
        finally:
            gate._queued[cid] -= 1
            if not gate._queued[cid]:
                del gate._queued[cid]
                gate._turns.pop(cid, None)

    @contextlib.asynccontextmanager
    async def slot(self):
        """One of ``max_concurrent_uploads`` slots, for the ``async with`` block."""
        await self._acquire(self.gate._slots.acquire(), "an upload slot")
        try:
            yield
        finally:
            self.gate._slots.release()


class HeldUpload:
    """An update stream already read whole, held in memory (a cluster backend's client sent its
    SubmitUpdate messages as one answer): served to ``receive`` like an ``Upload``, without
    clocks, turns or slots, which bound live sockets and this stream has none."""

    def __init__(self, messages: list[pb.SubmitUpdateRequest]):
        self._it = iter(messages)

    async def next(self):
        """The next message, None at the end."""
        return next(self._it, None)

    def turn(self):
        """No other stream of its client can be in progress: nothing to wait for."""
        return contextlib.nullcontext()

    def slot(self):
        """Nothing is read from a socket: nothing to bound."""
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Received:
    """An update stream read to its end: its admission, whether it was folded (False: a
    duplicate, read and dropped), and its payload and message bytes."""

    adm: Admission
    folded: bool
    payload_bytes: int = 0
    message_bytes: int = 0


async def receive(upload: Upload, kind: str, admit: Callable[[pb.UpdateHeader], Admission],
                  fold: Callable[[Admission, dict, int, int], Awaitable[bool | None]]) -> Received:
    """Read an update stream (``kind``: what it carries, for the messages): its header, checked
    by ``admit`` before the stream waits for its client's turn and again once it has it (the
    client's previous stream may have been accepted meanwhile); a duplicate drained within its
    bound, otherwise the tensors assembled in a slot and handed to ``fold`` (tensors, payload
    bytes, message bytes) there."""
    first = await upload.next()
    if first is None:
        raise RoundError("INVALID_ARGUMENT", f"empty {kind} stream")
    if first.WhichOneof("body") != "header":
        raise RoundError("INVALID_ARGUMENT", f"{kind} stream must start with a header")
    h = first.header
    admit(h)  # refuse before waiting
    async with upload.turn():
        adm = admit(h)
        if adm.duplicate:  # idempotent resubmission: read it, bounded, change nothing
            await drain(upload, adm.max_bytes)
            return Received(adm, False)
        async with upload.slot():
            tensors, asm, msg_bytes = await assemble(upload, h, adm, message_bytes(first))
            folded = await fold(adm, tensors, asm.payload_bytes, msg_bytes)
    return Received(adm, folded is not False, asm.payload_bytes, msg_bytes)


async def drain(upload: Upload, max_bytes: int) -> None:
    """Read a duplicate's stream to its end (the client is waiting for the answer) without
    keeping it, refusing one that carries more tensor bytes than an update can."""
    seen = 0
    while (msg := await upload.next()) is not None:
        seen += sum(len(c.data) for c in msg.tensors.chunks)
        if seen > max_bytes:
            raise RoundError("INVALID_ARGUMENT", f"stream exceeds the {max_bytes}-byte limit")


async def assemble(upload: Upload, h: pb.UpdateHeader, adm: Admission,
                   msg_bytes: int) -> tuple[dict, TensorAssembler, int]:
    """The update's tensors, checked against the admitted spec as they arrive and against the
    header at the end; (tensors, the assembler, message bytes of the whole stream)."""
    asm = TensorAssembler(adm.spec, adm.wire, max_bytes=adm.max_bytes)
    try:
        while (msg := await upload.next()) is not None:
            msg_bytes += message_bytes(msg)
            if msg.WhichOneof("body") != "tensors":
                raise WireError("only tensor batches may follow the header")
            asm.add(msg.tensors)
        tensors = asm.finish(set(adm.required))
        if len(tensors) != h.num_tensors:
            raise WireError(f"header announced {h.num_tensors} tensors, stream carried {len(tensors)}")
        if asm.digest() != h.update_digest:
            raise WireError("update_digest does not match the tensors received")
    except WireError as err:
        raise RoundError("INVALID_ARGUMENT", str(err)) from None
    return tensors, asm, msg_bytes
