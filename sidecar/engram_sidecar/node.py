"""The node process: hosts spaces, runs the replication listener, peer links and the lag monitor.

`Node` is the one object the HTTP API talks to. It owns which spaces exist here, applies
assignments (refusing stale epochs), routes writes to a space's log with the ack policy, and keeps
one `PeerLink` per peer this node ships to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from engram_contract.assignment import Assignment
from engram_contract.ids import NodeName, SpaceId, validate_space_id
from engram_sidecar import assignment_store as assignment_file
from engram_sidecar import snapshot
from engram_sidecar.catchup import TokenBucket
from engram_sidecar.config import SidecarConfig
from engram_sidecar.errors import EngramError, WalError
from engram_sidecar.grants import GrantClock
from engram_sidecar.groupcommit import GroupCommit
from engram_sidecar.lag import LagThresholds, classify, transition_message
from engram_sidecar.matching import epoch_at
from engram_sidecar.metrics import STATE_VALUES, Metrics
from engram_sidecar.receiver import Receiver
from engram_sidecar.shipper import PeerLink
from engram_sidecar.space import NotWritable, Space
from engram_sidecar.stream import CHUNK_BYTES
from engram_sidecar.wal import FsyncPolicy, WalStore

log = logging.getLogger(__name__)


# A grant that arrived later than this beyond the fastest recent one is refused (design-notes
# "Write lease": the one timing assumption, the control plane's bound on message delay).
MAX_GRANT_DELAY_NS = 500_000_000


@dataclass(frozen=True, slots=True)
class Grant:
    """Who vouched and when: the control plane's id and monotonic send time (pushed grants), or
    this node's own monotonic send time of the request that earned it (`sent_by_us`)."""

    source: str = ""
    sent_ns: int = 0
    sent_by_us: float | None = None
    # The lease the control plane grants, in seconds: the node keeps the shorter of it and its
    # own `write_lease_seconds`, so the control plane's wait can't be shorter than the lease.
    seconds: float | None = None


class StaleAssignment(Exception):
    pass


class Node:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.name = NodeName(cfg.node)
        self.clock = clock
        self.metrics = Metrics(registry or CollectorRegistry())
        self.secret = cfg.secret()
        self.store = WalStore(
            cfg.data_dir,
            segment_bytes=cfg.segment_bytes,
            on_torn_tail=lambda s, n: self.metrics.torn_tail_bytes.labels(s).inc(n),
        )
        self.spaces: dict[SpaceId, Space] = {}
        self._by_wire: dict[bytes, Space] = {}
        self.links: dict[NodeName, PeerLink] = {}
        self.receiver = Receiver(
            cfg=cfg,
            node=self.name,
            secret=self.secret,
            metrics=self.metrics,
            lookup=self._by_wire.get,
            install_snapshot=self.install_snapshot,
        )
        # One catch-up budget for the whole node, shared by every catching-up stream.
        self.bucket = TokenBucket(
            rate=float(cfg.catchup_bytes_per_second),
            burst=float(max(CHUNK_BYTES, cfg.catchup_bytes_per_second // 10)),
            clock=clock,
        )
        self.grant_clock = GrantClock(MAX_GRANT_DELAY_NS)
        self.replication_port = 0
        self._monitor: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self.started_at = time.time()

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for sid in self.store.spaces_on_disk():
            saved = assignment_file.load(self.cfg.data_dir / sid / "assignment.json")
            if saved is not None:
                a, accepted = saved
                space = self._space(sid)
                space.accepted_epoch = accepted
                self._adopt(space, a)
        self.replication_port = await self.receiver.start(
            self.cfg.replication_host, self.cfg.replication_port
        )
        self._monitor = asyncio.get_running_loop().create_task(self._lag_monitor())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for link in self.links.values():
            await link.stop()
        await self.receiver.stop()
        for sp in self.spaces.values():
            await sp.commit.stop()
        self.store.close()

    # ---- spaces and assignments -----------------------------------------------------------

    def _space(self, sid: SpaceId) -> Space:
        sp = self.spaces.get(sid)
        if sp is None:
            snapshot.recover(self.cfg.data_dir / sid)
            wal = self.store.open(sid)
            policy: FsyncPolicy = self.cfg.fsync  # type: ignore[assignment]
            commit = GroupCommit(wal, policy=policy, interval=self.cfg.fsync_interval)
            commit.start()
            sp = Space(
                space=sid,
                node=self.name,
                wal=wal,
                commit=commit,
                batch_max_entries=self.cfg.batch_max_entries,
                batch_max_delay=self.cfg.batch_max_delay,
                clock=self.clock,
            )
            sp.lease_seconds = self.cfg.write_lease_seconds
            sp.on_storage_change = self._storage_metric(sid)
            self.metrics.storage_ok(sid)
            self.spaces[sid] = sp
            self._by_wire[sp.wire_id] = sp
        return sp

    def _storage_metric(self, sid: SpaceId) -> Callable[[str], None]:
        def update(state: str) -> None:
            if state == "ok":
                self.metrics.storage_ok(sid)
            else:
                self.metrics.storage_failed(sid, state)

        return update

    def assign(
        self, space: str, a: Assignment, *, grant: Grant | None = None
    ) -> tuple[bool, Space]:
        """Apply an assignment. Returns (changed, space). Raises StaleAssignment on old epochs.

        `grant`: the control plane pushed it with its send stamp, so it also vouches for the
        primary's write lease. An assignment read back (from the Kubernetes API or from disk)
        carries none and vouches for nothing.
        """
        sid = validate_space_id(space)
        sp = self.spaces.get(sid)
        if sp is not None and a.epoch < sp.accepted_epoch:
            raise StaleAssignment(
                f"assignment epoch {a.epoch} is older than epoch {sp.accepted_epoch} "
                f"already accepted for space {sid}"
            )
        if sp is not None and sp.assignment == a:
            return False, sp
        if (
            sp is not None
            and sp.assignment is not None
            and a.epoch == sp.assignment.epoch
            and a.primary != sp.assignment.primary
        ):
            raise StaleAssignment(
                f"epoch {a.epoch} already names {sp.assignment.primary.node} as primary of "
                f"{sid}; a new primary needs a new epoch"
            )
        sp = self._space(sid)
        self._adopt(sp, a)
        if sp.role == "primary" and grant is not None:
            # The control plane just vouched for this node. An assignment reloaded from disk at
            # start-up does not: a restarted primary waits for a heartbeat.
            self.grant_leases(grant, {sid: a.epoch})
        return True, sp

    def _adopt(self, sp: Space, a: Assignment) -> None:
        old = sp.assignment
        sp.apply_assignment(a)
        self.metrics.epoch.labels(sp.id).set(sp.accepted_epoch)
        self.metrics.role.labels(sp.id).set(1 if sp.role == "primary" else 0)
        self.metrics.last_sequence.labels(sp.id).set(sp.log.last_sequence)
        for lk in self.links.values():
            lk.remove(sp)
        if old is not None:
            for r in old.replicas:
                if sp.role != "primary" or r.node not in sp.replicas:
                    self.metrics.forget_replica(sp.id, r.node)
        if sp.role == "none":
            # No longer a member: keep the files (an operator may want them), drop the series.
            self.metrics.forget_space(sp.id, [r.node for r in old.replicas] if old else [])
        elif sp.role != "primary":
            self.metrics.forget_primary(sp.id)
        sp.inflight = lambda: False
        sp.on_batch = self.metrics.batch_entries.labels(sp.id).observe
        if sp.role == "primary":
            for r in a.replicas:
                found = self.links.get(r.node)
                if found is not None and found.address == r.address:
                    link = found
                else:
                    if found is not None:
                        self._retire(found)
                    link = PeerLink(
                        cfg=self.cfg,
                        node=self.name,
                        peer=r.node,
                        address=r.address,
                        secret=self.secret,
                        metrics=self.metrics,
                        bucket=self.bucket,
                        clock=self.clock,
                    )
                    self.links[r.node] = link
                    link.start()
                    # The peer moved: every other space shipping to it follows the new address,
                    # or its stream would die with the retired link.
                    for other in self.spaces.values():
                        if other is not sp and other.role == "primary" and r.node in other.replicas:
                            link.add(other)
                link.add(sp)
            sp.on_sealed = self._wake_links
        self._retire_idle_links()

    def _retire(self, link: PeerLink) -> None:
        task = asyncio.get_running_loop().create_task(link.stop())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def _retire_idle_links(self) -> None:
        """Stop links no space ships over any more, and drop their per-peer series."""
        for name, link in list(self.links.items()):
            if not link.streams:
                del self.links[name]
                self._retire(link)
                self.metrics.forget_peer(name)

    def _wake_links(self) -> None:
        for link in self.links.values():
            link.wake()

    def grant_leases(self, grant: Grant, epochs: dict[str, int]) -> dict[str, bool]:
        """A control-plane grant: renew the write lease of each space led here at `epoch`.

        A pushed grant runs from its arrival, unless `GrantClock` can tell it arrived late (it
        sat in a queue while this process was stopped or overloaded, and the control plane may
        have acted on our silence since): then it is refused. A grant earned by a request this
        node sent itself (a Lease renewal) runs from that request's send time.
        """
        out = {}
        since = self.clock() if grant.sent_by_us is None else grant.sent_by_us
        late = False
        if grant.sent_by_us is None:
            arrived = int(since * 1e9)
            lateness = self.grant_clock.lateness_ns(grant.source, grant.sent_ns, arrived)
            late = lateness > self.grant_clock.max_delay_ns
            if late:
                self.metrics.late_grants.inc()
                log.warning("refused a write-lease grant that arrived %.2f s late", lateness / 1e9)
        for sid, epoch in epochs.items():
            sp = self.lookup(sid)
            ok = (
                not late
                and sp is not None
                and sp.role == "primary"
                and sp.assignment_epoch() == epoch
                and sp.accepted_epoch == epoch
            )
            if ok and sp is not None:
                sp.grant_lease(since, grant.seconds)
            out[sid] = ok
        return out

    def lookup(self, space: str) -> Space | None:
        try:
            return self.spaces.get(validate_space_id(space))
        except ValueError:
            return None

    # ---- writes ---------------------------------------------------------------------------

    async def write(self, sp: Space, records: list[tuple[int, bytes]]) -> tuple[int, int, int]:
        t0 = time.perf_counter()
        sp.check_writable()
        a = sp.assignment
        epoch = sp.accepted_epoch
        try:
            first, last = sp.log.append(records, epoch=epoch)
            sp.on_append()
            self.metrics.last_sequence.labels(sp.id).set(last)
            if sp.commit.policy == "always":
                await sp.commit.wait_durable(last)
                sp.on_append()  # durable now, so shippable
        except EngramError as err:
            sp.note_storage_error(err)
            raise
        sp.clear_storage_error()
        await sp.wait_replicated(last, self.cfg.ack_timeout)
        # Ack only what is still true: the waits above took time, in which this node may have
        # been deposed, fenced, or lost its lease. Any of those and the write may not last.
        try:
            sp.check_writable()
            if sp.assignment is not a or sp.accepted_epoch != epoch:
                raise NotWritable(f"space {sp.id}: the assignment changed during the write")
        except NotWritable as err:
            raise NotWritable(
                f"{err.reason}; the entries {first}..{last} are in this node's log but NOT "
                "acknowledged",
                code="not_acknowledged",
            ) from None
        self.metrics.entries_written.labels(sp.id).inc(len(records))
        self.metrics.write_latency.labels(sp.id).observe(time.perf_counter() - t0)
        return first, last, epoch

    # ---- lag ------------------------------------------------------------------------------

    def install_snapshot(self, sp: Space) -> None:
        """Swap a finished snapshot in for `sp`'s log and reopen it (replica side)."""
        self.store.forget(sp.id)
        snapshot.install(sp.path)
        wal = self.store.open(sp.id)
        old_commit = sp.commit
        policy: FsyncPolicy = self.cfg.fsync  # type: ignore[assignment]
        sp.commit = GroupCommit(wal, policy=policy, interval=self.cfg.fsync_interval)
        sp.commit.start()
        sp.log = wal
        sp.sealed_upto = wal.last_sequence
        sp.matched_upto = wal.last_sequence  # the snapshot is the primary's own log
        self._retired.add(asyncio.get_running_loop().create_task(old_commit.stop()))
        log.info(
            "space %s: installed a snapshot; log now %d..%d",
            sp.id,
            wal.first_sequence,
            wal.last_sequence,
        )

    def apply_retention(self, sp: Space) -> None:
        """Delete sealed segments no member needs, within a floor and a ceiling (issue 6).

        Keeps every entry a replica still lacks, and at least `retention_min_entries`; but past
        `retention_max_bytes` a gone replica stops pinning the disk: segments are released and
        that replica will need a snapshot.
        """
        wal = sp.log
        keep_from = wal.last_sequence - self.cfg.retention_min_entries + 1
        if sp.role == "primary" and sp.replicas:
            keep_from = min(keep_from, min(r.acked for r in sp.replicas.values()) + 1)
        forced = False
        if wal.size_bytes > self.cfg.retention_max_bytes:
            # Release the oldest sealed segments until the log fits under the ceiling.
            size, cut = wal.size_bytes, keep_from
            for seg in wal.segments[:-1]:
                if size <= self.cfg.retention_max_bytes:
                    break
                size -= seg.size
                cut = max(cut, seg.last_sequence + 1)
            forced = cut > keep_from
            keep_from = cut
        freed = wal.delete_before(keep_from) if keep_from > wal.first_sequence else 0
        if freed:
            self.metrics.retention_released.labels(sp.id).inc(freed)
            if forced:
                self.metrics.retention_forced.labels(sp.id).inc()
                log.warning(
                    "space %s: released %d bytes past retention_max_bytes; replicas "
                    "behind sequence %d will need a snapshot",
                    sp.id,
                    freed,
                    keep_from,
                )

    def evaluate_lag(self) -> None:
        th = LagThresholds(
            self.cfg.lag_warning_seconds,
            self.cfg.lag_critical_seconds,
            self.cfg.failed_after_seconds,
        )
        now = self.clock()
        now_ns = time.time_ns()
        for sp in self.spaces.values():
            if sp.role == "none":
                continue
            try:
                self.apply_retention(sp)
            except WalError as err:
                log.error("space %s: retention failed: %s", sp.id, err)
            self.metrics.last_sequence.labels(sp.id).set(sp.log.last_sequence)
            self.metrics.wal_bytes.labels(sp.id).set(sp.log.size_bytes)
            if sp.role != "primary":
                continue
            self.metrics.write_lease_valid.labels(sp.id).set(int(sp.lease_valid()))
            for r in sp.replicas.values():
                link = self.links.get(r.node)
                r.lag = sp.replica_lag(r, now_ns)
                away = None if r.disconnected_since is None else now - r.disconnected_since
                new = classify(
                    r.lag,
                    thresholds=th,
                    breaker_open=bool(link and link.breaker.is_open),
                    unreachable_for=away,
                    catching_up=r.catchup is not None,
                )
                remaining = 0
                if r.catchup is not None:
                    remaining = r.catchup.total_entries - r.catchup.done_entries
                self.metrics.catchup_remaining.labels(sp.id, r.node).set(remaining)
                if new != r.state:
                    log.warning(transition_message(sp.id, r.node, r.state, new, r.lag))
                    r.state = new
                self.metrics.lag_entries.labels(sp.id, r.node).set(r.lag.entries)
                self.metrics.lag_seconds.labels(sp.id, r.node).set(r.lag.seconds)
                self.metrics.replica_state.labels(sp.id, r.node).set(STATE_VALUES[new])

    async def _lag_monitor(self) -> None:
        while True:
            try:
                self.evaluate_lag()
            except Exception:
                log.exception("lag monitor tick failed")
            await asyncio.sleep(self.cfg.lag_monitor_interval)

    # ---- views ----------------------------------------------------------------------------

    def space_view(self, sp: Space) -> dict[str, Any]:
        a = sp.assignment
        view: dict[str, Any] = {
            "space": sp.id,
            "role": sp.role,
            # The epoch of this node's role claim; accepted_epoch may be higher once fenced.
            "epoch": a.epoch if a else 0,
            "accepted_epoch": sp.accepted_epoch,
            "first_sequence": sp.log.first_sequence,
            "last_sequence": sp.log.last_sequence,
            "applied_sequence": sp.applied_sequence,
            # The epoch of the entry at applied_sequence: with it, the control plane ranks
            # candidates by (last_epoch, applied_sequence), never by sequence alone.
            "last_epoch": epoch_at(sp.log.history, sp.applied_sequence),
            "matched_sequence": sp.matched_sequence if sp.role == "replica" else None,
            "storage": sp.storage.view(),
            "ack_policy": a.ack_policy if a else None,
            "primary": a.primary.node if a else None,
            "fenced": sp.fenced_reason,
            "dropped_entries": sp.dropped_entries,
            "write_lease": sp.lease_valid() if sp.role == "primary" else None,
            "wal_bytes": sp.log.size_bytes,
        }
        if sp.role == "primary":
            now_ns = time.time_ns()
            reps = {}
            for r in sp.replicas.values():
                lag = sp.replica_lag(r, now_ns)
                link = self.links.get(r.node)
                reps[r.node] = {
                    "acked_sequence": r.acked,
                    "lag_entries": lag.entries,
                    "lag_seconds": round(lag.seconds, 3),
                    "state": r.state,
                    "connected": bool(link and link.connected),
                    "last_error": link.last_error if link and not link.connected else "",
                    "catch_up": r.catchup.view() if r.catchup is not None else None,
                }
            view["replicas"] = reps
            view["caught_up"] = list(sp.caught_up)
        elif sp.role == "replica":
            lag = sp.own_lag()
            view["primary_last_sequence"] = sp.primary_last_seq
            view["lag_entries"] = lag.entries
        return view

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "pid": os.getpid(),
            "replication_address": self.cfg.address,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "spaces": {sid: self.space_view(sp) for sid, sp in sorted(self.spaces.items())},
        }
