"""The sidecar's HTTP API client (docs/api.md): heartbeat, probe, assignment, fence, view.

Used by the operator, local mode, the benchmark and the tests: one client, so the control-plane
calls can't drift apart. Owns nothing but the HTTP shape of those calls and their timeouts.
Control-plane routes carry the admin bearer token; every call is bounded, and failures come back
as `SidecarError` (or a False probe), never as a hang. Calls that grant a write lease
(heartbeats, assignments) carry this client's id and the monotonic send stamp the caller read,
so a sidecar can refuse a grant that arrived late.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import aiohttp
import orjson

from engram_contract.assignment import bracketed
from engram_contract.ids import SpaceId

# An assignment or fence is one fsync on the node plus a round trip: 2 s is generous, and bounded
# so that one slow node can't stall a failover for long.
CONTROL_TIMEOUT: Final = 2.0


def _decode(raw: bytes) -> Any:
    """A sidecar's JSON answer, or None if empty or not JSON.

    orjson first: an operator heartbeats every node a few times a second and each answer holds
    every hosted space's view, so at 1,000 spaces decoding them was half the operator's CPU
    (py-spy), and orjson decodes them about 2.7x faster. json.loads second, for what orjson
    refuses and the standard library reads (NaN, Infinity, UTF-16): the same answers as
    before, whatever a node sends."""
    if not raw or raw.isspace():  # not strip(): that would copy every answer
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except ValueError:
        return None


class SidecarError(Exception):
    """A sidecar call failed; `status` is the HTTP status, 0 when there was no answer."""

    def __init__(
        self, message: str, *, status: int = 0, body: Any = None, delivered: bool = True
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        # False only when no connection was made, so the request certainly never arrived.
        self.delivered = delivered


class SidecarClient:
    """HTTP to the nodes' sidecars, addressed by their `host:port` (a Lease annotation, or
    local mode's cluster.json)."""

    def __init__(
        self,
        token: str | Callable[[], str],
        *,
        probe_timeout: float,
        lease_seconds: float = 1.5,
        handles_drain: bool = False,
    ) -> None:
        # A callable is asked before every call: a token file that rotates (tokens.KeyFile).
        self._token = token if callable(token) else (lambda: token)
        # Heartbeats say this control plane moves a draining node's spaces away: a sidecar
        # that hears it waits for that on SIGTERM (drain_timeout), else it exits at once.
        self.handles_drain = handles_drain
        self._probe_timeout = probe_timeout
        # The write lease each grant offers: the reconcile settings' `write_lease`, so the wait
        # before a promotion can never be shorter than what a node was granted.
        self.lease_seconds = lease_seconds
        self._session: aiohttp.ClientSession | None = None
        self._beats: aiohttp.ClientSession | None = None
        # Who grants: a new process is a new baseline for the sidecars' grant-delay estimate.
        self.control_plane = secrets.token_hex(8)

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        return self._session

    def _beat_session(self) -> aiohttp.ClientSession:
        """Heartbeats open a new connection each time: then a refused connection proves the
        grant in it never left (`SidecarError.delivered`), so a killed primary's lease wait
        starts at its last heartbeat that got through; a reused connection can't tell."""
        if self._beats is None or self._beats.closed:
            self._beats = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, force_close=True)
            )
        return self._beats

    async def close(self) -> None:
        for session in (self._session, self._beats):
            if session is not None and not session.closed:
                await session.close()

    async def _call(
        self,
        method: str,
        http: str,
        path: str,
        *,
        body: Any = None,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> Any:
        try:
            async with (session or self._s()).request(
                method,
                f"http://{bracketed(http)}{path}",
                json=body,
                headers={"Authorization": f"Bearer {self._token()}", **(headers or {})},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                doc = _decode(await resp.read())
                if resp.status != 200:
                    raise SidecarError(
                        f"{method} {path} on {http}: HTTP {resp.status} {doc}",
                        status=resp.status,
                        body=doc,
                    )
                return doc
        except aiohttp.ClientConnectorError as err:
            # Nothing was sent: a grant in it can never arrive (see `SidecarError.delivered`).
            raise SidecarError(f"{method} {path} on {http}: {err!r}", delivered=False) from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise SidecarError(f"{method} {path} on {http}: {err!r}") from err

    async def healthz(self, http: str, *, expect: str | None = None) -> bool:
        """The direct probe: does the node answer `/healthz` within the probe timeout? With
        `expect`, only an answer naming that node counts: another node now listening at the
        address (a reused pod IP) says nothing about the one we asked for."""
        try:
            doc = await self._call("GET", http, "/healthz", timeout=self._probe_timeout)
        except SidecarError:
            return False
        return expect is None or (isinstance(doc, dict) and doc.get("node") == expect)

    async def heartbeat(
        self,
        http: str,
        epochs: Mapping[SpaceId, int],
        *,
        sent_mono_ns: int,
        expect: str | None = None,
    ) -> dict[str, Any]:
        """`POST /v1/lease`: renew the write leases of the spaces the node leads at `epochs`,
        stamped `sent_mono_ns` (our monotonic clock, read just before). Answers the node's
        `/v1/status`. With `expect`, an answer from another node (a reused address) is an
        error, like no answer: it proves nothing about `expect`."""
        body = {
            "granted_at_ns": time.time_ns(),
            "control_plane": self.control_plane,
            "sent_mono_ns": sent_mono_ns,
            "lease_seconds": self.lease_seconds,
            "epochs": dict(epochs),
        }
        if self.handles_drain:
            body["handles_drain"] = True
        doc = await self._call(
            "POST",
            http,
            "/v1/lease",
            body=body,
            timeout=self._probe_timeout,
            session=self._beat_session(),
        )
        if not isinstance(doc, dict):
            raise SidecarError(f"POST /v1/lease on {http}: not an object")
        if expect is not None and doc.get("node") != expect:
            raise SidecarError(
                f"POST /v1/lease on {http}: answered by node {doc.get('node')!r}, not {expect!r}"
            )
        return doc

    async def assign(
        self, http: str, space: SpaceId, doc: Mapping[str, object], *, sent_mono_ns: int
    ) -> dict[str, Any]:
        """`PUT` the assignment; stamped like a heartbeat, since it grants a new primary's lease."""
        headers = {
            "X-Engram-Control-Plane": self.control_plane,
            "X-Engram-Sent-Mono-Ns": str(sent_mono_ns),
            "X-Engram-Lease-Seconds": str(self.lease_seconds),
        }
        answer = await self._call(
            "PUT",
            http,
            f"/v1/spaces/{space}/assignment",
            body=dict(doc),
            timeout=CONTROL_TIMEOUT,
            headers=headers,
        )
        return answer if isinstance(answer, dict) else {}

    async def fence(
        self,
        http: str,
        space: SpaceId,
        epoch: int,
        *,
        timeout: float = CONTROL_TIMEOUT,
        incarnation: str | None = None,
    ) -> dict[str, Any]:
        """Fence a member at `epoch`: it takes the epoch durably and refuses older ones; a
        primary stops acknowledging. Answers its last durable entry (`last_epoch`,
        `last_sequence`) as of then. With `incarnation`, a node holding another incarnation of
        the space refuses (409 `other_incarnation`): its log is not this space's."""
        body: dict[str, Any] = {"epoch": epoch}
        if incarnation:
            body["incarnation"] = incarnation
        answer = await self._call(
            "POST",
            http,
            f"/v1/spaces/{space}/fence",
            body=body,
            timeout=timeout,
        )
        if not isinstance(answer, dict):
            raise SidecarError(f"POST fence on {http}: not an object", status=200, body=answer)
        return answer

    async def retire(
        self,
        http: str,
        space: SpaceId,
        *,
        incarnation: str | None,
        delete: bool,
        timeout: float = CONTROL_TIMEOUT,
    ) -> dict[str, Any]:
        """`POST /v1/spaces/{space}/retire`: the MemorySpace is gone. The node stops the space
        (no more writes, no streams), then moves its files aside (or deletes them with
        `delete`), and refuses that incarnation from then on. Idempotent; a node that does not
        host the space answers `hosted: false`."""
        body: dict[str, Any] = {"delete": delete}
        if incarnation:
            body["incarnation"] = incarnation
        answer = await self._call(
            "POST", http, f"/v1/spaces/{space}/retire", body=body, timeout=timeout
        )
        return answer if isinstance(answer, dict) else {}

    async def space_view(self, http: str, space: SpaceId) -> dict[str, Any]:
        answer = await self._call("GET", http, f"/v1/spaces/{space}", timeout=1.0)
        return answer if isinstance(answer, dict) else {}

    async def node_status(self, http: str, *, timeout: float = 1.0) -> dict[str, Any]:
        """`GET /v1/status`: the node and every space it hosts (`engram-replication status`)."""
        answer = await self._call("GET", http, "/v1/status", timeout=timeout)
        if not isinstance(answer, dict):
            raise SidecarError(f"GET /v1/status on {http}: not an object", status=200, body=answer)
        return answer

    async def append(
        self,
        http: str,
        space: SpaceId,
        payloads: Sequence[object],
        *,
        timeout: float = CONTROL_TIMEOUT,
    ) -> dict[str, Any]:
        """`POST /v1/spaces/{space}/entries`: append one entry per JSON payload (only the
        primary accepts: a replica answers 421, a primary without its write lease 503). Answers
        the write's acknowledgement."""
        answer = await self._call(
            "POST",
            http,
            f"/v1/spaces/{space}/entries",
            body={"entries": [{"payload": p} for p in payloads]},
            timeout=timeout,
        )
        return answer if isinstance(answer, dict) else {}
