"""One replica stream (space x replica) on a peer connection: what to send next, and why.

Modes: `probe` right after (re)connecting, until the replica's first ACK says where it is; then
`live` (batches from its cursor, pipelined) or `snapshot` (the primary's retained log in
throttled chunks, then live from the snapshot's end). The path is `catchup.choose_path`'s. The
cursor moves only on acks, so a failed replica never loses entries (engram-facts §5.6).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from engram_contract.formats.batch import encode_snapshot_chunk
from engram_contract.formats.messages import (
    Ack,
    Heartbeat,
    Nack,
    NackReason,
    SnapshotAck,
    SnapshotBegin,
    SnapshotEnd,
)
from engram_contract.ids import Epoch, NodeName, Sequence
from engram_sidecar.errors import SequenceError
from engram_sidecar.metrics import Metrics
from engram_sidecar.replication import catchup, matching
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.replicas import CatchUpPath, CatchUpProgress

# A reconnect resending more than this many entries is a catch-up (metric, record, Event),
# whatever the batch size: fixed at the old default batch so bigger batches hide none.
CATCHUP_RECORD_MIN_GAP = 100

log = logging.getLogger(__name__)

Mode = Literal["probe", "live", "snapshot"]
CHUNK_BYTES = 256 * 1024
CHUNKS_IN_FLIGHT = 4


class StreamRefused(Exception):
    """The replica refused in a way only a new connection can fix."""


class Stream:
    def __init__(
        self,
        space: Space,
        peer: NodeName,
        *,
        metrics: Metrics,
        bucket: catchup.TokenBucket,
        threshold: int,
        heartbeat_interval: float,
        window: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.space = space
        self.peer = peer
        self.metrics = metrics
        self.bucket = bucket
        self.threshold = threshold
        self.heartbeat_interval = heartbeat_interval
        self.window = window
        self.clock = clock
        self.mode: Mode = "probe"
        self.next_send = 1
        self.inflight = 0
        self.last_sent_at = 0.0
        self.paused_until = 0.0
        self.snap_first = self.snap_last = self.snap_next = 0
        self.snap_out: deque[int] = deque()  # last sequence of each chunk in flight
        self.snap_end_sent = False
        self.snap_started = False  # the replica answered SNAPSHOT_BEGIN: chunks may flow
        self.snap_reason: str | None = None  # set when a snapshot is due but not begun
        self.refusals = 0  # INTERNAL refusals in a row (backoff), reset by the next ack
        # A sequence whose segment could not be indexed off the loop: read it anyway (on the
        # loop), so the read reports what is wrong instead of the stream waiting forever.
        self._read_anyway: int | None = None

    @property
    def acked(self) -> int:
        prog = self.space.replicas.get(self.peer)
        return prog.acked if prog is not None else 0

    def reset(self) -> None:
        """A new connection: learn where the replica is before sending anything else."""
        self.mode = "probe"
        self.inflight = 0
        self.next_send = self.acked + 1
        self.last_sent_at = 0.0
        self.snap_out.clear()
        self.snap_reason = None

    # ---- sending --------------------------------------------------------------------------

    def read_ahead(self) -> int | None:
        """The sequence the next fill reads from the log, when its sealed segment must first be
        indexed: the link runs that off the loop (`offload.prepare_read`) before filling, and
        the fill stops short of it until then. None when nothing waits on an index."""
        if self.space.role != "primary":
            return None
        if self.mode == "snapshot" and self.snap_started and self.snap_next <= self.snap_last:
            seq = self.snap_next
        elif self.mode == "live" and self.next_send <= self.space.sealed_upto:
            seq = self.next_send
        else:
            return None
        if seq == self._read_anyway or self.space.log.index_job(seq) is None:
            return None
        return seq

    def read_anyway(self, sequence: int) -> None:
        """Indexing `sequence`'s segment off the loop failed: the next fill reads it regardless
        (the read meets the same problem and reports it)."""
        self._read_anyway = sequence

    def fill(self, write: Callable[[bytes], None], now: float) -> float | None:
        """Write what this stream may send now. Returns seconds until a throttled retry."""
        sp = self.space
        if sp.role != "primary" or now < self.paused_until:
            return None
        retry = None
        if self.mode == "live":
            self._fill_live(write, now)
        elif self.mode == "snapshot":
            if self.snap_reason is not None:
                self._begin_snapshot(write, self.snap_reason, now)
            retry = self._fill_snapshot(write, now)
        if self.read_ahead() is not None:
            retry = 0.0  # stopped at an unindexed segment: the link indexes it, then fills on
        if (
            self.inflight == 0
            and not self.snap_out
            and now - self.last_sent_at >= self.heartbeat_interval
        ):
            shipped = min(sp.sealed_upto, sp.log.last_sequence)
            hb = Heartbeat(
                sp.wire_id,
                Epoch(sp.assignment_epoch()),
                Sequence(shipped),
                sp.log.last_timestamp_ns if shipped == sp.log.last_sequence else 0,
                time.time_ns(),
                Epoch(matching.epoch_at(sp.log.history, shipped)),
            ).encode()
            write(hb)
            self.metrics.bytes.labels("out").inc(len(hb))
            self.last_sent_at = now
        return retry

    def _fill_live(self, write: Callable[[bytes], None], now: float) -> None:
        sp = self.space
        while self.inflight < self.window:
            if self.read_ahead() is not None:
                return
            try:
                got = sp.ring.batch_at(self.next_send)
            except SequenceError:
                # The entries this replica needs were released (retention): only a snapshot
                # can bring it back.
                self._begin_snapshot(write, "its next entry is no longer retained", now)
                return
            if got is None:
                return
            frame, last = got
            write(frame)
            self.metrics.batches_sent.labels(sp.id, self.peer).inc()
            self.metrics.entries_shipped.labels(sp.id, self.peer).inc(last - self.next_send + 1)
            self.metrics.bytes.labels("out").inc(len(frame))
            prog = self._prog()
            if prog is not None:
                prog.done_bytes += len(frame)
            self.next_send = last + 1
            self.inflight += 1
            self.last_sent_at = now

    def _begin_snapshot(self, write: Callable[[bytes], None], reason: str, now: float) -> None:
        sp = self.space
        wal = sp.log
        self.snap_first, self.snap_last = wal.first_sequence, wal.last_sequence
        self.snap_next, self.snap_end_sent = self.snap_first, False
        self.snap_started = False
        self.snap_reason = None
        self.snap_out.clear()
        total = wal.size_bytes
        self.mode = "snapshot"
        self._progress("snapshot", reason, total)
        write(
            SnapshotBegin(
                sp.wire_id,
                Epoch(sp.assignment_epoch()),
                Sequence(self.snap_first),
                Sequence(self.snap_last),
                tuple(wal.history),
                total,
                wal.segment_bytes,
            ).encode()
        )
        self.metrics.catchups.labels(sp.id, "snapshot").inc()
        self.last_sent_at = now
        log.info(
            "space %s: replica %s gets a snapshot of %d..%d (%s)",
            sp.id,
            self.peer,
            self.snap_first,
            self.snap_last,
            reason,
        )

    def _fill_snapshot(self, write: Callable[[bytes], None], now: float) -> float | None:
        sp = self.space
        if not self.snap_started:
            return None  # its answer to SNAPSHOT_BEGIN says where to start (it may resume)
        while len(self.snap_out) < CHUNKS_IN_FLIGHT and self.snap_next <= self.snap_last:
            if self.read_ahead() is not None:
                return None
            r = sp.log.read(
                self.snap_next, max_entries=100_000, max_bytes=CHUNK_BYTES, upto=self.snap_last
            )
            if not self.bucket.try_take(len(r.data)):
                return self.bucket.wait_time(len(r.data))
            frame = encode_snapshot_chunk(
                space=sp.wire_id,
                epoch=sp.assignment_epoch(),
                prev_epoch=matching.epoch_at(sp.log.history, r.first_sequence - 1),
                first_seq=r.first_sequence,
                last_seq=r.last_sequence,
                count=r.count,
                entries=r.data,
            )
            write(frame)
            self.metrics.bytes.labels("out").inc(len(frame))
            self.metrics.catchup_bytes.labels(sp.id, self.peer).inc(len(r.data))
            prog = self._prog()
            if prog is not None:
                prog.done_bytes += len(r.data)
            self.snap_out.append(r.last_sequence)
            self.snap_next = r.last_sequence + 1
            self.last_sent_at = now
        if self.snap_next > self.snap_last and not self.snap_out and not self.snap_end_sent:
            write(
                SnapshotEnd(
                    sp.wire_id,
                    Epoch(sp.assignment_epoch()),
                    Sequence(self.snap_first),
                    Sequence(self.snap_last),
                ).encode()
            )
            self.snap_end_sent = True
            self.last_sent_at = now
        return None

    # ---- what the replica says ------------------------------------------------------------

    def on_ack(self, ack: Ack) -> None:
        sp = self.space
        if ack.epoch > sp.epoch:
            sp.note_epoch(ack.epoch)
        if ack.epoch != sp.assignment_epoch():
            return  # vouches for another epoch's log, not ours
        sp.on_ack(self.peer, ack.sequence)
        self.refusals = 0
        if self.mode == "probe":
            self._choose(int(ack.last_seq), int(ack.last_epoch))
            return
        if self.mode != "live":
            return
        outstanding = self.next_send - 1 - self.acked
        self.inflight = 0 if outstanding <= 0 else -(-outstanding // sp.ring.batch_max_entries)
        self._maybe_caught_up()

    def _choose(self, replica_last: int, replica_last_epoch: int) -> None:
        """Start after the replica's last entry if ours is the same one, else back up (log
        matching settles the rest: a wrong guess costs one NACK DIVERGED)."""
        sp = self.space
        nxt = matching.resend_point(
            history=sp.log.history,
            last=sp.log.last_sequence,
            replica_seq=replica_last,
            replica_epoch=replica_last_epoch,
        )
        choice = catchup.choose_path(
            replica_next=nxt,
            primary_first=sp.log.first_sequence,
            primary_last=sp.log.last_sequence,
            threshold=sp.catchup_threshold(self.threshold),
        )
        if choice.path == "snapshot":
            self.mode = "snapshot"
            self.snap_reason = choice.reason  # fill() sends SNAPSHOT_BEGIN
            return
        self.mode = "live"
        self.next_send = nxt
        self.inflight = 0
        gap = sp.log.last_sequence - (nxt - 1)
        if gap > CATCHUP_RECORD_MIN_GAP:
            self._progress("incremental", choice.reason, 0)
            self.metrics.catchups.labels(sp.id, "incremental").inc()

    def on_snapshot_ack(self, msg: SnapshotAck) -> None:
        prog = self._prog()
        if prog is not None:
            prog.done_sequence = int(msg.sequence)
        if self.mode == "snapshot" and not self.snap_started and not msg.installed:
            self.snap_started = True
            self.snap_next = max(self.snap_first, int(msg.sequence) + 1)
            if self.snap_next > self.snap_first:
                log.info(
                    "space %s: replica %s resumes its snapshot after %d",
                    self.space.id,
                    self.peer,
                    msg.sequence,
                )
        while self.snap_out and self.snap_out[0] <= msg.sequence:
            self.snap_out.popleft()
        if msg.installed:
            sp = self.space
            sp.on_ack(self.peer, msg.sequence)
            self.mode = "live"
            self.next_send = int(msg.sequence) + 1
            self.inflight = 0
            self._maybe_caught_up()

    def on_nack(self, nack: Nack) -> None:
        sp = self.space
        self.metrics.nacks.labels("in", nack.reason.name).inc()
        log.info("space %s: %s refused: %s %s", sp.id, self.peer, nack.reason.name, nack.message)
        if nack.reason is NackReason.STALE_EPOCH:
            if matching.refusal_deposes(int(nack.epoch), sp.assignment_epoch()):
                sp.note_epoch(nack.epoch)
                sp.fence(f"replica {self.peer} holds a newer epoch ({nack.message})")
            else:
                # A frame sent at an older epoch of this node's, refused after the node moved on
                # to the epoch it leads at now: start over from what the replica acked.
                self.reset()
        elif nack.reason in (NackReason.GAP, NackReason.DIVERGED) and self.mode == "live":
            # Back up, never forward: NACKs of batches sent before an earlier back-up arrive
            # late, and resending what the replica holds costs only bytes (it skips them).
            point = matching.resend_point(
                history=sp.log.history,
                last=sp.log.last_sequence,
                replica_seq=int(nack.resend_from) - 1,
                replica_epoch=int(nack.epoch_hint),
            )
            self.next_send = max(1, min(self.next_send, point))
            self.inflight = 0
        elif nack.reason in (NackReason.UNKNOWN_SPACE, NackReason.NOT_REPLICA):
            self.paused_until = self.clock() + 0.2
            self.reset()
        elif nack.reason is NackReason.INTERNAL:
            # A refusal of this space alone (its disk is full, say): pause this stream with a
            # growing backoff and keep the connection, which every other space shares.
            self.refusals += 1
            self.paused_until = self.clock() + min(0.2 * 2 ** min(self.refusals, 5), 5.0)
            self.reset()
        else:
            raise StreamRefused(f"{self.peer} refused: {nack.reason.name}: {nack.message}")

    # ---- progress -------------------------------------------------------------------------

    def _prog(self) -> CatchUpProgress | None:
        rep = self.space.replicas.get(self.peer)
        return rep.catchup if rep is not None else None

    def _progress(self, path: CatchUpPath, reason: str, total_bytes: int) -> None:
        rep = self.space.replicas.get(self.peer)
        if rep is None:
            return
        rep.catchup = CatchUpProgress(
            path,
            reason,
            self.acked,
            self.space.log.last_sequence,
            total_bytes=total_bytes,
            clock=self.clock,
        )

    def _maybe_caught_up(self) -> None:
        prog = self._prog()
        rep = self.space.replicas.get(self.peer)
        if prog is None or rep is None or self.acked < prog.target:
            return
        took = self.clock() - prog.started_at
        record: dict[str, object] = {
            "replica": self.peer,
            "path": prog.path,
            "entries": prog.total_entries,
            "bytes": prog.done_bytes,
            "seconds": round(took, 3),
            "reason": prog.reason,
            "at_ns": time.time_ns(),
        }
        self.space.caught_up.append(record)
        log.info(
            "space %s: replica %s caught up by %s: %d entries, %d bytes in %.2f s",
            self.space.id,
            self.peer,
            prog.path,
            prog.total_entries,
            prog.done_bytes,
            took,
        )
        rep.catchup = None
