"""`transport.send`: a write on a closed replication connection raises PeerClosed, on asyncio's
loop (which would drop the bytes) and on uvloop (which would raise RuntimeError) alike."""

from __future__ import annotations

import asyncio

import pytest

from engram_sidecar import eventloop
from engram_sidecar.replication.transport import PeerClosed, send


async def _closed_then_send() -> None:
    got: list[bytes] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await r.read(100))
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, w = await asyncio.open_connection("127.0.0.1", port)
    send(w, b"hello")
    await w.drain()
    w.close()
    with pytest.raises(PeerClosed):
        send(w, b"after close")
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_send_on_a_closed_connection_raises_peer_closed(loop: str) -> None:
    eventloop.run(asyncio.wait_for(_closed_then_send(), 10), loop)
