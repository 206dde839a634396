"""The operator's calls to node sidecars (docs/api.md): heartbeat, probe, assignment, fence, view.

Owns nothing but the HTTP shape of those calls and their timeouts. The control-plane routes carry
the admin bearer token (`--token-file`); every call is bounded, and failures come back as
`SidecarError` (or a False probe), never as a hang.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from engram_sidecar.contract import SpaceId

# An assignment or fence is one fsync on the node plus a round trip: 2 s is generous, and bounded
# so that one slow node can't stall a failover for long.
CONTROL_TIMEOUT: Final = 2.0


class SidecarError(Exception):
    """A sidecar call failed; `status` is the HTTP status, 0 when there was no answer."""

    def __init__(self, message: str, *, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class SidecarClient:
    """HTTP to the nodes' sidecars, addressed by their `host:port` (the Lease annotation)."""

    def __init__(self, token: str, *, probe_timeout: float) -> None:
        self._token = token
        self._probe_timeout = probe_timeout
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                headers={"Authorization": f"Bearer {self._token}"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def _call(
        self, method: str, http: str, path: str, *, body: Any = None, timeout: float
    ) -> Any:
        try:
            async with self._s().request(
                method,
                f"http://{http}{path}",
                json=body,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    doc = None
                if resp.status != 200:
                    raise SidecarError(
                        f"{method} {path} on {http}: HTTP {resp.status} {doc}",
                        status=resp.status,
                        body=doc,
                    )
                return doc
        except (aiohttp.ClientError, TimeoutError) as err:
            raise SidecarError(f"{method} {path} on {http}: {err!r}") from err

    async def healthz(self, http: str) -> bool:
        """The direct probe: does the node answer `/healthz` within the probe timeout?"""
        try:
            await self._call("GET", http, "/healthz", timeout=self._probe_timeout)
        except SidecarError:
            return False
        return True

    async def heartbeat(self, http: str, epochs: Mapping[SpaceId, int]) -> dict[str, Any]:
        """`POST /v1/lease`: renew the write leases of the spaces the node leads at `epochs`,
        dated by our wall clock now. Answers the node's `/v1/status`."""
        body = {"granted_at_ns": time.time_ns(), "epochs": dict(epochs)}
        doc = await self._call("POST", http, "/v1/lease", body=body, timeout=self._probe_timeout)
        if not isinstance(doc, dict):
            raise SidecarError(f"POST /v1/lease on {http}: not an object")
        return doc

    async def assign(self, http: str, space: SpaceId, doc: Mapping[str, object]) -> dict[str, Any]:
        answer = await self._call(
            "PUT", http, f"/v1/spaces/{space}/assignment", body=dict(doc), timeout=CONTROL_TIMEOUT
        )
        return answer if isinstance(answer, dict) else {}

    async def fence(self, http: str, space: SpaceId, epoch: int) -> int:
        """Fence the space's primary at `epoch`; answers its final last sequence."""
        answer = await self._call(
            "POST",
            http,
            f"/v1/spaces/{space}/fence",
            body={"epoch": epoch},
            timeout=CONTROL_TIMEOUT,
        )
        return int(answer.get("last_sequence", 0)) if isinstance(answer, dict) else 0

    async def space_view(self, http: str, space: SpaceId) -> dict[str, Any]:
        answer = await self._call("GET", http, f"/v1/spaces/{space}", timeout=1.0)
        return answer if isinstance(answer, dict) else {}
