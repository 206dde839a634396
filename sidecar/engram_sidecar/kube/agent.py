"""The sidecar on Kubernetes: its node Lease, its roles read back from the API, its member reports.

Three tasks, each off the data plane's path (every API call has a timeout, client.py):

* **Node Lease.** Every LEASE_RENEW_SECONDS the sidecar renews the `coordination.k8s.io/v1` Lease
  `engram-node-<node>` (a JSON merge patch; created on 404). It is the node's liveness for the
  operator and its registry entry: the annotations say where its HTTP API and replication
  listener are reached (contract.ANNOTATION_HTTP, ANNOTATION_REPLICATION).
* **Write leases.** A renewal the API server accepted is the control plane vouching for the node
  (design-notes "write lease"), dated by the wall clock when the request was *sent*: it extends
  the write lease of each space led here that holds a control-plane grant. A grant lapses 1.5 s
  after that send, before the operator (2 s after it *saw* the renewal) can judge the Lease
  expired. Renewals vouch only while continuous: each answered within MAX_RENEW_GAP of the
  previous accepted one's sending. At start-up or after a gap the operator may be moving this
  node's spaces, so vouching resumes only after `settle` (LEASE_DURATION) seconds of continuous
  renewals, from a read of the MemorySpaces (`sync`): it grants the spaces whose status still
  names this node primary at its epoch and applies any newer placement. Reads without grants
  restore the node's roles at start-up (contract.assignment_from_status) with no operator push.
* **Member reports.** As a space's primary, the sidecar patches MemorySpace status with the
  SIDECAR_STATUS_FIELDS only (design §3): at once (but at most every MIN_REPORT_GAP) when the
  epoch or a member's state changes, else at most every `status_report_interval` while progress
  or lag changes, and not at all while nothing does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from engram_contract.assignment import (
    Assignment,
    AssignmentError,
    assignment_from_status,
    bracketed,
    join_hostport,
    valid_incarnation,
)
from engram_contract.ids import METRICS_PREFIX, SpaceId, validate_space_id
from engram_contract.kubernetes import (
    API_GROUP,
    API_VERSION,
    KIND,
    LABEL_NODE_LEASE,
    LEASE_DURATION_SECONDS,
    LEASE_RENEW_SECONDS,
    PLURAL,
    MemberStatus,
    NodeAddresses,
    lease_name,
)
from engram_sidecar.errors import InvalidSpaceId
from engram_sidecar.grants import Grant
from engram_sidecar.kube.client import (
    KubeApiError,
    KubeClient,
    KubeSettings,
    addresses_from_leases,
    failure_domain,
    lease_object,
    micro_time,
)
from engram_sidecar.node import Node, StaleAssignment, incarnation_of
from engram_sidecar.space.hosted import Space

log = logging.getLogger(__name__)

MIN_REPORT_GAP: Final = LEASE_RENEW_SECONDS  # never patch one space's status more often
# Longest time from one accepted renewal's send to the next one's answer that keeps write leases
# renewing without a re-read: the rest of LEASE_DURATION is margin for clocks and the operator.
MAX_RENEW_GAP: Final = LEASE_DURATION_SECONDS - LEASE_RENEW_SECONDS
# How often MemorySpaces are read again while a led space has no write lease from the control
# plane (restored from disk) or a placement of this node lacked a member's Lease.
RESYNC_SECONDS: Final = 2.0
# How often a Node whose labels could not be read (RBAC, API down) is tried again. A Node's zone
# does not change while a pod runs on it, so one successful read is enough.
NODE_LABELS_RETRY_SECONDS: Final = 30.0


class KubeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = METRICS_PREFIX
        self.lease_renewals = Counter(
            p + "lease_renewals",
            "Node Lease renewals, by outcome (ok, created, failed).",
            ["outcome"],
            registry=registry,
        )
        self.lease_renewed = Gauge(
            p + "lease_renewed_timestamp_seconds",
            "Wall-clock time (sent) of the last node Lease renewal the API server accepted.",
            registry=registry,
        )
        self.status_reports = Counter(
            p + "status_reports",
            "MemorySpace status patches with member rows, by outcome (ok, failed).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("ok", "created", "failed"):
            self.lease_renewals.labels(outcome)
        for outcome in ("ok", "failed"):
            self.status_reports.labels(outcome)


def member_report(sp: Space, now_ns: int) -> dict[str, Any]:
    """The SIDECAR_STATUS_FIELDS of `sp`, led here, except membersReportedAt. Primary first."""
    rows: list[MemberStatus] = [
        {
            "node": sp.node,
            "role": "primary",
            "appliedSequence": sp.log.last_sequence,
            "lagEntries": 0,
            "lagSeconds": 0.0,
            "state": "Healthy",
        }
    ]
    for r in sp.replicas.values():
        lag = sp.replica_lag(r, now_ns)
        row: MemberStatus = {
            "node": r.node,
            "role": "replica",
            "appliedSequence": r.acked,
            "lagEntries": lag.entries,
            "lagSeconds": round(lag.seconds, 3),
            "state": r.state,
        }
        if r.catchup is not None:
            v = r.catchup.view()
            row["catchUp"] = {
                "phase": v["phase"],
                "reason": v["reason"],
                "entriesDone": v["entries_done"],
                "entriesTotal": v["entries_total"],
                "bytesDone": v["bytes_done"],
                "bytesTotal": v["bytes_total"],
                "rateEntriesPerSecond": v["rate_entries_per_second"],
                "etaSeconds": v["eta_seconds"],
            }
        rows.append(row)
    return {
        "members": rows,
        "maxLagEntries": max(row.get("lagEntries", 0) for row in rows),
        "maxLagSeconds": max(row.get("lagSeconds", 0.0) for row in rows),
        "membersEpoch": sp.assignment_epoch(),
    }


def _material(sp: Space) -> tuple[object, ...]:
    """What makes a report urgent: the epoch, the members and their states."""
    return (
        sp.assignment_epoch(),
        tuple((r.node, r.state, r.catchup is not None) for r in sp.replicas.values()),
    )


def _progress(sp: Space) -> tuple[int, ...]:
    return (sp.log.last_sequence, *(r.acked for r in sp.replicas.values()))


@dataclass
class _Report:
    material: tuple[object, ...] = ()
    progress: tuple[int, ...] = ()
    sent_at: float = float("-inf")
    tried_at: float = float("-inf")
    failed: bool = False


class KubeSidecar:
    def __init__(
        self,
        node: Node,
        settings: KubeSettings,
        *,
        http_address: str,
        replication_address: str,
        client: KubeClient | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        settle: float = LEASE_DURATION_SECONDS,
    ) -> None:
        self.node = node
        self.settings = settings
        self.http_address = http_address  # host:port, both published in the Lease
        self.replication_address = replication_address
        self.client = client or KubeClient(settings)
        self.wall_ns = wall_ns
        self.metrics = KubeMetrics(node.metrics.registry)
        self.synced = False  # MemorySpaces read at least once
        ns = settings.namespace
        self._leases = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
        self._lease = f"{self._leases}/{lease_name(node.name)}"
        self._spaces = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}/{PLURAL}"
        self.settle = settle
        self._last_ok: float | None = None  # monotonic send time of the last accepted renewal
        self._run_since = 0.0  # ...and of the first one of the current continuous run
        self._vouching = False  # renewals extend write leases (a settled run, status read)
        self._synced_at = float("-inf")
        self._incomplete = False  # the last read placed this node somewhere it couldn't build
        self._reports: dict[str, _Report] = {}
        # CaughtUp records already posted as Events: only newer ones are posted.
        self._events_after: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._trouble: set[str] = set()  # what is failing now: log transitions, not every try
        cfg = node.cfg
        # Failure-domain labels for the Lease: the settings now, the Node's labels once read.
        self.domain = failure_domain({}, zone=cfg.zone, rack=cfg.rack)
        self._node_read = not cfg.kube_node_name or bool(cfg.zone and cfg.rack)
        self._owner: str | None = None  # the pod's uid, once known ("": none)

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every(LEASE_RENEW_SECONDS, self.tick)),
            loop.create_task(self._every(MIN_REPORT_GAP, self.report_all)),
        ]
        if not self._node_read:
            # Off the renewal path: a slow Node read must never delay a Lease renewal.
            self._tasks.append(
                loop.create_task(self._every(NODE_LABELS_RETRY_SECONDS, self.read_node_labels))
            )
        log.info(
            "node %s: Kubernetes API %s, namespace %s, Lease %s",
            self.node.name,
            self.settings.api_url,
            self.settings.namespace,
            lease_name(self.node.name),
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.client.close()

    async def _every(self, period: float, step: Callable[[], Any]) -> None:
        while True:
            began = time.monotonic()
            try:
                await step()
            except Exception:
                log.exception("Kubernetes task %s failed", getattr(step, "__name__", step))
            await asyncio.sleep(max(0.0, began + period - time.monotonic()))

    def _problem(self, what: str, err: Exception | None) -> None:
        if err is not None and what not in self._trouble:
            self._trouble.add(what)
            log.warning("node %s: %s failed (retrying quietly): %s", self.node.name, what, err)
        elif err is None and what in self._trouble:
            self._trouble.discard(what)
            log.info("node %s: %s works again", self.node.name, what)

    # ---- node Lease and write leases ------------------------------------------------------

    async def tick(self) -> None:
        # The write lease runs from when the renewal was sent, on the node's monotonic clock:
        # the operator counts the Lease from no earlier, so no wall clock needs to agree.
        sent_ns, sent = self.wall_ns(), self.node.clock()
        if not await self.renew(sent_ns):
            if not self.synced:
                await self.sync(None)  # roles at start-up even when the Lease can't be written
            return
        now = self.node.clock()
        if self._last_ok is None or now - self._last_ok > MAX_RENEW_GAP:
            # Start-up or a gap: the operator may have judged the Lease expired and be moving
            # this node's spaces. Vouch again only from a status read made once any such
            # decision must be on record: after `settle` seconds of continuous renewals.
            self._run_since, self._vouching = sent, False
        self._last_ok = sent
        if not self._vouching:
            if now - self._run_since >= self.settle:
                self._vouching = await self.sync(sent)
            elif not self.synced:
                await self.sync(None)
            return
        led = [sp for sp in self.node.spaces.values() if sp.role == "primary"]
        held: dict[str, int] = {
            sp.id: sp.assignment_epoch() for sp in led if sp.lease_valid(self.node.clock())
        }
        self.node.grant_leases(Grant(sent_by_us=sent), held)
        # Led spaces nobody vouched for (restored from disk), members without a Lease: re-read.
        pending = len(held) < len(led) or self._incomplete
        if pending and now - self._synced_at >= RESYNC_SECONDS:
            await self.sync(sent)

    async def read_node_labels(self) -> None:
        """Copy the zone and rack of the Kubernetes Node this pod runs on (`kube_node_name`)
        into `domain`, once; a failed read is retried every NODE_LABELS_RETRY_SECONDS."""
        if self._node_read:
            return
        name = self.node.cfg.kube_node_name
        try:
            doc = await self.client.request("GET", f"/api/v1/nodes/{name}")
        except KubeApiError as err:
            self._problem(f"reading the labels of Kubernetes Node {name} (zone, rack)", err)
            return
        self._problem(f"reading the labels of Kubernetes Node {name} (zone, rack)", None)
        labels = (doc.get("metadata") or {}).get("labels") or {} if isinstance(doc, dict) else {}
        cfg = self.node.cfg
        self.domain = failure_domain(labels, zone=cfg.zone, rack=cfg.rack)
        self._node_read = True
        log.info(
            "node %s runs on Kubernetes Node %s: %s",
            self.node.name,
            name,
            ", ".join(f"{k}={v}" for k, v in sorted(self.domain.items())) or "no zone or rack",
        )

    async def owner(self) -> str:
        """The uid of this node's pod (kube_pod_uid, else, in a pod, read once from the pod,
        named as the node); "" when there is none (not in a pod, or not allowed: no owner, and
        the Lease stays after the pod is gone)."""
        if self._owner is None:
            uid = self.settings.pod_uid
            if not uid and self.settings.read_pod:
                path = f"/api/v1/namespaces/{self.settings.namespace}/pods/{self.node.name}"
                try:
                    doc = await self.client.request("GET", path)
                except KubeApiError as err:
                    if err.status == 0:
                        return ""  # no answer: ask again at the next renewal
                    log.info(
                        "node %s: its Lease has no owner (cannot read pod %s: %s); set"
                        " kube_pod_uid so that it goes with the pod",
                        self.node.name,
                        self.node.name,
                        err,
                    )
                    doc = {}
                meta = doc.get("metadata") if isinstance(doc, dict) else None
                found = (meta or {}).get("uid") if isinstance(meta, dict) else None
                uid = found if isinstance(found, str) else ""
            self._owner = uid
        return self._owner

    async def renew(self, sent_ns: int) -> bool:
        owner = await self.owner()
        body = lease_object(
            self.node.name,
            self.settings.namespace,
            http=self.http_address,
            replication=self.replication_address,
            renew_ns=sent_ns,
            draining=self.node.draining,
            domain=self.domain,
            release=self.node.cfg.kube_release,
            owner_uid=owner,
        )
        outcome = "ok"
        try:
            try:
                await self.client.request("PATCH", self._lease, body=body)
            except KubeApiError as err:
                if err.status != 404:
                    raise
                created = {
                    **body,
                    "spec": {**body["spec"], "acquireTime": body["spec"]["renewTime"]},
                }
                try:
                    await self.client.request("POST", self._leases, body=created)
                    outcome = "created"
                except KubeApiError as err2:
                    if err2.status != 409:
                        raise
                    # Created meanwhile (a previous incarnation's late request): patch it.
                    await self.client.request("PATCH", self._lease, body=body)
        except KubeApiError as err:
            self.metrics.lease_renewals.labels("failed").inc()
            self._problem("node Lease renewal", err)
            return False
        self.metrics.lease_renewals.labels(outcome).inc()
        self.metrics.lease_renewed.set(sent_ns / 1e9)
        self._problem("node Lease renewal", None)
        return True

    async def sync(self, grant_at: float | None) -> bool:
        """Apply the placements MemorySpace status gives this node; grant write leases (from
        `grant_at`, the monotonic send time of the renewal that earned them) to the spaces whose
        status names this node primary at its epoch. Retires the spaces whose MemorySpace is gone
        (`_retire_orphans`)."""
        # Taken before the read: only a space hosted before it can be judged by its answer.
        before = {sid: inc for sid, sp in self.node.spaces.items() if (inc := incarnation_of(sp))}
        try:
            leases = await self.client.list(self._leases, label_selector=f"{LABEL_NODE_LEASE}=true")
            spaces = await self.client.list(self._spaces)
        except KubeApiError as err:
            self._problem("reading MemorySpaces", err)
            return False
        self._problem("reading MemorySpaces", None)
        self.synced, self._synced_at = True, time.monotonic()
        addresses = addresses_from_leases(leases)
        addresses[self.node.name] = {"address": self.replication_address, "http": self.http_address}
        vouched: dict[str, int] = {}
        self._incomplete = False
        for obj in spaces:
            status, spec = obj.get("status") or {}, obj.get("spec") or {}
            meta = obj.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                continue  # being retired by the operator (its finalizer): no role to take up
            uid = meta.get("uid")
            life = uid if isinstance(uid, str) and valid_incarnation(uid) else None
            sp = await self._apply(meta.get("name", ""), status, spec, addresses, life)
            if (
                sp is not None
                and incarnation_of(sp) in (None, life)
                and sp.role == "primary"
                and status.get("primary") == self.node.name
                and status.get("epoch") == sp.assignment_epoch()
            ):
                vouched[sp.id] = sp.assignment_epoch()
        if grant_at is not None and vouched:
            self.node.grant_leases(Grant(sent_by_us=grant_at), vouched)
        await self._retire_orphans(before, spaces)
        return True

    async def _retire_orphans(
        self, before: Mapping[SpaceId, str], objects: list[dict[str, Any]]
    ) -> None:
        """A space hosted here for a MemorySpace (name and uid) that no longer exists was
        deleted while this node was away from its operator's retire round: retire it, keeping
        its files (the object, and its deletionPolicy, are gone). Only spaces hosted before the
        read was sent: the read is consistent, so their object, if it still existed, is in it;
        a space assigned after it was sent may be newer than the answer."""
        alive = {
            (str(meta.get("name", "")), meta.get("uid"))
            for meta in ((o.get("metadata") or {}) for o in objects)
        }
        for sid, inc in before.items():
            sp = self.node.spaces.get(sid)
            if sp is None or incarnation_of(sp) != inc or (sid, inc) in alive:
                continue
            log.warning(
                "space %s: its MemorySpace (uid %s) is gone; retiring it here (files kept)",
                sid,
                inc,
            )
            try:
                await self.node.retire(sid, incarnation=inc, delete=False)
            except (StaleAssignment, OSError) as err:
                self._problem(f"retiring space {sid}", err)

    async def _apply(
        self,
        name: str,
        status: Mapping[str, Any],
        spec: Mapping[str, Any],
        addresses: Mapping[str, NodeAddresses],
        incarnation: str | None,
    ) -> Space | None:
        try:
            sid = validate_space_id(name)
        except InvalidSpaceId:
            return None
        here = self.node.spaces.get(sid)
        replicas = status.get("replicas")
        placed = status.get("primary") == self.node.name or (
            isinstance(replicas, list) and self.node.name in replicas
        )
        if not placed and (here is None or here.assignment is None):
            return None
        doc = assignment_from_status(status, spec, addresses, incarnation=incarnation)
        if doc is None:
            # No placement yet, or a member's Lease is missing: retried, and the operator pushes.
            self._incomplete = self._incomplete or (placed and bool(status.get("primary")))
            return here
        try:
            changed, sp = await self.node.accept(sid, Assignment.from_json(doc))
        except (AssignmentError, StaleAssignment) as err:
            log.debug("space %s: MemorySpace status not applied: %s", sid, err)
            return here
        if changed:
            log.info(
                "space %s: %s at epoch %d, from MemorySpace status",
                sid,
                sp.role,
                sp.assignment_epoch(),
            )
        return sp

    # ---- member reports -------------------------------------------------------------------

    async def report_all(self) -> None:
        led = {
            sid: sp
            for sid, sp in self.node.spaces.items()
            if sp.role == "primary" and sp.fenced_reason is None and sp.lease_valid()
        }
        for sid in set(self._reports) - set(led):
            del self._reports[sid]
        interval = self.node.cfg.status_report_interval
        for sid, sp in led.items():
            if sp.role != "primary" or sp.fenced_reason is not None:
                continue  # changed while an earlier report was on its way
            rep = self._reports.setdefault(sid, _Report())
            now = time.monotonic()
            if now - rep.tried_at < (interval if rep.failed else MIN_REPORT_GAP):
                continue
            material, progress = _material(sp), _progress(sp)
            lagging = any(r.acked < sp.log.last_sequence for r in sp.replicas.values())
            urgent = material != rep.material
            if not urgent and (
                (progress == rep.progress and not lagging) or now - rep.sent_at < interval
            ):
                continue
            rep.tried_at = now
            await self.post_caught_up(sp)
            if await self.report(sp):
                rep.material, rep.progress, rep.sent_at, rep.failed = material, progress, now, False
            else:
                rep.failed = True

    async def post_caught_up(self, sp: Space) -> None:
        """A ReplicaCaughtUp Event on the MemorySpace for each catch-up finished since last time."""
        done = [r for r in sp.caught_up if int(str(r["at_ns"])) > self._events_after.get(sp.id, 0)]
        for rec in done:
            at = micro_time(int(str(rec["at_ns"])))
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{sp.id}.", "namespace": self.settings.namespace},
                "involvedObject": {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": KIND,
                    "name": sp.id,
                    "namespace": self.settings.namespace,
                },
                "reason": "ReplicaCaughtUp",
                "message": (
                    f"replica {rec['replica']} caught up by {rec['path']}: {rec['entries']} "
                    f"entries, {rec['bytes']} bytes in {rec['seconds']} s ({rec['reason']})"
                ),
                "type": "Normal",
                "firstTimestamp": at.split(".")[0] + "Z",
                "lastTimestamp": at.split(".")[0] + "Z",
                "count": 1,
                "source": {"component": "engram-sidecar", "host": self.node.name},
            }
            try:
                await self.client.request(
                    "POST", f"/api/v1/namespaces/{self.settings.namespace}/events", body=event
                )
            except KubeApiError as err:
                self._problem(f"ReplicaCaughtUp event for space {sp.id}", err)
                return
            self._events_after[sp.id] = int(str(rec["at_ns"]))

    async def report(self, sp: Space) -> bool:
        now_ns = self.wall_ns()
        status = member_report(sp, now_ns)
        status["membersReportedAt"] = micro_time(now_ns)
        try:
            await self.client.request(
                "PATCH", f"{self._spaces}/{sp.id}/status", body={"status": status}
            )
        except KubeApiError as err:
            self.metrics.status_reports.labels("failed").inc()
            self._problem(f"status report of space {sp.id}", err)
            return False
        self.metrics.status_reports.labels("ok").inc()
        self._problem(f"status report of space {sp.id}", None)
        return True


def advertised_addresses(node: Node, http_port: int) -> tuple[str, str]:
    """(HTTP, replication) host:port as published in the Lease, with the ports actually bound."""
    cfg = node.cfg
    # Bracketed when IPv6: on an IPv6 pod `$(POD_IP):8080` expands to `fd00::5:8080`, and peers
    # and the operator build URLs and dial from what the Lease says.
    http = bracketed(cfg.advertise_http_address or join_hostport(cfg.http_host, http_port))
    repl = bracketed(
        cfg.advertise_address or join_hostport(cfg.replication_host, node.replication_port)
    )
    for what, addr in (("advertise_http_address", http), ("advertise_address", repl)):
        if addr.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", ""):
            log.warning(
                "node %s: publishing %s in its Lease, which peers can't dial; set %s "
                "(e.g. to the pod IP)",
                node.name,
                addr,
                what,
            )
    return http, repl
