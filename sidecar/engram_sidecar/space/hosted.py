"""One hosted memory space at runtime: its parts, and the few operations that span them.

A `Space` is its membership (role, epochs, fencing, write lease), its writer (the one write
path), its batch ring (as primary), its replicas' progress and the writes waiting on their acks.
It writes for the primary (`write`: check, append, settle, wait for acks, check again) and for
the replica (`apply`, `cut`, `settle`) through the same writer, and keeps the parts in step when
the assignment or the epoch changes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from engram_contract.assignment import Assignment
from engram_contract.formats.entry import CheckedRun, Record
from engram_contract.ids import NodeName, SpaceId, space_wire_id
from engram_sidecar.log import truncations
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.snapshot import SnapshotBuilder
from engram_sidecar.log.storage_health import StorageHealth
from engram_sidecar.log.wal import SpaceLog
from engram_sidecar.space import lag
from engram_sidecar.space.membership import Membership, NotWritable
from engram_sidecar.space.replicas import ReplicaProgress
from engram_sidecar.space.ring import BatchRing
from engram_sidecar.space.waiters import AckWaiters
from engram_sidecar.space.writer import SpaceWriter, Written


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
        self.clock = clock
        self.membership = Membership(
            space=space, node=node, path=wal.dir / "assignment.json", clock=clock
        )
        self.writer = SpaceWriter(wal, commit, space=space, node=node)
        self.replicas: dict[NodeName, ReplicaProgress] = {}
        # The node's batch settings, which an assignment's tuning (the space's spec) overrides.
        self._batch_defaults = (batch_max_entries, batch_max_delay)
        self.ring = BatchRing(
            wal,
            wire_id=self.wire_id,
            batch_max_entries=batch_max_entries,
            batch_max_delay=batch_max_delay,
            low_water=self._low_water,
        )
        self.waiters = AckWaiters(self.replicas_holding)
        # Replica: the highest sequence proven identical to this assignment's primary's log
        # (log matching). Reset whenever the primary or epoch changes: what an older primary
        # shipped is vouched for again only once a batch of the new one matches it.
        self.matched_upto = 0
        # Replica: what the primary last told us about its log (`primary_last_seq`), and when
        # it last did under the current assignment (None: not yet; /readyz waits for it).
        self._primary_last_seq = 0
        self.primary_heard_at: float | None = None
        self.primary_last_ts_ns = 0
        self.snapshot_builder: SnapshotBuilder | None = None  # replica: a snapshot arriving
        # Replica: a finished snapshot is replacing the log's files (in a worker thread); the
        # old log is closed and the new one not yet open, so frames wait their turn (NACK).
        self.installing_snapshot = False
        # (epoch, first sequence, history) of the snapshot being built: a BEGIN with the same
        # key resumes it instead of starting over.
        self.snapshot_key: tuple[int, int, tuple[tuple[int, int], ...]] | None = None
        self.caught_up: deque[dict[str, object]] = deque(maxlen=20)  # CaughtUp records
        self.dropped_entries = 0  # divergent entries cut when this node was deposed
        # (after, dropped, epoch): what the snapshot being installed discards of this log, to
        # record as the new log is adopted (`replace_log`).
        self.discard_on_install: tuple[int, int, int] | None = None
        self.truncations = truncations.load(self.path)  # the same cuts, kept across restarts
        # A write appended entries up to this sequence (the node keeps a gauge of it).
        self.on_appended: Callable[[int], None] = lambda last: None

    # ---- the parts' facts, as everyone reads them -----------------------------------------

    @property
    def log(self) -> SpaceLog:
        return self.writer.log

    @property
    def path(self) -> Path:
        return self.log.dir

    @property
    def storage(self) -> StorageHealth:
        return self.writer.storage

    @property
    def assignment(self) -> Assignment | None:
        return self.membership.assignment

    @property
    def role(self) -> str:
        return self.membership.role

    @property
    def accepted_epoch(self) -> int:
        return self.membership.accepted_epoch

    @property
    def epoch(self) -> int:
        return self.membership.accepted_epoch

    def assignment_epoch(self) -> int:
        return self.membership.assignment_epoch()

    @property
    def fenced_reason(self) -> str | None:
        return self.membership.fenced_reason

    def lease_valid(self, now: float | None = None) -> bool:
        return self.membership.lease_valid(now)

    @property
    def applied_sequence(self) -> int:
        """What this node holds as far as its fsync policy promises (`SpaceWriter`)."""
        return self.writer.promised_sequence

    @property
    def matched_sequence(self) -> int:
        """What a replica may acknowledge: held durably (as its policy promises) *and* proven to
        be the primary's entries. A divergent tail beyond `matched_upto` is never vouched for."""
        return min(self.applied_sequence, self.matched_upto)

    @property
    def sealed_upto(self) -> int:
        return self.ring.sealed_upto

    @property
    def primary_last_seq(self) -> int:
        return self._primary_last_seq

    @primary_last_seq.setter
    def primary_last_seq(self, value: int) -> None:
        # Set by the receiver on each heartbeat and batch from the primary.
        self._primary_last_seq = value
        self.primary_heard_at = self.clock()

    def readiness_problem(self, max_lag_entries: int) -> str | None:
        """None when this member is in step for readiness, else why not: a primary that is not
        fenced, or a replica that heard from its primary under this assignment and is at most
        `max_lag_entries` behind what the primary last told it."""
        if self.role == "primary":
            return None if self.fenced_reason is None else f"fenced: {self.fenced_reason}"
        if self.role != "replica":
            return None
        a = self.assignment
        primary = a.primary.node if a is not None else "?"
        if self.primary_heard_at is None:
            return f"has not heard from its primary {primary} yet"
        behind = self.own_lag().entries
        if behind > max_lag_entries:
            return f"is {behind} entries behind its primary {primary} (at most {max_lag_entries})"
        return None

    def lag_thresholds(self, node: lag.LagThresholds) -> lag.LagThresholds:
        """`node`'s thresholds, with the warning and critical lag the space's spec sets."""
        t = self.assignment.tuning if self.assignment is not None else None
        if t is None:
            return node
        return lag.LagThresholds(
            node.warning_seconds if t.lag_warning_seconds is None else t.lag_warning_seconds,
            node.critical_seconds if t.lag_critical_seconds is None else t.lag_critical_seconds,
            node.failed_after_seconds,
        )

    def catchup_threshold(self, node: int) -> int:
        """Entries behind past which a replica gets a snapshot: the spec's, else `node`'s."""
        a = self.assignment
        t = a.tuning.catchup_threshold if a is not None else None
        return node if t is None else t

    # ---- assignment and epochs ------------------------------------------------------------

    def apply_assignment(self, a: Assignment) -> None:
        """Adopt `a` (already checked not stale) and persist it before acting on it."""
        was_primary = self.role == "primary"
        old = self.assignment
        self.membership.adopt(a)
        if old is None or old.epoch != a.epoch or old.primary != a.primary:
            self.matched_upto = 0
            self._primary_last_seq = 0
            self.primary_heard_at = None
        self.ring.epoch = a.epoch
        self.ring.compress = a.compression
        t = a.tuning
        entries, delay = self._batch_defaults
        self.ring.batch_max_entries = t.batch_max_entries or entries
        self.ring.batch_max_delay = delay if t.batch_max_delay is None else t.batch_max_delay
        if self.role == "primary":
            if not was_primary or old is None or old.epoch != a.epoch:
                # Frames carry the epoch in their header: none sealed at the old one may go out.
                self.writer.begin_epoch(a.epoch)
                self.ring.restart(self.log, self.writer.promised_sequence)
            keep = {r.node for r in a.replicas}
            for gone in set(self.replicas) - keep:
                del self.replicas[gone]
            for r in a.replicas:
                self.replicas.setdefault(r.node, ReplicaProgress(r.node))
        else:
            self.replicas.clear()
            self.waiters.fail(f"node {self.node} is no longer the primary")

    def resume(self) -> None:
        """Start-up, once the saved assignment is adopted: a primary never writes again at the
        epoch it led before it stopped. Its entries shipped before they were durable, so a
        replica may hold some that this log lost with the page cache (a power loss, a failed
        fsync); written again at the same (epoch, sequence) they would pass log matching as the
        same entries (design-notes "Entries ship before they are durable"). So the node accepts
        the next epoch, durably, which fences it; the control plane then re-asserts a primary at
        a newer epoch (`reconcile._reassert`), and the replicas' stale tail is cut by log
        matching. Raft's rule: a restarted leader never leads again in its old term."""
        a = self.assignment
        if a is None or self.role != "primary" or self.accepted_epoch > a.epoch:
            return
        self.membership.note_epoch(a.epoch + 1)
        self.fence(
            f"restarted: it led epoch {a.epoch} before, and takes writes again only at a newer"
            " epoch from the control plane"
        )

    def note_epoch(self, epoch: int) -> None:
        """A peer proved a higher epoch: stop leading at once (fencing), remember the epoch."""
        if self.membership.note_epoch(epoch) and self.role == "primary":
            self.fence(f"saw epoch {epoch} above this primary's {self.assignment_epoch()}")

    def fence(self, reason: str) -> None:
        self.membership.fence(reason)
        self.waiters.fail(f"fenced: {reason}")

    # ---- the primary's write --------------------------------------------------------------

    async def write(self, records: Sequence[Record], *, ack_timeout: float) -> tuple[int, int, int]:
        """Append `records` as primary, settle them, wait for the ack policy, and acknowledge
        only if this node still leads at the same epoch with a write lease. Returns (first,
        last, epoch). Raises NotWritable (`unavailable` before anything was written,
        `not_acknowledged` after) or the log's error (the storage state notes it)."""
        m = self.membership
        m.check_writable()
        a, epoch = m.assignment, m.accepted_epoch
        done = self.writer.append(records, epoch=epoch)
        written = self.writer.written(done.last)
        self.ring.keep(done)
        self.ring.on_append()
        self.on_appended(done.last)
        if a is not None and a.replicas_needed() and self.ring.sealed_upto < done.last:
            # A write that waits for replica acks must not also wait out the batch linger: at
            # light load it would pay batch_max_delay on every request (issue 13).
            self.ring.seal()
        # Shipped already (the ring ships entries as written; `resume` keeps that safe across a
        # restart): the replicas append and fsync while this node fsyncs. An ack still needs
        # this node's own fsync first, whatever the replicas hold.
        if self.writer.waits:
            await self.writer.settle(written)
        await self.wait_replicated(done.last, ack_timeout)
        m.check_unchanged(a, epoch, done.first, done.last)
        return done.first, done.last, epoch

    # ---- the replica's writes -------------------------------------------------------------

    def apply(self, data: bytes, checked: CheckedRun | None, upto: int) -> tuple[int, Written]:
        """Append a batch's entries that log matching let through (`data` may be empty: this
        log held them all) and vouch for the batch up to `upto`. Returns how many entries were
        appended, and what to settle before acknowledging `upto`."""
        count = 0
        if data:
            first, last = self.writer.append_stored(data, checked)
            count = last - first + 1
        written = self.writer.written(upto)
        self.matched_upto = max(self.matched_upto, upto)
        return count, written

    async def settle(self, w: Written) -> None:
        await self.writer.settle(w)

    def cut(self, keep_upto: int, epoch: int) -> int:
        """Drop this log's divergent tail after `keep_upto` to follow the primary of `epoch`;
        returns how many entries went, and records them (`log.truncations`)."""
        dropped = self.writer.truncate_after(keep_upto)
        self.matched_upto = min(self.matched_upto, keep_upto)
        self.ring.on_truncated(keep_upto)
        self.dropped_entries += dropped
        if dropped:
            self.truncations = truncations.record(
                self.path,
                self.truncations,
                epoch=epoch,
                after=keep_upto,
                dropped=dropped,
                space=self.id,
            )
        return dropped

    def note_discarded(self, after: int, dropped: int, epoch: int) -> None:
        """A snapshot replaced `dropped` entries after `after` that the primary of `epoch`
        never had: recorded like a cut (`cut`), since they are just as gone."""
        if dropped <= 0:
            return
        self.dropped_entries += dropped
        self.truncations = truncations.record(
            self.path, self.truncations, epoch=epoch, after=after, dropped=dropped, space=self.id
        )

    def replace_log(self, wal: SpaceLog, commit: GroupCommit) -> GroupCommit:
        """A snapshot of the primary's log was installed: it is this space's log now, and all
        of it is the primary's. Returns the old group commit, to stop."""
        old = self.writer.replace(wal, commit)
        self.ring.restart(wal, wal.last_sequence)
        self.matched_upto = wal.last_sequence
        self.note_install_discard()
        return old

    def note_install_discard(self) -> None:
        """Record what the installed snapshot discarded (`discard_on_install`), once."""
        pending, self.discard_on_install = self.discard_on_install, None
        if pending is not None:
            self.note_discarded(*pending)

    # ---- acks (primary) -------------------------------------------------------------------

    def _low_water(self) -> int | None:
        return min((r.acked for r in self.replicas.values()), default=None)

    def on_ack(self, replica: NodeName, sequence: int) -> None:
        """A replica holds `sequence` durably and identical to ours (its ACK at our epoch)."""
        r = self.replicas.get(replica)
        if r is None:
            return
        r.acked = max(r.acked, min(sequence, self.log.last_sequence))
        r.last_contact = self.clock()
        r.disconnected_since = None
        self.ring.trim()
        self.waiters.release()

    def replicas_holding(self, sequence: int) -> int:
        return sum(1 for r in self.replicas.values() if r.acked >= sequence)

    async def wait_replicated(self, sequence: int, timeout: float) -> None:
        a = self.assignment
        needed = a.replicas_needed() if a else 0
        if not await self.waiters.wait(sequence, needed, timeout):
            raise NotWritable(
                f"space {self.id}: ackPolicy {a.ack_policy if a else '?'} needs {needed} replica "
                f"ack(s) for sequence {sequence}; {self.replicas_holding(sequence)} within "
                f"{timeout:.1f} s. The entry is in the primary's log but NOT acknowledged",
                code="not_acknowledged",
            )

    # ---- lag ------------------------------------------------------------------------------

    def replica_lag(self, r: ReplicaProgress, now_ns: int | None = None) -> lag.Lag:
        """A replica's lag as this primary sees it (`lag.compute_lag`)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        last = self.log.last_sequence
        ts = lag.timestamp_of(self.log, r.acked + 1) if r.acked < last else None
        return lag.compute_lag(
            primary_last=last, replica_acked=r.acked, oldest_missing_ts_ns=ts, now_ns=now_ns
        )

    def own_lag(self, now_ns: int | None = None) -> lag.Lag:
        """A replica's own view: how far behind the primary's last heartbeat or batch it is."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        mine = self.applied_sequence
        if self.primary_last_seq <= mine:
            return lag.Lag(0, 0.0)
        return lag.compute_lag(
            primary_last=self.primary_last_seq,
            replica_acked=mine,
            oldest_missing_ts_ns=self.primary_last_ts_ns or None,
            now_ns=now_ns,
        )
