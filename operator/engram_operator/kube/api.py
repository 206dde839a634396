"""Thin Kubernetes API calls the operator makes itself (kopf does the watching).

Owns URLs, credentials and error mapping for exactly what the driver needs: list node Leases, read
a MemorySpace, merge-patch its status subresource, and post core/v1 Events. Every call has a
total timeout, so a hung API server shows up as an error (and a held verdict), never as a hang.

Credentials come from a kopf `ConnectionInfo` (a kubeconfig, the pod's service account, or a bare
URL for tests), the same object the operator hands kopf's login handler, so both clients act as
one identity. A 401 re-reads the credentials once: projected service-account tokens rotate.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import kopf

from engram_contract.kubernetes import API_GROUP, API_VERSION, PLURAL

# Events carry at most this many characters of message (the API server's own limit is 1 KiB in
# practice; kopf truncates at the same length).
EVENT_MESSAGE_LIMIT: Final = 1024
COMPONENT: Final = "engram-operator"
MERGE_PATCH: Final = "application/merge-patch+json"


class KubeApiError(Exception):
    """A Kubernetes API call failed. `status` is the HTTP status, 0 when there was no answer."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectRef:
    """What an Event is about."""

    kind: str
    api_version: str
    namespace: str
    name: str
    uid: str | None = None


def connection_info(
    *, settings: kopf.OperatorSettings, kubeconfig: Path | None, api_url: str | None
) -> kopf.ConnectionInfo:
    """Credentials for the API: `api_url` (no auth, tests and `kubectl proxy`), a kubeconfig, or
    the pod's service account, in that order of preference."""
    if api_url:
        return kopf.ConnectionInfo(server=api_url.rstrip("/"))
    if kubeconfig is not None:
        os.environ["KUBECONFIG"] = str(kubeconfig)
    info = kopf.login_with_service_account(settings=settings) if kubeconfig is None else None
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError(
            "no Kubernetes credentials: pass --kubeconfig or --api-url, or run in a pod"
        )
    return info


def leases_path(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def now_iso() -> str:
    """The current UTC time in the RFC 3339 form Kubernetes uses (microsecond precision)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubeApi:
    """The operator's own API client. `credentials` is called again after a 401."""

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo],
        *,
        user_agent: str,
        timeout: float = 2.0,
    ) -> None:
        self._credentials = credentials
        self._info = credentials()
        self._user_agent = user_agent
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def server(self) -> str:
        return str(self._info.server).rstrip("/")

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            https = self.server.startswith("https:")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._info.as_ssl_context() if https else False),
                headers={"User-Agent": self._user_agent},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One call; returns the parsed JSON answer or raises KubeApiError."""
        for attempt in (1, 2):
            headers = dict(self._info.as_http_headers())
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body)
            try:
                async with self._session_now().request(
                    method,
                    self.server + path,
                    data=data,
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
                ) as resp:
                    text = await resp.text()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as err:
                raise KubeApiError(f"{method} {path}: {err!r}") from err
            if status == 401 and attempt == 1:
                self._info = self._credentials()  # a rotated token: read it again, retry once
                continue
            if status >= 400:
                raise KubeApiError(f"{method} {path}: HTTP {status}: {text[:300]}", status=status)
            try:
                return json.loads(text) if text else None
            except ValueError as err:
                raise KubeApiError(f"{method} {path}: answer is not JSON", status=status) from err
        raise AssertionError("unreachable")

    async def watch(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        connect_timeout: float | None = None,
        idle_timeout: float,
    ) -> AsyncIterator[dict[str, Any]]:
        """`GET path?watch=1…`: yields each watch event ({"type", "object"}) as it arrives.
        Ends when the server closes the stream; raises KubeApiError on an HTTP error, a broken
        stream, or no byte for `idle_timeout` seconds (a stuck watch)."""
        headers = dict(self._info.as_http_headers())
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout or self._timeout, sock_read=idle_timeout
        )
        try:
            async with self._session_now().get(
                self.server + path,
                params={**params, "watch": "true"},
                headers=headers,
                timeout=timeout,
            ) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    if resp.status == 401:
                        self._info = self._credentials()  # rotated token: the next try uses it
                    raise KubeApiError(
                        f"WATCH {path}: HTTP {resp.status}: {text[:300]}", status=resp.status
                    )
                async for line in resp.content:
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError as err:
                        raise KubeApiError(f"WATCH {path}: not JSON: {line[:100]!r}") from err
                    if isinstance(event, dict):
                        yield event
        except (aiohttp.ClientError, TimeoutError) as err:
            raise KubeApiError(f"WATCH {path}: {err!r}") from err

    # ---- the calls the operator makes ------------------------------------------------------

    async def list_leases(
        self, namespace: str, label_selector: str, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        items, _ = await self.list_leases_versioned(namespace, label_selector, timeout=timeout)
        return items

    async def list_leases_versioned(
        self, namespace: str, label_selector: str, *, timeout: float | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The node Leases, and the list's resourceVersion (where a watch may start)."""
        doc = await self.request(
            "GET",
            leases_path(namespace),
            params={"labelSelector": label_selector},
            timeout=timeout,
        )
        items = doc.get("items") if isinstance(doc, dict) else None
        meta = (doc.get("metadata") or {}) if isinstance(doc, dict) else {}
        version = meta.get("resourceVersion")
        found = [i for i in items or [] if isinstance(i, dict)]
        return found, version if isinstance(version, str) and version else None

    def _space_path(self, namespace: str, name: str) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"

    async def get_space(
        self, namespace: str, name: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        doc = await self.request("GET", self._space_path(namespace, name), timeout=timeout)
        if not isinstance(doc, dict):
            raise KubeApiError(f"GET {PLURAL}/{name}: not an object")
        return doc

    async def patch_space_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, object],
        *,
        resource_version: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch of the status subresource. With `resource_version`, the API server
        refuses it (409) when the object changed since that version was read."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        doc = await self.request(
            "PATCH",
            self._space_path(namespace, name) + "/status",
            body=body,
            content_type=MERGE_PATCH,
            timeout=timeout,
        )
        return doc if isinstance(doc, dict) else {}

    async def post_event(
        self, ref: ObjectRef, *, type_: str, reason: str, message: str
    ) -> dict[str, Any]:
        now = now_iso()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named like client-go names events: the object's name and a random suffix.
            "metadata": {"name": f"{ref.name}.{secrets.token_hex(8)}", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
                **({"uid": ref.uid} if ref.uid else {}),
            },
            "type": type_,
            "reason": reason,
            "message": truncate(message, EVENT_MESSAGE_LIMIT),
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._user_agent,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        doc = await self.request("POST", f"/api/v1/namespaces/{ref.namespace}/events", body=body)
        return doc if isinstance(doc, dict) else {}


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, marking the cut with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
