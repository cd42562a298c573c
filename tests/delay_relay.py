"""A TCP relay that adds a fixed one-way delay to every byte, for kernels without ``sch_netem``.

``python tests/delay_relay.py --target HOST:PORT --delay-ms 50 --port-file F`` listens on
127.0.0.1 (port 0: any free port, written to ``F``) and forwards each connection to
``HOST:PORT``. Every chunk read from either side is released to the other side ``delay-ms``
after it arrived, in order, without waiting for the chunks before it to be acknowledged: a
propagation delay (like ``netem delay``), not a throughput cap. Bandwidth is left to the
kernel's ``tbf`` on the veth link, so together they emulate an edge link.

Test infrastructure only: it runs inside the client's network namespace, so the client's
gRPC channel crosses the delayed path and then the shaped link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from pathlib import Path


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while data := await src.read(1 << 16):
            await queue.put((time.monotonic() + delay, data))
        await queue.put((time.monotonic() + delay, b""))

    reader = asyncio.create_task(read())
    try:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not data:
                break
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(Exception):
            dst.close()


async def serve(target: str, delay: float, port_file: Path) -> None:
    host, _, port = target.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(server.sockets[0].getsockname()[1]))
    os.replace(tmp, port_file)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction")
    p.add_argument("--port-file", required=True, help="the listening port is written here")
    args = p.parse_args()
    asyncio.run(serve(args.target, args.delay_ms / 1000.0, Path(args.port_file)))


if __name__ == "__main__":
    main()
