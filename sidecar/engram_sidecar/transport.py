"""Asyncio glue shared by both ends of a peer connection: handshakes and frame reading."""

from __future__ import annotations

import asyncio
import socket

from engram_sidecar.auth import ClientHandshake, ServerHandshake
from engram_sidecar.contract import NodeName
from engram_sidecar.errors import WireError
from engram_sidecar.wire import Frame, FrameDecoder

READ_CHUNK = 256 * 1024


class PeerClosed(WireError):
    """The peer closed the connection or stopped answering within the I/O timeout."""

    retriable = True


async def next_frames(
    reader: asyncio.StreamReader, decoder: FrameDecoder, timeout: float
) -> list[Frame]:
    """At least one frame, or PeerClosed on EOF/timeout; WireError on a bad frame."""
    while True:
        try:
            data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
        except TimeoutError:
            raise PeerClosed(f"no data for {timeout:.1f} s") from None
        except (ConnectionError, OSError) as err:
            raise PeerClosed(f"connection error: {err}") from err
        if not data:
            decoder.check_eof()
            raise PeerClosed("peer closed the connection")
        frames = decoder.feed(data)
        if frames:
            return frames


def tune_socket(writer: asyncio.StreamWriter, keepalive: float) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(keepalive))
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


async def client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: FrameDecoder,
    *,
    secret: bytes,
    node: NodeName,
    expect: NodeName,
    timeout: float,
) -> list[Frame]:
    """Authenticate to a server. Returns frames that arrived after WELCOME (normally none)."""
    hs = ClientHandshake(secret=secret, node=node, expect_server=expect)
    writer.write(hs.start())
    return await _drive(hs, reader, writer, decoder, timeout)


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: FrameDecoder,
    *,
    secret: bytes,
    node: NodeName,
    timeout: float,
) -> tuple[NodeName, list[Frame]]:
    hs = ServerHandshake(secret=secret, node=node)
    rest = await _drive(hs, reader, writer, decoder, timeout)
    assert hs.peer is not None
    return hs.peer, rest


async def _drive(
    hs: ClientHandshake | ServerHandshake,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: FrameDecoder,
    timeout: float,
) -> list[Frame]:
    """Feed frames to a handshake until it is done; returns the frames that came after it."""
    while True:
        frames = await next_frames(reader, decoder, timeout)
        for i, f in enumerate(frames):
            out = hs.receive(f)
            if out:
                writer.write(out)
                await writer.drain()
            if hs.failed:
                assert hs.error is not None
                raise hs.error
            if hs.done:
                return frames[i + 1 :]
