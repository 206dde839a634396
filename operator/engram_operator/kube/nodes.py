"""The operator's view of the nodes: their Leases, probes, heartbeats and progress reports.

Owns the facts `verdict.judge` and `reconcile` need about nodes, gathered once per operator
process (not once per space), every `Timing.check_interval`:

* **Leases.** A watch of the node Leases (label `engram.io/node-lease=true`, `leasewatch`)
  keeps a cache; each interval reads it, and only while a node looks anything but alive (no
  renewal seen for QUIET), or the watch lags, LISTs them as well (`_cache_will_do`). A
  renewal counts from the moment *this process sees* `spec.renewTime` change, on its own
  monotonic clock. The first sighting (at start-up, or on taking over from a peer) counts as a
  renewal too, unless `renewTime` is clearly stale by the wall clock (older than the lease plus
  FIRST_SIGHT_SLACK, far beyond any clock skew): guessing a Lease younger than it is delays a
  failover by at most one lease duration, guessing it older could depose a primary that renews
  fine but that this process can't reach yet. The Lease annotations say where the sidecar listens.
* **Probes.** When a verdict asks (`probe_due`), `GET /healthz` with the probe timeout.
* **Heartbeats.** `POST /v1/lease` to every node: it grants the write lease of each space the node
  leads in a placement we recorded (design §4: a primary whose replicas are down still writes
  while the control plane vouches for it), and answers `/v1/status`, our member reports. A
  heartbeat that succeeds counts as a successful probe: it proves the node was alive when it was
  sent. Each grant carries our id and monotonic send stamp (the sidecar refuses one that arrives
  more than its max_grant_delay late), and we remember when we last sent each (node, space) a
  grant (`lease_grants`): `reconcile` promotes nobody until that grant has run out.

The loop runs only while some space is attached (a space's kopf daemon runs), so a peer paused by
kopf peering neither heartbeats nor grants: only the active operator vouches for primaries.
Probes and heartbeats run as background tasks, at most one of each per node in flight, so a hung
node never delays the lease read that the next tick needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import NodeName, SpaceId
from engram_contract.kubernetes import (
    ANNOTATION_DRAINING,
    ANNOTATION_FENCED,
    ANNOTATION_HTTP,
    ANNOTATION_REPLICATION,
    LABEL_NODE_LEASE,
    LABEL_RACK,
    LABEL_RELEASE,
    LABEL_ZONE,
    LEASE_PREFIX,
    NodeAddresses,
)
from engram_operator.kube.api import KubeApi, KubeApiError
from engram_operator.kube.leasewatch import LeaseWatch
from engram_operator.model import MemberReport, NodeInfo, Placement, member_reports
from engram_operator.verdict import (
    DEFAULT_TIMING,
    LeaseObservation,
    ProbeResult,
    StoreHealth,
    Timing,
    Verdict,
    judge,
)

log = logging.getLogger("engram_operator.kube")

# Before a space's first placement, wait this long at most for every node to be judged once (a
# renewal seen, or a probe answered), so that an operator that just started doesn't place every
# new space on whichever node it happened to judge first.
SETTLE_GRACE: Final = 10.0
# The Lease watch's cache stands in for a LIST only while every node renewed within this (two
# renewals) and the watch delivered an event within it: see `NodeMonitor._cache_will_do`.
QUIET: Final = 1.0
# A Lease first seen with a renewTime older than its duration plus this is treated as never
# renewed (judged by a probe at once). Clocks on a cluster agree within milliseconds (NTP); 5 s
# only keeps a badly skewed node from being failed over right after an operator restart.
FIRST_SIGHT_SLACK: Final = 5.0
ZONE_LABEL: Final = LABEL_ZONE
RACK_LABEL: Final = LABEL_RACK


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """What a node's Lease says: where it listens, its failure domain, its last renewal."""

    name: NodeName
    http: str
    address: str
    zone: str | None
    rack: str | None
    renew_time: str | None
    # The sidecar is shutting down (ANNOTATION_DRAINING), or an administrator fenced the node
    # (ANNOTATION_FENCED): either way it hands its spaces over and is never chosen to lead.
    draining: bool = False


def parse_selector(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (equality only) as a dict; raises ValueError on anything else."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.replace("==", "=").partition("=")
        if not sep or not key.strip() or "!" in key:
            raise ValueError(f"--node-selector takes key=value pairs, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def parse_lease(
    item: Mapping[str, Any], selector: Mapping[str, str], release: str = ""
) -> NodeRecord | None:
    """The node a Lease describes, or None when it is not a usable node Lease. With `release`,
    a Lease labelled for another release is not ours; an unlabelled one (a sidecar from before
    the label, or run outside the chart) still is, so an upgrade never hides a node."""
    meta = item.get("metadata") or {}
    name = str(meta.get("name", ""))
    labels = meta.get("labels") or {}
    if not name.startswith(LEASE_PREFIX) or labels.get(LABEL_NODE_LEASE) != "true":
        return None
    if any(labels.get(k) != v for k, v in selector.items()):
        return None
    if release and labels.get(LABEL_RELEASE, release) != release:
        return None
    annotations = meta.get("annotations") or {}
    http, address = annotations.get(ANNOTATION_HTTP), annotations.get(ANNOTATION_REPLICATION)
    if not isinstance(http, str) or not isinstance(address, str) or not http or not address:
        return None
    renew = (item.get("spec") or {}).get("renewTime")
    return NodeRecord(
        name=NodeName(name[len(LEASE_PREFIX) :]),
        http=http,
        address=address,
        zone=labels.get(ZONE_LABEL),
        rack=labels.get(RACK_LABEL),
        renew_time=str(renew) if renew is not None else None,
        draining="true"
        in (annotations.get(ANNOTATION_DRAINING), annotations.get(ANNOTATION_FENCED)),
    )


def _fresh(renew_time: str | None, within: float) -> bool:
    """Is `renew_time` (RFC 3339) less than `within` seconds old by our wall clock? An
    unreadable time counts as fresh (see the module docstring: guessing young is safe)."""
    if not renew_time:
        return False
    try:
        when = datetime.datetime.fromisoformat(renew_time.replace("Z", "+00:00"))
    except ValueError:
        return True
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return (datetime.datetime.now(datetime.UTC) - when).total_seconds() < within


class NodeMonitor:
    """Leases, probes, heartbeats and reports of every node, shared by all space daemons."""

    def __init__(
        self,
        *,
        api: KubeApi,
        sidecars: SidecarClient,
        namespace: str,
        selector: Mapping[str, str],
        release: str = "",
        on_refresh: Callable[[], None] = lambda: None,
        timing: Timing = DEFAULT_TIMING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.sidecars = sidecars
        self.namespace = namespace
        self.selector = dict(selector)
        self.release = release
        self.on_refresh = on_refresh  # after every refresh (the ticker wakes the due spaces)
        self.timing = timing
        self.clock = clock
        self.records: dict[NodeName, NodeRecord] = {}
        self.renewed_at: dict[NodeName, float] = {}
        self.probes: dict[NodeName, ProbeResult] = {}
        self.status: dict[NodeName, dict[str, Any]] = {}
        self.store = StoreHealth(last_read_ok_at=None)
        self.placements: dict[SpaceId, Placement | None] = {}
        self.started_at = clock()
        self._seen: dict[NodeName, str | None] = {}
        self._states: dict[NodeName, str] = {}
        self._inflight: dict[tuple[str, NodeName], asyncio.Task[None]] = {}
        self._noted: dict[tuple[NodeName, SpaceId], tuple[float, dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.watch = LeaseWatch(
            api=api, namespace=namespace, selector=self._selector(), clock=clock
        )
        self.lists = 0  # Lease LISTs made by refreshes (the watch counts its own)
        self.refreshed_at: float | None = None  # the last refresh's end, while the loop runs
        self._ticked = asyncio.Event()
        self._store_error = ""
        # (node, space) -> our clock when we last sent that node a write-lease grant for that
        # space (heartbeat or primary assignment). Kept across pauses: it stays true. Until we
        # sent one, count one as sent when we started (a peer may have sent one just before).
        self.grants: dict[tuple[NodeName, SpaceId], float] = {}
        # Whether the last heartbeat to each node was answered: grants go only in a heartbeat
        # that follows an answered one (see `_heartbeat`).
        self._answered: dict[NodeName, bool] = {}
        self._marks: tuple[tuple[str, str, bool], ...] = ()
        # `known()` is asked by every space's tick and walks every placement: at 1,000 spaces
        # that was O(spaces^2) per refresh, an eighth of the operator's CPU (py-spy). Kept until
        # a placement or the set of Lease names changes.
        self._placements_version = 0
        self._known: list[NodeName] = []
        self._known_key: tuple[int, tuple[NodeName, ...]] | None = None

    # ---- life cycle: the loop runs while a space daemon is attached --------------------------

    def attach(self, space: SpaceId, placement: Placement | None) -> None:
        self.placements[space] = placement
        self._placements_version += 1
        if self._task is None or self._task.done():
            self._forget()
            self.watch.start()
            self.refreshed_at = self.clock()
            self._task = asyncio.create_task(self._run(), name="engram node monitor")

    def _forget(self) -> None:
        """Start from nothing: what a paused peer saw before its pause says nothing now."""
        self.records.clear()
        self.renewed_at.clear()
        self.probes.clear()
        self.status.clear()
        self._seen.clear()
        self._states.clear()
        self._noted.clear()
        self._answered.clear()
        self.store = StoreHealth(last_read_ok_at=None)
        self.started_at = self.clock()

    async def detach(self, space: SpaceId) -> None:
        self.placements.pop(space, None)
        self._placements_version += 1
        if self.placements or self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        self.refreshed_at = None
        await self.watch.stop()
        for t in [task, *self._inflight.values()]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._inflight.clear()

    def set_placement(self, space: SpaceId, placement: Placement | None) -> None:
        """Record where a space lives now (grants and primary load follow it at once)."""
        if space in self.placements:
            self.placements[space] = placement
            self._placements_version += 1

    async def next_tick(self, timeout: float) -> None:
        """Wait for the next refresh (or `timeout` seconds)."""
        event = self._ticked
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _run(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.refresh()
            except Exception:  # the loop must outlive one bad refresh
                log.exception("node refresh failed")
            self.refreshed_at = self.clock()
            self._mark()
            try:
                self.on_refresh()
            except Exception:
                log.exception("waking the spaces after a refresh failed")
            event, self._ticked = self._ticked, asyncio.Event()
            event.set()
            await asyncio.sleep(max(0.0, self.timing.check_interval - (self.clock() - started)))

    # ---- one refresh ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the Leases (the watch's cache, or a LIST: `_cache_will_do`), then start the
        probes and heartbeats they call for. A read slower than `store_stale_after` is given
        up: by then the verdicts would hold anyway."""
        sent = self.clock()
        if self._cache_will_do(sent):
            at = self.watch.last_event_at
            assert at is not None  # _cache_will_do checked it
            seen = [(c.item, c.seen_at) for c in self.watch.items.values()]
            self._take(seen, first_sight_at=at)
            self.store = StoreHealth(last_read_ok_at=at, last_error_at=self.store.last_error_at)
        else:
            try:
                items = await self.api.list_leases(
                    self.namespace, self._selector(), timeout=self.timing.store_stale_after
                )
            except KubeApiError as err:
                self.store = StoreHealth(
                    last_read_ok_at=self.store.last_read_ok_at, last_error_at=sent
                )
                if str(err) != self._store_error:
                    log.warning("cannot read node leases: %s", err)
                self._store_error = str(err)
                return
            self.lists += 1
            if self._store_error:
                log.info("node leases readable again")
                self._store_error = ""
            self.store = StoreHealth(last_read_ok_at=sent, last_error_at=self.store.last_error_at)
            self._take([(item, sent) for item in items], first_sight_at=sent)
        now = self.clock()
        for name, verdict in self.verdicts(now).items():
            self._note_state(verdict)
            if verdict.probe_due:
                self._spawn("probe", name, self._probe(name))
            if name in self.records:
                self._spawn("heartbeat", name, self._heartbeat(name))

    def _cache_will_do(self, now: float) -> bool:
        """May this refresh read the watch's cache instead of listing the Leases?

        Only while every node looks alive from it: the watch is current, and every known node
        renewed its Lease within QUIET. Then the verdicts are all Alive, judged as of the last
        event received, and no watch delay can hide anything they depend on. As soon as one
        node goes quiet (or its Lease is gone, or the watch lags), every refresh LISTs again,
        as before: a verdict that can fail a node over is judged only on a consistent read sent
        after its Lease expired (verdict.py), never on a watch that may lag."""
        if not self.watch.current(now, QUIET):
            return False
        known = self.known()
        if not known or any(n not in self.watch_names() for n in known):
            return False
        return all(now - self.renewed_at.get(n, -math.inf) <= QUIET for n in known)

    def watch_names(self) -> set[NodeName]:
        out: set[NodeName] = set()
        for c in self.watch.items.values():
            record = parse_lease(c.item, self.selector, self.release)
            if record is not None:
                out.add(record.name)
        return out

    def _take(self, seen: list[tuple[Mapping[str, Any], float]], *, first_sight_at: float) -> None:
        """Note the Leases read: a changed renewTime is a renewal at the time it was received
        (`seen`: each Lease with that time)."""
        for item, at in seen:
            record = parse_lease(item, self.selector, self.release)
            if record is None:
                continue
            name = record.name
            if name not in self._seen:
                if _fresh(record.renew_time, self.timing.lease_duration + FIRST_SIGHT_SLACK):
                    self.renewed_at[name] = max(at, first_sight_at) if at else first_sight_at
                log.info(
                    "node %s found: http %s, replication %s", name, record.http, record.address
                )
            elif record.renew_time != self._seen[name]:
                self.renewed_at[name] = max(at, self.renewed_at.get(name, at))
            self._seen[name] = record.renew_time
            self.records[name] = record

    def _note_state(self, verdict: Verdict) -> None:
        before = self._states.get(verdict.node)
        if before != verdict.state:
            level = logging.INFO if verdict.state == "Alive" else logging.WARNING
            log.log(level, "node %s is %s: %s", verdict.node, verdict.state, verdict.reason)
            self._states[verdict.node] = verdict.state

    def _spawn(self, kind: str, node: NodeName, coro: Coroutine[Any, Any, None]) -> None:
        key = (kind, node)
        running = self._inflight.get(key)
        if running is not None and not running.done():
            coro.close()
            return
        self._inflight[key] = asyncio.create_task(coro, name=f"{kind} {node}")

    def _record_probe(self, node: NodeName, result: ProbeResult) -> None:
        last = self.probes.get(node)
        if last is None or result.started_at >= last.started_at:
            self.probes[node] = result

    async def _probe(self, node: NodeName) -> None:
        sent = self.clock()
        record = self.records.get(node)
        # A member whose Lease we never saw has no address: nothing answers, so the probe fails.
        ok = record is not None and await self.sidecars.healthz(record.http, expect=node)
        self._record_probe(node, ProbeResult(ok=ok, started_at=sent))

    def stamp(self) -> tuple[int, float]:
        """(the monotonic ns a grant carries, our clock's reading for it). The stamp is read
        first: the sidecar measures the grant's delay from it, and our wait for the lease to run
        out must start no earlier."""
        stamp = time.monotonic_ns()
        return stamp, self.clock()

    def note_grant(self, node: NodeName, space: SpaceId, sent: float) -> None:
        """We sent `node` a write-lease grant for `space` at `sent` (it may arrive, or not)."""
        self.grants[(node, space)] = max(sent, self.grants.get((node, space), sent))

    def lease_grants(self, space: SpaceId) -> dict[NodeName, float]:
        """When we last sent each node a write-lease grant for `space` (see `self.grants`).
        After a pause (peering), the monitor's restart counts as a grant too: the peer that
        was active meanwhile may have sent one."""
        return {n: self.grants.get((n, space), self.started_at) for n in self.known()}

    async def _heartbeat(self, node: NodeName) -> None:
        record = self.records[node]
        # Grant write leases only in a heartbeat that follows an answered one. Every grant sent
        # delays a failover until it has run out (`lease_grants`), answered or not: granting on
        # and on to a node that stopped answering would hold its failover off for good.
        grant = self._answered.get(node, False)
        epochs = {
            space: int(p.epoch)
            for space, p in self.placements.items()
            if grant and p is not None and p.primary == node
        }
        stamp, sent = self.stamp()
        try:
            doc = await self.sidecars.heartbeat(
                record.http, epochs, sent_mono_ns=stamp, expect=node
            )
        except SidecarError as err:
            self._answered[node] = False
            if err.delivered:
                for space in epochs:
                    self.note_grant(node, space, sent)
            return  # keep its last report: an election needs a dead primary's last sequence
        self._answered[node] = True
        for space in epochs:
            self.note_grant(node, space, sent)
        self._record_probe(node, ProbeResult(ok=True, started_at=sent))
        # A view noted from an assignment answer after this heartbeat was sent is newer.
        spaces = dict(doc.get("spaces") or {})
        for (n, space), (at, view) in list(self._noted.items()):
            if n != node:
                continue
            if at > sent:
                spaces[space] = view
            else:
                del self._noted[(n, space)]
        self.status[node] = {**doc, "spaces": spaces}

    def note_view(self, node: NodeName, space: SpaceId, view: Mapping[str, Any]) -> None:
        """A space view a node just answered (an assignment): fresher than its last heartbeat,
        so the next tick doesn't re-send what the node has already taken."""
        self._noted[(node, space)] = (self.clock(), dict(view))
        doc = self.status.setdefault(node, {})
        doc["spaces"] = {**(doc.get("spaces") or {}), space: dict(view)}

    async def read_nodes(self) -> tuple[dict[NodeName, NodeRecord], dict[NodeName, bool]]:
        """One consistent read of the node Leases, outside the loop (a deletion's retire round):
        every node record, and whether each Lease was renewed lately by the wall clock (within
        its duration plus FIRST_SIGHT_SLACK: a node that may be alive is waited for)."""
        items = await self.api.list_leases(
            self.namespace, self._selector(), timeout=self.timing.store_stale_after * 2
        )
        records: dict[NodeName, NodeRecord] = {}
        for item in items:
            record = parse_lease(item, self.selector, self.release)
            if record is not None:
                records[record.name] = record
        within = self.timing.lease_duration + FIRST_SIGHT_SLACK
        return records, {n: _fresh(r.renew_time, within) for n, r in records.items()}

    def _selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in {LABEL_NODE_LEASE: "true", **self.selector}.items())

    # ---- what the space daemons read --------------------------------------------------------

    def known(self) -> list[NodeName]:
        """Nodes with a Lease, plus members of recorded placements whose Lease is gone."""
        key = (self._placements_version, tuple(self.records))
        if key != self._known_key:
            names = set(self.records)
            for p in self.placements.values():
                if p is not None:
                    names.update(p.members)
            self._known, self._known_key = sorted(names), key
        return list(self._known)

    def verdicts(self, now: float) -> dict[NodeName, Verdict]:
        return {
            n: judge(
                LeaseObservation(
                    node=n,
                    renewed_at=self.renewed_at.get(n),
                    duration=self.timing.lease_duration,
                    probe=self.probes.get(n),
                ),
                now=now,
                store=self.store,
                timing=self.timing,
            )
            for n in self.known()
        }

    def marks(self) -> tuple[tuple[str, str, bool], ...]:
        """(node, verdict state at the last refresh, draining) of every known node: what a
        steady space's tick is skipped on while it stays the same (kube/cadence.py). Built
        once per refresh: `known()` walks every placement, and every space asks."""
        return self._marks

    def _mark(self) -> None:
        self._marks = tuple(
            (n, self._states.get(n, ""), bool((r := self.records.get(n)) and r.draining))
            for n in self.known()
        )

    def infos(self) -> tuple[NodeInfo, ...]:
        return tuple(
            NodeInfo(name=r.name, address=r.address, zone=r.zone, rack=r.rack, draining=r.draining)
            for r in sorted(self.records.values(), key=lambda r: r.name)
        )

    def addresses(self) -> dict[str, NodeAddresses]:
        return {n: {"address": r.address, "http": r.http} for n, r in self.records.items()}

    def primary_load(self) -> dict[NodeName, int]:
        load: dict[NodeName, int] = {}
        for p in self.placements.values():
            if p is not None:
                load[p.primary] = load.get(p.primary, 0) + 1
        return load

    def unsettled(self, now: float) -> str | None:
        """Why a first placement should wait: nodes not judged yet (bounded by SETTLE_GRACE)."""
        if now - self.started_at >= SETTLE_GRACE:
            return None
        waiting = [n for n in self.records if n not in self.renewed_at and n not in self.probes]
        if not waiting and self.store.last_read_ok_at is not None:
            return None
        who = ", ".join(sorted(waiting)) or "the node leases"
        return f"waiting for {who} to be judged before placing"

    def reports(
        self, space: SpaceId, incarnation: str | None = None
    ) -> dict[NodeName, MemberReport]:
        """Each node's last report of `space`, with lag and state as its primary sees them. With
        `incarnation`, a node reporting another incarnation of the space is left out: its log
        belongs to an earlier space of that name (it is re-sent the assignment, and retires it)."""
        status: Mapping[NodeName, Mapping[str, Any]] = self.status
        if incarnation is not None:
            status = {
                n: doc
                for n, doc in status.items()
                if ((doc.get("spaces") or {}).get(space) or {}).get("incarnation")
                in (None, incarnation)
            }
        return member_reports(status, space)
