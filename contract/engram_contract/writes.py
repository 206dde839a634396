"""Writing entries to a primary in the binary format (docs/api.md, "Binary writes").

`EntriesClient` (asyncio, aiohttp) and `SyncEntriesClient` (blocking, the standard library) send
`POST /v1/spaces/{space}/entries` with an `application/x-engram-entries` body
(`formats.records`), so users, the benchmark and the tests never hand-roll one. Both answer a
`WriteResult` or raise `WriteError` carrying the API's error code; a 421 names the primary to
retry on. A write is wholly acknowledged or refused, never partly: the API's rule, kept here.
"""

from __future__ import annotations

import http.client
import json
import select
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import aiohttp

from engram_contract.formats.entry import EntryType
from engram_contract.formats.records import CONTENT_TYPE, encode_records

DEFAULT_TIMEOUT: Final = 10.0

Payloads = Iterable[bytes] | Iterable[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The acknowledged entries: `first_sequence..last_sequence`, written at `epoch`."""

    first_sequence: int
    last_sequence: int
    epoch: int


class WriteError(Exception):
    """The write was not acknowledged. `status` is the HTTP status (0: no answer), `code` the
    API's error code (`not_primary`, `truncated_record`, ...), `primary` the HTTP address of
    the primary to retry on when the answer was 421, and `body` the decoded answer, if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        primary: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.primary = primary
        self.body = body


def encode_body(entries: Payloads, *, entry_type: int = EntryType.EPISODE_STORE) -> bytes:
    """The request body for `entries`: payloads (all of `entry_type`), or (type, payload)."""
    records = [
        (int(entry_type), e) if isinstance(e, bytes | bytearray | memoryview) else e
        for e in entries
    ]
    return encode_records(records)


def entries_path(space: str) -> str:
    return f"/v1/spaces/{urllib.parse.quote(space, safe='')}/entries"


def parse_answer(status: int, raw: bytes, *, where: str) -> WriteResult:
    """The result of an answer to a write, or the WriteError it means."""
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
    if status == 200 and isinstance(doc, dict):
        try:
            return WriteResult(
                int(doc["first_sequence"]), int(doc["last_sequence"]), int(doc["epoch"])
            )
        except (KeyError, TypeError, ValueError):
            pass
    code = str(doc.get("error", "")) if isinstance(doc, dict) else ""
    message = str(doc.get("message", "")) if isinstance(doc, dict) else raw[:200].decode("latin-1")
    primary = doc.get("primary") if isinstance(doc, dict) else None
    raise WriteError(
        f"{where}: HTTP {status} {code}: {message}".rstrip(": "),
        status=status,
        code=code,
        primary=primary if isinstance(primary, str) else None,
        body=doc,
    )


def _split(base_url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `http://host:port` or `host:port`."""
    url = base_url if "://" in base_url else f"http://{base_url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) address: {base_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port


class EntriesClient:
    """Binary writes to one sidecar's HTTP API, over one pooled aiohttp session.

    `base_url` is `http://host:port` (or `host:port`). Pass a `session` to share one; the
    client then leaves closing it to you.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        scheme, host, port = _split(base_url)
        self.base_url = f"{scheme}://{host}:{port}"
        self.timeout = timeout
        self._session = session
        self._owned = session is None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owned = True
        return self._session

    async def write(
        self, space: str, entries: Payloads, *, entry_type: int = EntryType.EPISODE_STORE
    ) -> WriteResult:
        """Append `entries` (payloads of `entry_type`, or (type, payload) pairs) to `space`."""
        return await self.write_body(space, encode_body(entries, entry_type=entry_type))

    async def write_body(self, space: str, body: bytes) -> WriteResult:
        """Send a body already built by `encode_body` (a caller that sends it more than once)."""
        path = entries_path(space)
        try:
            async with self._s().post(
                self.base_url + path,
                data=body,
                headers={"Content-Type": CONTENT_TYPE},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                raw = await resp.read()
                return parse_answer(resp.status, raw, where=f"POST {path}")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise WriteError(f"POST {path} on {self.base_url}: {err!r}") from err

    async def close(self) -> None:
        if self._owned and self._session is not None and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SyncEntriesClient:
    """`EntriesClient` for code without an event loop: one keep-alive connection
    (http.client), reopened once if the server closed it between requests. Not thread-safe."""

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._scheme, self._host, self._port = _split(base_url)
        self.base_url = f"{self._scheme}://{self._host}:{self._port}"
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def write(
        self, space: str, entries: Payloads, *, entry_type: int = EntryType.EPISODE_STORE
    ) -> WriteResult:
        return self.write_body(space, encode_body(entries, entry_type=entry_type))

    def write_body(self, space: str, body: bytes) -> WriteResult:
        path = entries_path(space)
        headers = {"Content-Type": CONTENT_TYPE}
        if self._conn is not None and _closed_by_peer(self._conn):
            self.close()  # the server closed it while idle (keep-alive timeout): a new one
        conn = self._connection()
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as err:
            # Never resent here: the write may have been appended before the connection broke.
            self.close()
            raise WriteError(f"POST {path} on {self.base_url}: {err!r}") from err
        if resp.will_close:
            self.close()
        return parse_answer(resp.status, raw, where=f"POST {path}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection is readable: between requests that means the
    server closed it (or broke the protocol), so it must not carry the next write."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
