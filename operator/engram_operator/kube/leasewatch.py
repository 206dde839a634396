"""A watch of the node Leases and the cache it keeps (I/O).

Owns the operator's live copy of the node Leases: one LIST, then a WATCH from the list's
resourceVersion, each event applied to the cache with the moment *this process* received it
(its monotonic clock). A watch that ends (the server's timeout), breaks, or stays silent for
IDLE_TIMEOUT is started again from a fresh LIST, after RETRY seconds. `NodeMonitor` reads the
cache instead of listing the Leases four times a second; when the cache alone can't be trusted
for a verdict, it still lists (see nodes.py).

Every live node renews its Lease twice a second, so a healthy watch is never silent for long:
IDLE_TIMEOUT is what makes a stuck one (a connection that stays open but delivers nothing) end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engram_operator.kube.api import KubeApi, KubeApiError, leases_path

log = logging.getLogger("engram_operator.kube")

# A watch that delivers nothing (not even a bookmark) this long is given up and started again.
IDLE_TIMEOUT: Final = 10.0
RETRY: Final = 0.5
# The API server ends a watch after this (it would anyway, after 5 to 10 minutes).
SERVER_TIMEOUT: Final = 300


@dataclass(frozen=True, slots=True)
class Cached:
    """A Lease as last received, and when (our monotonic clock)."""

    item: Mapping[str, Any]
    seen_at: float


class LeaseWatch:
    """The node Leases (label selector `selector`) of `namespace`, kept current by a watch."""

    def __init__(
        self,
        *,
        api: KubeApi,
        namespace: str,
        selector: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.selector = selector
        self.clock = clock
        self.items: dict[str, Cached] = {}
        # Whether the cache follows a watch now (listed, and the watch since is running).
        self.synced = False
        self.last_event_at: float | None = None
        self.lists = 0  # LISTs made to (re)start the watch
        self.restarts = 0  # watches that ended or broke
        self._task: asyncio.Task[None] | None = None
        self._error = ""

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.items.clear()
            self.synced, self.last_event_at = False, None
            self._task = asyncio.create_task(self._run(), name="engram lease watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self.synced = False
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def current(self, now: float, within: float) -> bool:
        """Is the cache following a live watch that delivered an event in the last `within`
        seconds?"""
        at = self.last_event_at
        return self.synced and at is not None and now - at <= within

    async def _run(self) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                # A watch the server ended on time resumes where it stopped, with no LIST.
                version = await self._watch(version)
                self._trouble(None)
            except KubeApiError as err:
                self._trouble(err)
                version = None
                self.synced = False
                await asyncio.sleep(RETRY)
            self.restarts += 1

    async def _list(self) -> str:
        sent = self.clock()
        self.lists += 1
        items, version = await self.api.list_leases_versioned(self.namespace, self.selector)
        fresh: dict[str, Cached] = {}
        for item in items:
            name = str((item.get("metadata") or {}).get("name", ""))
            old = self.items.get(name)
            # Unchanged since the last watch saw it: keep when that was.
            same = old is not None and _renew(old.item) == _renew(item)
            fresh[name] = old if same and old is not None else Cached(item, sent)
        self.items = fresh
        self.last_event_at = sent
        return version or ""

    async def _watch(self, version: str) -> str | None:
        """Watch from `version` ("" for now) until the server ends it; returns the version to
        resume from (None: list again)."""
        params = {
            "labelSelector": self.selector,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(SERVER_TIMEOUT),
        }
        if version:
            params["resourceVersion"] = version
        self.synced = True
        async for event in self.api.watch(
            leases_path(self.namespace), params, idle_timeout=IDLE_TIMEOUT
        ):
            version = self._apply(event) or version
        return version or None

    def _apply(self, event: Mapping[str, Any]) -> str | None:
        """Apply one event; returns the resourceVersion it carries."""
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, Mapping):
            return None
        if kind == "ERROR":  # e.g. 410 Gone: the version is too old; list again
            raise KubeApiError(f"lease watch: {obj.get('message', obj)}", status=_code(obj))
        now = self.clock()
        self.last_event_at = now
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        if kind in ("ADDED", "MODIFIED"):
            old = self.items.get(name)
            same = old is not None and _renew(old.item) == _renew(obj)
            self.items[name] = Cached(obj, old.seen_at if same and old is not None else now)
        elif kind == "DELETED":
            self.items.pop(name, None)
        # BOOKMARK: nothing changed, but the watch is alive (last_event_at above).
        version = meta.get("resourceVersion")
        return version if isinstance(version, str) and version else None

    def _trouble(self, err: Exception | None) -> None:
        text = "" if err is None else str(err)
        if text and text != self._error:
            log.info("node lease watch restarts: %s", text)
        self._error = text


def _renew(item: Mapping[str, Any]) -> object:
    return (item.get("spec") or {}).get("renewTime")


def _code(obj: Mapping[str, Any]) -> int:
    code = obj.get("code")
    return code if isinstance(code, int) else 0
