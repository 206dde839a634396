"""Just enough RESP2 (the Redis protocol) for the Redis peer benchmark, over plain asyncio.

Why not the `redis` package: the load generator shares the machine's cores with the servers it
measures, so it must cost as little per request as `leanhttp.LeanHttp` costs our sidecar. A
request here is one pipeline, written as a single pre-encoded buffer; its replies are counted
with `bytes.count` (every XADD reply is one bulk string: two CRLFs), and parsed in full only when
an error reply shows up. `RespPool` hands out one connection per request in flight, opening more
on demand (time counted against the request that needed it), exactly like `LeanHttp`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TypeVar

CRLF: Final = b"\r\n"
Reply = bytes | int | str | list["Reply"] | None
T = TypeVar("T")


class RespError(Exception):
    """An error reply (``-ERR ...``), or bytes that are not RESP."""


def command(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def parse(buf: bytes, pos: int = 0) -> tuple[Reply | RespError, int] | None:
    """One reply from `buf` at `pos`: (reply, next position), or None when incomplete.

    Error replies are returned (not raised) as RespError, so a pipeline's other replies still
    count. Bulk strings come back as bytes, simple strings as str.
    """
    end = buf.find(CRLF, pos)
    if end < 0:
        return None
    kind, line = buf[pos : pos + 1], buf[pos + 1 : end]
    nxt = end + 2
    if kind == b"+":
        return line.decode(), nxt
    if kind == b"-":
        return RespError(line.decode(errors="replace")), nxt
    if kind == b":":
        return int(line), nxt
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return None
        return buf[nxt : nxt + n], nxt + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, nxt
        items: list[Reply] = []
        for _ in range(n):
            got = parse(buf, nxt)
            if got is None:
                return None
            item, nxt = got
            if isinstance(item, RespError):
                raise item
            items.append(item)
        return items, nxt
    raise RespError(f"not RESP: {buf[pos : pos + 20]!r}")


def parse_all(buf: bytes) -> tuple[list[Reply | RespError], int]:
    """Every complete reply in `buf`, and where the incomplete rest starts."""
    out: list[Reply | RespError] = []
    pos = 0
    while pos < len(buf):
        got = parse(buf, pos)
        if got is None:
            break
        item, pos = got
        out.append(item)
    return out, pos


def info_fields(text: bytes | str) -> dict[str, str]:
    """INFO's ``key:value`` lines as a dict (section headers and blanks skipped)."""
    s = text.decode() if isinstance(text, bytes) else text
    out: dict[str, str] = {}
    for line in s.splitlines():
        if line and not line.startswith("#"):
            k, sep, v = line.partition(":")
            if sep:
                out[k] = v
    return out


def count_bulk_replies(buf: bytes) -> int | None:
    """Complete replies in a buffer of bulk-string replies (each ``$n\\r\\n...\\r\\n``, so two
    CRLFs; the values are stream IDs, which hold no CRLF). None when an error reply is in it:
    then only a full parse can count."""
    if buf.startswith(b"-") or b"\n-" in buf:
        return None
    return buf.count(CRLF) // 2


class RespConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> RespConnection:
        r, w = await asyncio.open_connection(host, port)
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(r, w)

    async def call(self, *args: bytes | str | int) -> Reply:
        """One command, one reply; an error reply raises RespError."""
        (reply,) = await self.pipeline(command(*args), 1)
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def pipeline(self, data: bytes, replies: int) -> list[Reply | RespError]:
        self.writer.write(data)
        buf = b""
        while True:
            got, _ = parse_all(buf)
            if len(got) >= replies:
                return got[:replies]
            chunk = await self.reader.read(262144)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk

    async def bulk_pipeline(self, data: bytes, replies: int) -> int:
        """Write a pipeline whose every reply is a bulk string; returns the error replies."""
        self.writer.write(data)
        parts: list[bytes] = []
        crlfs, tail = 0, b""
        while crlfs < 2 * replies:
            chunk = await self.reader.read(262144)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            parts.append(chunk)
            # A CRLF split across two reads is counted once, on the second.
            crlfs += (tail + chunk[:1]).count(CRLF) + chunk.count(CRLF)
            tail = chunk[-1:]
            # An error reply (or a read that split an ID at its dash): count by parsing.
            if chunk.startswith(b"-") or b"\n-" in chunk:
                break
        buf = b"".join(parts)
        if count_bulk_replies(buf) == replies:
            return 0
        # An error reply (one CRLF) is in there: parse in full, reading on until all are in.
        while True:
            got, _ = parse_all(buf)
            if len(got) >= replies:
                return sum(1 for g in got[:replies] if isinstance(g, RespError))
            chunk = await self.reader.read(262144)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk

    def close(self) -> None:
        self.writer.close()


class RespPool:
    """Connections to one Redis, one request per connection at a time (as `LeanHttp`)."""

    def __init__(self, host: str, port: int, *, max_connections: int = 256) -> None:
        self.host, self.port = host, port
        self._idle: list[RespConnection] = []
        self._all: set[RespConnection] = set()
        self._slots = asyncio.Semaphore(max_connections)

    async def _use(self, fn: Callable[[RespConnection], Awaitable[T]], timeout: float) -> T:
        async def bounded() -> T:
            async with self._slots:
                conn = self._idle.pop() if self._idle else None
                if conn is None:
                    conn = await RespConnection.open(self.host, self.port)
                    self._all.add(conn)
                ok = False
                try:
                    out = await fn(conn)
                    ok = True
                    return out
                finally:
                    if ok:
                        self._idle.append(conn)
                    else:
                        self._all.discard(conn)
                        conn.close()

        return await asyncio.wait_for(bounded(), timeout)

    async def bulk_pipeline(self, data: bytes, replies: int, *, timeout: float = 10.0) -> int:
        """`RespConnection.bulk_pipeline` on a pooled connection: the error replies."""
        return await self._use(lambda c: c.bulk_pipeline(data, replies), timeout)

    async def pipeline(
        self, data: bytes, replies: int, *, timeout: float = 10.0
    ) -> list[Reply | RespError]:
        return await self._use(lambda c: c.pipeline(data, replies), timeout)

    async def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()


def xadd_pipeline(key: str, payloads: list[bytes], field: str = "p") -> bytes:
    """A pipeline of one ``XADD key * field payload`` per payload, as one buffer."""
    return b"".join(command("XADD", key, "*", field, p) for p in payloads)


def config_args(settings: Mapping[str, str]) -> list[str]:
    """redis-server command-line arguments (``--name value``) from a mapping."""
    out: list[str] = []
    for k, v in settings.items():
        out += [f"--{k}", v]
    return out
