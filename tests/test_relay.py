"""The byte-counting relay (server/relay.py) on its own: every byte forwarded and counted in
each direction, a slow reader held back by flow control instead of buffered, and a closed
connection released. The flood limits are exercised against a real server in test_hostile."""

from __future__ import annotations

import asyncio

from fedkrso.server.relay import CountingRelay, RelayLimits

MB = 1 << 20


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def relayed():
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    relay = CountingRelay("127.0.0.1", 0, "127.0.0.1", server.sockets[0].getsockname()[1], RelayLimits())
    return server, relay, await relay.start()


def test_bytes_are_forwarded_and_counted_and_a_slow_reader_is_held_back():
    async def scenario():
        server, relay, port = await relayed()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * (4 * MB // 256)
        writer.write(payload)
        await asyncio.sleep(1.0)  # the echo comes back while this client reads nothing
        (conn,) = relay._live
        held = conn.client.get_write_buffer_size()
        echoed = await reader.readexactly(len(payload))
        writer.close()
        for _ in range(100):
            if not relay._live:
                break
            await asyncio.sleep(0.05)
        (counters,) = relay.conns.values()
        await relay.close()
        server.close()
        return payload, echoed, held, counters, relay._live

    payload, echoed, held, counters, live = asyncio.run(scenario())
    assert echoed == payload
    assert counters.up == counters.down == len(payload) and not counters.open
    assert held < MB  # flow control: the relay stopped reading from upstream, it did not buffer 4 MB
    assert not live  # the closed connection no longer counts against the limits
