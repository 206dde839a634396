"""One hosted memory space at runtime: its log, its role, and (as primary) its replicas' progress.

As primary it owns the batch ring: entries are cut into BATCH frames once, here, and every
replica stream sends those same bytes. A batch is sealed at `batch_max_entries` or after
`batch_max_delay`, or at once when no stream has anything in flight, so light load doesn't pay
the linger. Write acknowledgements that need replica acks (`one`, `quorum`) wait here.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engram_contract.assignment import Assignment
from engram_contract.formats.batch import encode_batch
from engram_contract.formats.entry import decode_header
from engram_contract.ids import NodeName, SpaceId, space_wire_id
from engram_sidecar import assignment_store as assignment_file
from engram_sidecar import matching
from engram_sidecar.catchup import Progress
from engram_sidecar.groupcommit import GroupCommit
from engram_sidecar.lag import Lag, ReplicaState, compute_lag
from engram_sidecar.snapshot import SnapshotBuilder
from engram_sidecar.storage_health import StorageHealth
from engram_sidecar.wal import SpaceLog

log = logging.getLogger(__name__)

# Sealed frames kept for replicas to share; a replica further behind re-reads the WAL.
RING_BYTES = 64 * 1024 * 1024


@dataclass
class ReplicaProgress:
    node: NodeName
    acked: int = 0  # highest sequence the replica reported durable
    last_contact: float | None = None  # monotonic time of its last ACK
    disconnected_since: float | None = None
    state: ReplicaState = "Healthy"
    lag: Lag = field(default_factory=lambda: Lag(0, 0.0))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    catchup: Progress | None = None  # set while the replica catches up


@dataclass
class _Waiter:
    sequence: int
    needed: int
    future: asyncio.Future[None]


class NotWritable(Exception):
    """This node can't accept the write now; `reason` is for the 503/421 body."""

    def __init__(
        self, reason: str, *, status: int = 503, primary: str = "", code: str = "unavailable"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.primary = primary
        # "unavailable": refused before anything was written; "not_acknowledged": the entries
        # are in this primary's log but the ack policy was not met, so they may or may not last.
        self.code = code


class Space:
    def __init__(
        self,
        *,
        space: SpaceId,
        node: NodeName,
        wal: SpaceLog,
        commit: GroupCommit,
        batch_max_entries: int,
        batch_max_delay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = space
        self.wire_id = space_wire_id(space)
        self.node = node
        self.log = wal
        self.commit = commit
        self.batch_max_entries = batch_max_entries
        self.batch_max_delay = batch_max_delay
        self.clock = clock
        self.assignment: Assignment | None = None
        self.accepted_epoch = 0
        # Replica: the highest sequence proven identical to this assignment's primary's log
        # (log matching). Reset whenever the primary or epoch changes: what an older primary
        # shipped is vouched for again only once a batch of the new one matches it.
        self.matched_upto = 0
        # The disk's state for this space (ENOSPC, EIO...): shown in status and metrics.
        self.storage = StorageHealth()
        self.on_storage_change: Callable[[str], None] = lambda state: None
        self.snapshot_builder: SnapshotBuilder | None = None  # replica: a snapshot arriving
        # (epoch, first sequence, history) of the snapshot being built: a BEGIN with the same
        # key resumes it instead of starting over.
        self.snapshot_key: tuple[int, int, tuple[tuple[int, int], ...]] | None = None
        self.caught_up: deque[dict[str, object]] = deque(maxlen=20)  # CaughtUp records
        self.dropped_entries = 0  # divergent entries cut when this node was deposed
        self.fenced_reason: str | None = None
        self.replicas: dict[NodeName, ReplicaProgress] = {}
        self._waiters: list[_Waiter] = []
        self._ring: deque[tuple[int, int, bytes]] = deque()  # (first, last, frame)
        self._ring_bytes = 0
        self.sealed_upto = wal.last_sequence
        self._seal_timer: asyncio.TimerHandle | None = None
        self.inflight: Callable[[], bool] = lambda: False  # set by the shipper
        # Replica side: what the primary last told us about its log.
        self.primary_last_seq = 0
        self.primary_last_ts_ns = 0
        self.on_sealed: Callable[[], None] = lambda: None
        self.on_batch: Callable[[int], None] = lambda n: None
        # Write lease (design §4): until when, on this node's monotonic clock (`clock`), the
        # control plane's last grant holds. Only the control plane renews it, never replica acks.
        self.lease_seconds = 1.5
        self.lease_until = float("-inf")

    @property
    def path(self) -> Path:
        return self.log.dir

    @property
    def role(self) -> str:
        if self.assignment is None:
            return "none"
        return self.assignment.role_of(self.node)

    @property
    def applied_sequence(self) -> int:
        """What this node holds as far as its fsync policy promises: durable under `always`,
        written otherwise (with `none` nothing is ever synced, yet the entries are held)."""
        if self.commit.policy == "always":
            return self.log.durable_sequence
        return self.log.last_sequence

    @property
    def epoch(self) -> int:
        return self.accepted_epoch

    @property
    def matched_sequence(self) -> int:
        """What a replica may acknowledge: held durably (as its policy promises) *and* proven to
        be the primary's entries. A divergent tail beyond `matched_upto` is never vouched for."""
        return min(self.applied_sequence, self.matched_upto)

    def on_truncated(self, keep_upto: int) -> None:
        """The log was cut back to `keep_upto`: nothing past it is matched or sealed any more."""
        self.matched_upto = min(self.matched_upto, keep_upto)
        self.sealed_upto = min(self.sealed_upto, keep_upto)

    @property
    def storage_refusal(self) -> str | None:
        if self.storage.healthy:
            return None
        return f"{self.storage.state} on {self.node}: {self.storage.last_error}"

    def note_storage_error(self, err: BaseException) -> None:
        """A disk failure: logged once per change of state, counted, shown in status."""
        if self.storage.record(err):
            log.error("space %s: storage failed (%s): %s", self.id, self.storage.state, err)
            self.on_storage_change(self.storage.state)

    def clear_storage_error(self) -> None:
        if self.storage.clear():
            log.info("space %s: storage works again", self.id)
            self.on_storage_change("ok")

    # ---- assignment -----------------------------------------------------------------------

    def apply_assignment(self, a: Assignment) -> None:
        """Adopt `a` (already checked not stale) and persist it before acting on it."""
        assignment_file.save(self.path / "assignment.json", a, max(a.epoch, self.accepted_epoch))
        was_primary = self.role == "primary"
        old = self.assignment
        if old is None or old.epoch != a.epoch or old.primary != a.primary:
            self.matched_upto = 0
            self.lease_until = float("-inf")
        self.assignment = a
        self.accepted_epoch = max(self.accepted_epoch, a.epoch)
        if self.role == "primary":
            self.fenced_reason = None
            if not was_primary or old is None or old.epoch != a.epoch:
                # Frames carry the epoch in their header: none sealed at the old one may go out.
                self.log.begin_epoch(a.epoch)
                self.sealed_upto = self.shippable
                self._ring.clear()
                self._ring_bytes = 0
            keep = {r.node for r in a.replicas}
            for gone in set(self.replicas) - keep:
                del self.replicas[gone]
            for r in a.replicas:
                self.replicas.setdefault(r.node, ReplicaProgress(r.node))
        else:
            self.replicas.clear()
            self.fenced_reason = None
            self._fail_waiters(f"node {self.node} is no longer the primary")

    def note_epoch(self, epoch: int) -> None:
        """A peer proved a higher epoch: stop leading at once (fencing), remember the epoch."""
        if epoch <= self.accepted_epoch:
            return
        self.accepted_epoch = epoch
        if self.assignment is not None:
            assignment_file.save(self.path / "assignment.json", self.assignment, epoch)
        if self.role == "primary":
            self.fence(f"saw epoch {epoch} above this primary's {self.assignment_epoch()}")

    def assignment_epoch(self) -> int:
        return self.assignment.epoch if self.assignment else 0

    def fence(self, reason: str) -> None:
        if self.fenced_reason is None:
            log.warning("space %s: node %s stops accepting writes: %s", self.id, self.node, reason)
        self.fenced_reason = reason
        self._fail_waiters(f"fenced: {reason}")

    def grant_lease(self, since: float, seconds: float | None = None) -> None:
        """The control plane vouched for this node at `since` (this node's monotonic clock).

        `since` is when the grant arrived (a pushed heartbeat) or when the request that earned
        it was sent (a Lease renewal this node made): never later than the control plane's own
        reckoning, so the lease ends here before the control plane counts it gone.
        """
        length = self.lease_seconds if seconds is None else min(seconds, self.lease_seconds)
        self.lease_until = max(self.lease_until, since + length)

    def lease_valid(self, now: float | None = None) -> bool:
        return (self.clock() if now is None else now) < self.lease_until

    def check_writable(self) -> None:
        a = self.assignment
        if a is None:
            raise NotWritable(f"space {self.id} has no assignment on node {self.node}")
        if a.primary.node != self.node:
            raise NotWritable(
                f"node {self.node} is not the primary of space {self.id}; {a.primary.node} is",
                status=421,
                primary=a.primary.http,
            )
        if self.fenced_reason is not None:
            raise NotWritable(f"space {self.id} is fenced on {self.node}: {self.fenced_reason}")
        if a.epoch < self.accepted_epoch:
            raise NotWritable(f"space {self.id}: epoch {a.epoch} was superseded")
        if not self.lease_valid():
            raise NotWritable(
                f"space {self.id}: no write lease on {self.node}: no grant from the control "
                f"plane in the last {self.lease_seconds:.1f} s"
            )

    # ---- batching (primary) ---------------------------------------------------------------

    @property
    def shippable(self) -> int:
        """The last entry a replica may receive: a durable one when fsync is `always`.

        An entry shipped before it is durable here could outlive this log after a power loss,
        and a primary restarted at the same epoch would write a different entry at that
        (epoch, sequence), which log matching could not tell apart.
        """
        if self.commit.policy == "always":
            return self.log.durable_sequence
        return self.log.last_sequence

    def on_append(self) -> None:
        pending = self.shippable - self.sealed_upto
        if pending <= 0 or not self.replicas:
            if not self.replicas:
                self.sealed_upto = self.shippable
            return
        if pending >= self.batch_max_entries or not self.inflight():
            self.seal()
        elif self._seal_timer is None:
            loop = asyncio.get_running_loop()
            self._seal_timer = loop.call_later(self.batch_max_delay, self.seal)

    def seal(self) -> None:
        if self._seal_timer is not None:
            self._seal_timer.cancel()
            self._seal_timer = None
        while self.sealed_upto < self.shippable:
            frame, last = self.encode_from(self.sealed_upto + 1, upto=self.shippable)
            self.on_batch(last - self.sealed_upto)
            self._ring.append((self.sealed_upto + 1, last, frame))
            self._ring_bytes += len(frame)
            self.sealed_upto = last
        self._trim_ring()
        self.on_sealed()
        for r in self.replicas.values():
            r.wake.set()

    def encode_from(self, first: int, upto: int | None = None) -> tuple[bytes, int]:
        r = self.log.read(first, max_entries=self.batch_max_entries, upto=upto)
        comp = bool(self.assignment and self.assignment.compression)
        frame = encode_batch(
            space=self.wire_id,
            epoch=self.assignment_epoch(),
            prev_epoch=matching.epoch_at(self.log.history, first - 1),
            first_seq=r.first_sequence,
            last_seq=r.last_sequence,
            count=r.count,
            entries=r.data,
            compress=comp,
        )
        return frame, r.last_sequence

    def batch_at(self, first: int) -> tuple[bytes, int] | None:
        """The sealed frame starting at `first`: shared from the ring, or encoded from the WAL."""
        if first > self.sealed_upto:
            return None
        i = bisect.bisect_left(self._ring, first, key=lambda b: b[0])
        if i < len(self._ring) and self._ring[i][0] == first:
            return self._ring[i][2], self._ring[i][1]
        return self.encode_from(first, upto=self.sealed_upto)

    def _trim_ring(self) -> None:
        low = min((r.acked for r in self.replicas.values()), default=self.sealed_upto)
        while self._ring and (self._ring[0][1] <= low or self._ring_bytes > RING_BYTES):
            self._ring_bytes -= len(self._ring.popleft()[2])

    # ---- acks (primary) -------------------------------------------------------------------

    def on_ack(self, replica: NodeName, sequence: int) -> None:
        """A replica holds `sequence` durably and identical to ours (its ACK at our epoch)."""
        r = self.replicas.get(replica)
        if r is None:
            return
        r.acked = max(r.acked, min(sequence, self.log.last_sequence))
        r.last_contact = self.clock()
        r.disconnected_since = None
        r.wake.set()
        self._trim_ring()
        self._release_waiters()

    def replicas_holding(self, sequence: int) -> int:
        return sum(1 for r in self.replicas.values() if r.acked >= sequence)

    async def wait_replicated(self, sequence: int, timeout: float) -> None:
        a = self.assignment
        needed = a.replicas_needed() if a else 0
        if needed == 0 or self.replicas_holding(sequence) >= needed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(sequence, needed, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise NotWritable(
                f"space {self.id}: ackPolicy {a.ack_policy if a else '?'} needs {needed} replica "
                f"ack(s) for sequence {sequence}; {self.replicas_holding(sequence)} within "
                f"{timeout:.1f} s. The entry is in the primary's log but NOT acknowledged",
                code="not_acknowledged",
            ) from None
        finally:
            self._waiters = [w for w in self._waiters if w.future is not fut]

    def _release_waiters(self) -> None:
        for w in self._waiters:
            if not w.future.done() and self.replicas_holding(w.sequence) >= w.needed:
                w.future.set_result(None)

    def _fail_waiters(self, reason: str) -> None:
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(NotWritable(reason, code="not_acknowledged"))

    # ---- lag ------------------------------------------------------------------------------

    def timestamp_of(self, sequence: int) -> int | None:
        if sequence < self.log.first_sequence or sequence > self.log.last_sequence:
            return None
        r = self.log.read(sequence, max_entries=1)
        h = decode_header(r.data)
        return None if isinstance(h, str) else h.timestamp_ns

    def replica_lag(self, r: ReplicaProgress, now_ns: int | None = None) -> Lag:
        now_ns = time.time_ns() if now_ns is None else now_ns
        last = self.log.last_sequence
        ts = self.timestamp_of(r.acked + 1) if r.acked < last else None
        return compute_lag(
            primary_last=last, replica_acked=r.acked, oldest_missing_ts_ns=ts, now_ns=now_ns
        )

    def own_lag(self, now_ns: int | None = None) -> Lag:
        """A replica's own view: how far behind the primary's last heartbeat or batch it is."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        mine = self.applied_sequence
        if self.primary_last_seq <= mine:
            return Lag(0, 0.0)
        ts = self.primary_last_ts_ns or None
        return compute_lag(
            primary_last=self.primary_last_seq,
            replica_acked=mine,
            oldest_missing_ts_ns=ts,
            now_ns=now_ns,
        )
