"""Whether this operator instance is alive, ready and active, and says so (I/O at the edges).

kopf stops quietly in two ways this module makes loud (issue 15, item 6):

* **A missing KopfPeering object.** With `--peering NAME` and no such object, kopf pauses every
  handler and logs that at DEBUG only: nothing is reconciled, yet every replica looked healthy.
  Every PEERING_CHECK this module reads the object (a LIST by name: the Role grants `list`). While
  it is missing: an ERROR in the log (once per change), `operator_peering_missing` 1, and
  `/readyz` fails, so `kubectl get pods` and the rollout show it.
* **A watch that stops delivering.** kopf restarts a MemorySpace watch that is silent past its
  inactivity timeout, and the Lease watch (`leasewatch`) restarts itself after IDLE_TIMEOUT; what
  neither can see is a watch whose deliveries stop while its connection looks fine, or a task that
  hangs. Every AUDIT_INTERVAL the active instance lists the MemorySpaces (from the API server's
  cache, `resourceVersion=0`) and compares them with the objects kopf handed its daemons (kopf
  keeps a daemon's `body` current from the watch): an object the list shows newer, or one kopf
  never delivered, still so after STUCK_AFTER, is a stuck watch, and `/healthz` fails, so the
  kubelet restarts the container. `/healthz` also fails when the node monitor stops refreshing.

`operator_leader` says which instance is active: 1 when standalone, or when the peering object
names no live peer that outranks this one (kopf's own rule: a higher priority, or the same one).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engram_operator.kube.api import KubeApi, KubeApiError
from engram_operator.kube.metrics import OperatorMetrics
from engram_operator.kube.status_patch import newest_version

log = logging.getLogger("engram_operator.kube")

PEERING_CHECK: Final = 5.0
AUDIT_INTERVAL: Final = 30.0
# An object the watch has not delivered (or delivered an older version of) for this long, seen by
# two audits in a row at least: kopf's own inactivity timeout (70 s) would have acted by then.
STUCK_AFTER: Final = 90.0
# The node monitor refreshes every 0.25 s: this long without one, and its loop is stuck.
MONITOR_STALL: Final = 30.0


def _parse_time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def outranked_by(
    status: Mapping[str, Any], *, identity: str, priority: int, now: datetime.datetime
) -> list[str]:
    """The live peers in a KopfPeering's status that pause `identity` (kopf's rule: a live peer
    of higher priority, or of the same priority)."""
    out = []
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        seen = _parse_time(info.get("lastseen"))
        lifetime = info.get("lifetime", 60)
        prio = info.get("priority", 0)
        if seen is None or not isinstance(lifetime, int) or not isinstance(prio, int):
            continue
        if seen + datetime.timedelta(seconds=lifetime) <= now:
            continue  # dead: kopf ignores it too
        if prio >= priority:
            out.append(peer)
    return sorted(out)


def behind(listed: Mapping[str, str | None], delivered: Mapping[str, str | None]) -> list[str]:
    """Objects (name -> resourceVersion) the list shows that the watch has not delivered, or
    delivered an older version of."""
    out = []
    for name, version in listed.items():
        mine = delivered.get(name)
        if name not in delivered or (
            version and mine != version and newest_version(version, mine) == version
        ):
            out.append(name)
    return sorted(out)


@dataclass
class _Lag:
    since: float
    audits: int = 1


class OperatorHealth:
    """Liveness, readiness and the leader and peering metrics of one operator instance."""

    def __init__(
        self,
        *,
        api: KubeApi,
        metrics: OperatorMetrics,
        namespace: str,
        identity: str,
        priority: int,
        peering: str | None,
        spaces_path: str,
        spaces_selector: str = "",
        delivered: Callable[[], Mapping[str, str | None]],
        monitor_refreshed: Callable[[], float | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.namespace = namespace
        self.identity = identity
        self.priority = priority
        self.peering = peering
        self.spaces_path = spaces_path
        # Only the spaces this operator reconciles (its release's): another release's are never
        # delivered to it, and would look like a stuck watch.
        self.spaces_selector = spaces_selector
        self.delivered = delivered
        self.monitor_refreshed = monitor_refreshed
        self.clock = clock
        self.peering_missing: bool | None = None  # None: not read yet
        self.leader = peering is None
        self.stuck: dict[str, _Lag] = {}
        self._tasks: list[asyncio.Task[None]] = []
        metrics.leader.set(1 if self.leader else 0)
        metrics.peering_missing.set(0)

    def start(self) -> None:
        if self.peering is not None:
            self._tasks.append(asyncio.create_task(self._every(PEERING_CHECK, self.check_peering)))
        self._tasks.append(asyncio.create_task(self._every(AUDIT_INTERVAL, self.audit)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    async def _every(self, period: float, step: Callable[[], Any]) -> None:
        while True:
            try:
                await step()
            except Exception:  # the check must outlive one bad round
                log.exception("health check failed")
            await asyncio.sleep(period)

    # ---- peering ------------------------------------------------------------------------------

    async def check_peering(self) -> None:
        assert self.peering is not None
        try:
            doc = await self.api.request(
                "GET",
                f"/apis/kopf.dev/v1/namespaces/{self.namespace}/kopfpeerings",
                params={"fieldSelector": f"metadata.name={self.peering}"},
            )
        except KubeApiError as err:
            log.warning("cannot read KopfPeering %s: %s", self.peering, err)
            return
        items = doc.get("items") if isinstance(doc, dict) else None
        found = next(
            (
                i
                for i in items or []
                if isinstance(i, dict) and (i.get("metadata") or {}).get("name") == self.peering
            ),
            None,
        )
        missing = found is None
        if missing != self.peering_missing:
            if missing:
                log.error(
                    "KopfPeering %s/%s is missing: kopf pauses this operator and NOTHING is"
                    " reconciled (no placement, no failover). Create it (the Helm chart does:"
                    " templates/operator-peering.yaml), or run one replica with --standalone",
                    self.namespace,
                    self.peering,
                )
            elif self.peering_missing is not None:
                log.warning("KopfPeering %s/%s is back", self.namespace, self.peering)
        self.peering_missing = missing
        self.metrics.peering_missing.set(1 if missing else 0)
        status = (found or {}).get("status") or {}
        ahead = outranked_by(
            status if isinstance(status, Mapping) else {},
            identity=self.identity,
            priority=self.priority,
            now=datetime.datetime.now(datetime.UTC),
        )
        leader = not missing and not ahead
        if leader != self.leader:
            log.info(
                "operator %s is %s",
                self.identity,
                "the active replica" if leader else f"standing by ({', '.join(ahead) or 'paused'})",
            )
        self.leader = leader
        self.metrics.leader.set(1 if leader else 0)

    # ---- the watch audit ------------------------------------------------------------------------

    async def audit(self) -> None:
        """Compare the MemorySpaces listed with what kopf delivered (see the module)."""
        if not self.leader:
            self.stuck.clear()
            return
        params = {"resourceVersion": "0"}
        if self.spaces_selector:
            params["labelSelector"] = self.spaces_selector
        try:
            doc = await self.api.request("GET", self.spaces_path, params=params, timeout=10.0)
        except KubeApiError as err:
            log.info("watch audit: cannot list MemorySpaces: %s", err)
            return
        delivered = dict(self.delivered())
        listed: dict[str, str | None] = {}
        for item in (doc.get("items") if isinstance(doc, dict) else None) or []:
            meta = (item.get("metadata") or {}) if isinstance(item, dict) else {}
            if meta.get("deletionTimestamp") or not meta.get("name"):
                continue
            version = meta.get("resourceVersion")
            listed[str(meta["name"])] = version if isinstance(version, str) else None
        now = self.clock()
        late = behind(listed, delivered)
        self.stuck = {
            n: _Lag(self.stuck[n].since, self.stuck[n].audits + 1) if n in self.stuck else _Lag(now)
            for n in late
        }
        self.metrics.watch_behind.set(len(late))

    # ---- the probes ---------------------------------------------------------------------------

    def alive(self) -> str | None:
        """None when live, else why not (`/healthz` fails: the kubelet restarts us)."""
        now = self.clock()
        stuck = [
            n for n, lag in self.stuck.items() if lag.audits >= 2 and now - lag.since >= STUCK_AFTER
        ]
        if stuck:
            return (
                f"the MemorySpace watch is stuck: {', '.join(stuck[:5])} changed"
                f" {STUCK_AFTER:g} s ago or more and kopf has not delivered it"
            )
        refreshed = self.monitor_refreshed()
        if refreshed is not None and now - refreshed > MONITOR_STALL:
            return f"the node monitor has not refreshed for {now - refreshed:.0f} s"
        return None

    def ready(self) -> str | None:
        """None when ready, else why not (`/readyz` fails)."""
        if self.peering_missing:
            return (
                f"KopfPeering {self.namespace}/{self.peering} is missing: this operator is"
                " paused and reconciles nothing"
            )
        return self.alive()
