"""A lean HTTP/1.1 client for the load generators and the lease renewer (see `LeanHttp`)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping


class HttpError(Exception):
    """The server answered something this client does not parse, or closed the connection."""


class LeanHttp:
    """A minimal HTTP/1.1 keep-alive client to one host:port, for the load generators.

    The sidecar's HTTP server is what the benchmarks measure; the client runs on the same few
    cores, so every microsecond it spends is stolen from the server. aiohttp's client costs
    several times more per request than writing the request line and reading a Content-Length
    response by hand, which is all a benchmark needs. One request per connection at a time;
    idle connections are reused, more are opened on demand (the time to open one counts against
    the request that needed it), up to `max_connections`.
    """

    def __init__(self, host: str, port: int, *, max_connections: int = 256) -> None:
        self.host = host
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: set[asyncio.StreamWriter] = set()
        # A bound on open sockets (file descriptors): past it, requests wait for a connection,
        # and that wait counts in their latency like any other.
        self._slots = asyncio.Semaphore(max_connections)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/x-ndjson",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        # asyncio.timeout, not wait_for: no task per request, and (before Python 3.12) wait_for
        # can swallow a cancellation that lands as the request completes, so a loop of requests
        # could outlive its cancel.
        async with asyncio.timeout(timeout), self._slots:
            return await self._request(method, path, body, content_type, headers or {})

    async def _request(
        self, method: str, path: str, body: bytes, content_type: str, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        if self._idle:
            r, w = self._idle.pop()
        else:
            r, w = await asyncio.open_connection(self.host, self.port)
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._all.add(w)
        ok = False
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            if body:
                head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            w.write(head.encode() + b"\r\n" + body)
            raw = await r.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length, close = None, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                key = name.strip().lower()
                if key == "content-length":
                    length = int(value)
                elif key == "connection" and value.strip().lower() == "close":
                    close = True
                elif key == "transfer-encoding":
                    raise HttpError(f"unsupported Transfer-Encoding: {value.strip()}")
            if length is None:
                raise HttpError("response without Content-Length")
            data = await r.readexactly(length)
            ok = not close
            return status, data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise HttpError(f"{type(err).__name__}: {err}") from err
        finally:
            if ok:
                self._idle.append((r, w))
            else:
                self._all.discard(w)
                w.close()

    async def close(self) -> None:
        for w in self._all:
            w.close()
        self._all.clear()
        self._idle.clear()
