"""Asyncio glue shared by both ends of a peer connection: handshakes and frame reading.

Until the handshake succeeds the peer is unauthenticated, so what it may cost is bounded: each
handshake frame is read exactly (header, then a body of at most HANDSHAKE_MAX_BODY bytes), and
the whole handshake runs under one deadline. A peer that declares a large body is refused at its
header, and one that trickles bytes can't stretch the handshake past the deadline. Only after it
does the connection's own decoder, with the configured `max_frame_bytes`, take over the stream.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Final

from engram_contract.formats.frame import BODY_LENGTH_OFFSET, HEADER_SIZE, Frame, FrameDecoder
from engram_contract.formats.handshake import ClientHandshake, ServerHandshake
from engram_contract.ids import NodeName
from engram_sidecar.errors import WireError

READ_CHUNK = 256 * 1024
# Handshake bodies are small: CHALLENGE is at most 319 bytes and a NACK at most 530. A peer that
# declares more is not speaking the protocol, and nothing it sends is buffered past this.
HANDSHAKE_MAX_BODY: Final = 1024
_BODY_LENGTH: Final = struct.Struct("<I")


class PeerClosed(WireError):
    """The peer closed the connection or stopped answering within the I/O timeout."""

    retriable = True


class HandshakeTimeout(PeerClosed):
    """The handshake did not finish within its deadline (a slow, stalled or trickling peer)."""


class ClosedSilently(PeerClosed):
    """The peer closed before sending a byte: a bare connect, as a primary's liveness probe is."""


async def next_frames(
    reader: asyncio.StreamReader, decoder: FrameDecoder, timeout: float
) -> list[Frame]:
    """At least one frame, or PeerClosed on EOF/timeout; WireError on a bad frame."""
    while True:
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the read in a new Task, once per read
            async with asyncio.timeout(timeout):
                data = await reader.read(READ_CHUNK)
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


async def read_frame(reader: asyncio.StreamReader, *, max_body: int, first: bool = False) -> Frame:
    """Exactly one frame, reading no byte past it, so the next reader starts at a boundary.

    The header is checked (body length included) before any body byte is read. `first`: a close
    before this frame's first byte raises ClosedSilently instead of PeerClosed.
    """
    decoder = FrameDecoder(max_body=max_body)
    header = await _read_exactly(reader, HEADER_SIZE, silent=first)
    frames = decoder.feed(header)
    if not frames:
        (length,) = _BODY_LENGTH.unpack_from(header, BODY_LENGTH_OFFSET)
        frames = decoder.feed(await _read_exactly(reader, length))
    return frames[0]


async def _read_exactly(reader: asyncio.StreamReader, n: int, *, silent: bool = False) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as err:
        if silent and not err.partial:
            raise ClosedSilently("peer closed the connection without sending anything") from None
        raise PeerClosed(
            f"peer closed the connection inside a frame ({len(err.partial)} of {n} bytes)"
        ) from None
    except (ConnectionError, OSError) as err:
        raise PeerClosed(f"connection error: {err}") from err


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


def peer_source(writer: asyncio.StreamWriter) -> str:
    """The remote address (IP, without the port) that connection caps count against."""
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "?"  # not an IP socket: all such peers share one source


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
    """Authenticate to a server within `timeout` seconds, the deadline for the whole handshake.

    The handshake reads exactly its own frames, so `decoder` (the connection's, for what follows)
    is left untouched at a frame boundary and the returned list of early frames is always empty.
    Both are kept for callers that predate exact reads.
    """
    del decoder
    hs = ClientHandshake(secret=secret, node=node, expect_server=expect)
    send(writer, hs.start())
    await _drive(hs, reader, writer, timeout)
    return []


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    secret: bytes,
    node: NodeName,
    timeout: float,
) -> NodeName:
    """Authenticate a client within `timeout` seconds; returns its (now proven) node name.

    Raises ClosedSilently (a bare connect), HandshakeTimeout, PeerClosed, or WireError (a bad
    frame, a body over HANDSHAKE_MAX_BODY, a failed proof). Reads nothing past the client's last
    handshake frame: the caller's decoder starts at the first frame after WELCOME.
    """
    hs = ServerHandshake(secret=secret, node=node)
    await _drive(hs, reader, writer, timeout)
    assert hs.peer is not None
    return hs.peer


def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """`writer.write`, alike on every event loop: on a connection already closed it raises
    PeerClosed (uvloop raises RuntimeError where asyncio's loop drops the bytes silently)."""
    if writer.is_closing():
        raise PeerClosed("the connection is closed")
    try:
        writer.write(data)
    except RuntimeError as err:
        raise PeerClosed(f"the connection is closed: {err}") from err


async def _drive(
    hs: ClientHandshake | ServerHandshake,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    timeout: float,
) -> None:
    """Feed frames to a handshake until it is done, all within one deadline."""
    first = isinstance(hs, ServerHandshake)
    try:
        async with asyncio.timeout(timeout):
            while not hs.done:
                frame = await read_frame(reader, max_body=HANDSHAKE_MAX_BODY, first=first)
                first = False
                out = hs.receive(frame)
                if out:
                    send(writer, out)
                    await writer.drain()
                if hs.failed:
                    assert hs.error is not None
                    raise hs.error
    except TimeoutError:
        raise HandshakeTimeout(f"handshake not done within {timeout:.1f} s") from None
    except (ConnectionError, OSError) as err:
        raise PeerClosed(f"connection error: {err}") from err
