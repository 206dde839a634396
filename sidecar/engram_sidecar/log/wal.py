"""The WAL store: one append-only log per memory space under `<data>/<space>/wal/`.

`SpaceLog` owns one space's segments: sequences (from 1, strictly increasing, recovered on open,
never reset by rotation, retention or truncation), size-based rotation, positioned reads that
return stored bytes ready to ship, torn-tail recovery, truncation for a deposed primary, retention,
and the epoch history. Writes land in the page cache at once; `sync()` makes them durable. The
asyncio group commit that shares one fsync among concurrent writers lives in `groupcommit`.

Failure rules: a failed write is rolled back (the file is cut back to its previous end) so no
partial entry is ever visible; a failed fsync poisons the log until it is reopened, because after
such a failure the kernel may have dropped the dirty pages and a retry would lie (fsyncgate).
Every failing OS call surfaces as `StorageError` (path, errno), never as a bare OSError, which
the replication code would take for a lost connection.

Durability rules: `durable_sequence` only ever covers entries an fsync of this process covered
(opening fsyncs what a previous process left in the page cache), and never exceeds
`last_sequence`. Every truncation bumps `generation`; an fsync started before it can't mark
anything durable after it (`SyncTicket`).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from engram_contract.formats.entry import (
    HEADER_SIZE,
    CheckedRun,
    Entry,
    Record,
    RunProblem,
    check_run,
    decode_header,
    encode_entries,
    encode_entry,
    iter_entries,
    stored_prefix,
)
from engram_contract.ids import SpaceId, validate_space_id
from engram_sidecar.errors import SequenceError, StorageError, WalClosed, WalCorruption, WalIOError
from engram_sidecar.log import epochs as epoch_history
from engram_sidecar.log.segment import (
    INDEX_EVERY,
    Segment,
    fsync_dir,
    fsync_file,
    list_segments,
    scan,
    seek_offset,
    segment_name,
    valid_entry_after,
)

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "none"]
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
# Appends whose timestamps stay in memory (`timestamp_of`), at least; at most twice as many.
_RUNS_KEPT: Final = 4096
# Truncations remembered for `cut_since`; a waiter older than all of them assumes the worst.
_CUTS_KEPT: Final = 64


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A run of stored entries: `data` is header+payload bytes exactly as on disk."""

    first_sequence: int
    last_sequence: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Appended:
    """Entries just written by `SpaceLog.append_entries`: their bytes exactly as stored, and
    where each one ends in `data` (so a primary can ship them without reading them back)."""

    first: int
    last: int
    data: bytes
    ends: list[int]  # ends[i]: offset in `data` just past entry first + i


@dataclass(frozen=True, slots=True)
class SyncTicket:
    """An fsync to run off the loop (`run_ticket`): a duplicate fd of the active segment, the
    sequence it makes durable, and the log's generation when it was taken (a truncation since
    voids it). It also owns the fds of segments sealed since the last sync, fsynced and closed
    first, and the directory to fsync when a rotation named a new segment in it."""

    fd: int
    path: Path  # the segment fd refers to, for error messages
    target: int
    generation: int
    sealed: tuple[tuple[int, Path], ...] = ()
    directory: Path | None = None


def run_ticket(
    ticket: SyncTicket, fsync: Callable[[int], None] | None = None, *, space: str = ""
) -> None:
    """Carry out a ticket, in a worker thread: sealed segments, the directory, then the active
    segment. Closes every fd the ticket owns. Raises StorageError naming what failed.
    `fsync`: os.fsync (looked up at each call) unless given."""
    fsync = fsync or os.fsync
    try:
        for fd, path in ticket.sealed:
            try:
                fsync(fd)
            except OSError as err:
                raise StorageError("fsync", path, err, space=space) from err
        if ticket.directory is not None:
            try:
                fsync_dir(ticket.directory)
            except OSError as err:
                raise StorageError("fsync directory", ticket.directory, err, space=space) from err
        try:
            fsync(ticket.fd)
        except OSError as err:
            raise StorageError("fsync", ticket.path, err, space=space) from err
    finally:
        for fd, _ in ticket.sealed:
            os.close(fd)
        os.close(ticket.fd)


@dataclass(frozen=True, slots=True)
class IndexJob:
    """A sealed segment to open and index in a worker thread (`run`), then hand back to the log
    on the loop (`SpaceLog.adopt_index`). Sealed segments never change, so a scan of one needs
    nothing from the loop; a truncation or a close meanwhile (`generation`) voids it."""

    segment: Segment
    generation: int

    @property
    def path(self) -> Path:
        return self.segment.path

    def run(self) -> tuple[int, list[tuple[int, int]]]:
        """Open the segment and scan it for its index. Returns (read fd, index); raises
        OSError or WalCorruption (the fd then closed)."""
        fd = os.open(self.segment.path, os.O_RDONLY)
        try:
            res = scan(self.segment.path, self.segment.first_sequence, verify_payloads=False)
            if res.error is not None:
                raise WalCorruption(str(self.segment.path), res.error[0], res.error[1])
        except BaseException:
            os.close(fd)
            raise
        return fd, res.index


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    truncated_bytes: int
    truncated_reason: str | None


class SpaceLog:
    """One memory space's write-ahead log. Not thread-safe: drive it from one event loop."""

    def __init__(
        self,
        space_dir: Path,
        *,
        space: SpaceId,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        clock_ns: Callable[[], int] = time.time_ns,
        on_torn_tail: Callable[[int], None] | None = None,
        first_sequence: int = 1,
    ) -> None:
        self.space = space
        # Where a brand-new log starts: 1, or a snapshot's first sequence (catch-up).
        self._first_for_new = first_sequence
        self.dir = space_dir
        self.wal_dir = space_dir / "wal"
        self._epochs_path = space_dir / "epochs.json"
        self.segment_bytes = segment_bytes
        self._clock_ns = clock_ns
        self._on_torn_tail = on_torn_tail
        self._segments: list[Segment] = []
        self._fd = -1  # active segment, opened for append
        # Segments sealed by rotation whose fsync is still owed (their fds, kept open for it),
        # and whether the directory naming a new segment is: paid by the next sync, off the
        # loop, never by the append that rotated.
        self._sealed_unsynced: list[tuple[int, Path]] = []
        self._dir_unsynced = False
        self._rfds: dict[Path, int] = {}
        # (sequence, segment, offset) just past the last read: sequential reads skip the seek.
        self._next_read: tuple[int, Segment, int] | None = None
        self._failed: BaseException | None = None
        self.durable_sequence = 0
        # Bumped by every truncation and by close: an fsync ticket from before is stale.
        self.generation = 0
        self._cuts: deque[tuple[int, int]] = deque(maxlen=_CUTS_KEPT)  # (generation, kept up to)
        self._cuts_forgotten = -1  # the newest generation whose cut fell out of _cuts
        self.last_timestamp_ns = 0
        # When recent entries were written, in memory: (first sequence of an append, timestamp
        # of its first entry), for lag by age without reading the log (`timestamp_of`).
        self._run_firsts: list[int] = []
        self._run_times: list[int] = []
        self.history: epoch_history.History = []
        self.recovery = self._open()

    # ---- opening and recovery -------------------------------------------------------------

    @contextlib.contextmanager
    def _os_errors(self, op: str, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise StorageError(op, path, err, space=self.space) from err

    def _open(self) -> RecoveryReport:
        with self._os_errors("create", self.wal_dir):
            self.wal_dir.mkdir(parents=True, exist_ok=True)
        self.history = epoch_history.load(self._epochs_path)
        found = list_segments(self.wal_dir)
        if not found:
            path = self.wal_dir / segment_name(self._first_for_new)
            with self._os_errors("create", path):
                path.touch()
            found = [(self._first_for_new, path)]
        for (first, path), nxt in zip(found, [*found[1:], None], strict=True):
            last = nxt[0] - 1 if nxt is not None else first - 1
            self._segments.append(Segment(path, first, last, path.stat().st_size))
        report = self._recover_tail()
        self._sync_what_is_there()
        with self._os_errors("open", self._active.path):
            self._fd = os.open(self._active.path, os.O_WRONLY | os.O_APPEND)
        self.durable_sequence = self.last_sequence
        return report

    def _sync_what_is_there(self) -> None:
        """fsync every segment and the directories that name them, before calling them durable.

        A previous process that crashed (not the machine) leaves entries in the page cache that
        were never fsynced: readable now, gone after a power cut. Declaring them durable would
        let this node ack, or be elected on, entries it may lose. fsync of a clean file is cheap.
        """
        for seg in self._segments:
            with self._os_errors("fsync", seg.path):
                fsync_file(seg.path)
        # wal/ names the segments, the space dir names wal/ and epochs.json, the data dir names
        # the space dir: a crash before any of these was fsynced may have left it unnamed.
        for d in (self.wal_dir, self.dir, self.dir.parent):
            with self._os_errors("fsync directory", d):
                fsync_dir(d)

    def _recover_tail(self) -> RecoveryReport:
        seg = self._active
        res = scan(seg.path, seg.first_sequence)
        cut, reason = 0, None
        if res.error is not None:
            off, reason = res.error
            later = valid_entry_after(seg.path, off, res.last_sequence + 1)
            if later is not None:
                raise WalCorruption(
                    str(seg.path), off, f"{reason}; a valid entry follows at offset {later}"
                )
            cut = seg.size - off
            log.warning(
                "space %s: truncating torn WAL tail of %d bytes at %s offset %d (%s)",
                self.space,
                cut,
                seg.path,
                off,
                reason,
            )
            with self._os_errors("truncate torn tail of", seg.path), seg.path.open("r+b") as f:
                f.truncate(off)
                os.fsync(f.fileno())
            if self._on_torn_tail is not None:
                self._on_torn_tail(cut)
        seg.size = res.end_offset
        seg.last_sequence = res.last_sequence
        seg.index = res.index
        self.last_timestamp_ns = res.last_timestamp_ns or 0
        # Entries may carry an epoch the history file missed (crash between the two writes).
        for epoch, first in res.epochs:
            self._note_epoch(epoch, first)
        # Keep an epoch begun at the next sequence (begin_epoch before any write in it).
        self.history = epoch_history.cut_after(self.history, self.last_sequence + 1)
        return RecoveryReport(cut, reason)

    # ---- state ----------------------------------------------------------------------------

    @property
    def _active(self) -> Segment:
        return self._segments[-1]

    @property
    def first_sequence(self) -> int:
        """The oldest retained sequence (== next_sequence when the log holds nothing)."""
        for seg in self._segments:
            if not seg.empty:
                return seg.first_sequence
        return self._active.first_sequence

    @property
    def last_sequence(self) -> int:
        return self._active.last_sequence

    @property
    def next_sequence(self) -> int:
        return self._active.last_sequence + 1

    @property
    def last_epoch(self) -> int:
        """The log's current epoch: the newest in the history, which may have begun (a
        promotion) with no entry written in it yet. Appends below it are refused."""
        return self.history[-1][0] if self.history else 0

    @property
    def last_entry_epoch(self) -> int:
        """The epoch of the last entry (0 for an empty log); may be below `last_epoch`."""
        return epoch_history.epoch_at(self.history, self.last_sequence)

    @property
    def last_entry_id(self) -> tuple[int, int]:
        """(epoch, sequence) of the last entry: what log matching and elections compare."""
        return self.last_entry_epoch, self.last_sequence

    def epoch_at(self, sequence: int) -> int:
        """The epoch of the entry at `sequence` (0 for sequence 0), from the epoch history.

        O(log epochs). Answers for entries released by retention too. Raises SequenceError for a
        sequence this log has not written.
        """
        if not 0 <= sequence <= self.last_sequence:
            raise SequenceError(
                f"space {self.space}: no entry {sequence}; the log ends at {self.last_sequence}"
            )
        return epoch_history.epoch_at(self.history, sequence)

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise WalClosed(f"space {self.space}: log failed earlier ({self._failed}); reopen it")
        if self._fd < 0:
            raise WalClosed(f"space {self.space}: log is closed")

    # ---- appends --------------------------------------------------------------------------

    def append(self, records: Iterable[Record], *, epoch: int) -> tuple[int, int]:
        """Encode and write entries (type, payload) at `epoch`. Returns (first, last) sequence.

        The entries are in the page cache when this returns, not yet durable: call `sync()` or
        await the group commit.
        """
        done = self.append_entries(records, epoch=epoch)
        return done.first, done.last

    def append_entries(self, records: Iterable[Record], *, epoch: int) -> Appended:
        """`append`, returning the entries' stored bytes too (what a primary ships)."""
        self._check_usable()
        if epoch < self.last_epoch:
            raise SequenceError(
                f"space {self.space}: epoch {epoch} is older than the log's epoch {self.last_epoch}"
            )
        first = self.next_sequence
        now = self._clock_ns()
        ts = max(now, self.last_timestamp_ns)  # keeps lag-by-age monotonic if the clock steps back
        # One buffer for the whole request: written once, and shipped as it is (`Appended`).
        data, ends = encode_entries(records, first_sequence=first, timestamp_ns=ts, epoch=epoch)
        if not ends:
            raise SequenceError("append of no entries")
        last = first + len(ends) - 1
        self._write(data, ends, first=first, last=last, epoch=epoch, ts=ts, first_ts=ts)
        return Appended(first, last, data, ends)

    def append_timed(
        self, records: Iterable[tuple[int, bytes]], *, epoch: int, timestamps: Sequence[int]
    ) -> Appended:
        """`append_entries` with each entry's timestamp given, kept byte for byte: the tail of
        Engram's own WAL (engram_sidecar.tail) keeps Engram's. They may go back in time (an
        Engram restart on a stepped clock); lag by age then reads a little high, never low."""
        self._check_usable()
        if epoch < self.last_epoch:
            raise SequenceError(
                f"space {self.space}: epoch {epoch} is older than the log's epoch {self.last_epoch}"
            )
        first = seq = self.next_sequence
        parts = []
        for (t, p), ts in zip(records, timestamps, strict=True):
            parts.append(
                encode_entry(sequence=seq, timestamp_ns=ts, entry_type=t, epoch=epoch, payload=p)
            )
            seq += 1
        if not parts:
            raise SequenceError("append of no entries")
        data = b"".join(parts)
        ends = list(itertools.accumulate(map(len, parts)))
        last_ts = max(self.last_timestamp_ns, timestamps[-1])
        self._write(
            data, ends, first=first, last=seq - 1, epoch=epoch, ts=last_ts, first_ts=timestamps[0]
        )
        return Appended(first, seq - 1, data, ends)

    def append_stored(self, data: bytes, checked: CheckedRun | None = None) -> tuple[int, int]:
        """Append entries already encoded by a primary (a replica applying a batch).

        Every entry is checked (CRCs, sequences continuing from next_sequence, epochs not going
        back) before a byte is written, so a bad batch leaves the log untouched. A caller that
        already checked the run (`Batch.checked`, from the frame decoder) passes it, and only
        where it joins this log is checked here: no entry is parsed twice.
        """
        self._check_usable()
        if checked is None:
            run = check_run(data)
            if isinstance(run, RunProblem):
                where = f"batch for space {self.space}"
                if run.corrupt:
                    raise WalCorruption(where, run.offset, run.reason)
                raise SequenceError(f"{where}, entry {run.index}: {run.reason}")
            checked = run
        if checked.ends[-1] != len(data):
            raise SequenceError(f"batch entries cover {checked.ends[-1]} of its {len(data)} bytes")
        first = checked.first
        if first != self.next_sequence:
            raise SequenceError(
                f"space {self.space}: batch starts at {first}, log expects {self.next_sequence}"
            )
        if checked.epochs[0][0] < self.last_epoch:
            raise SequenceError(
                f"entry {first} has epoch {checked.epochs[0][0]} after epoch {self.last_epoch}"
            )
        # Record every epoch begun inside the batch, then write the bytes.
        for e_epoch, e_first in checked.epochs:
            if e_epoch > self.last_epoch:
                self._note_epoch(e_epoch, e_first)
        self._write(
            data,
            checked.ends,
            first=first,
            last=checked.last,
            epoch=checked.last_epoch,
            ts=checked.last_timestamp_ns,
            first_ts=checked.first_timestamp_ns,
        )
        return first, checked.last

    def _write(
        self,
        data: bytes,
        ends: list[int],
        *,
        first: int,
        last: int,
        epoch: int,
        ts: int,
        first_ts: int,
    ) -> None:
        """Write entries `first..last`; `ends[i]` is where entry first + i ends in `data`;
        `ts` and `first_ts` are the last and the first entry's timestamps."""
        if epoch > self.last_epoch:
            self._note_epoch(epoch, first)
        # Rotation is decided entry by entry (rotate before an entry that would take a non-empty
        # segment past segment_bytes), never by how entries were batched: a replica applying a
        # primary's bytes in batches of any size cuts its segments where the primary did, so
        # their segment files are byte-identical. A batch may therefore span two segments.
        view = memoryview(data)
        k = 0  # the next entry to write, as an index into `ends`
        while k < len(ends):
            seg = self._active
            pos = ends[k - 1] if k else 0
            # Entries k..j fit the active segment; an empty one takes at least entry k.
            j = bisect.bisect_right(ends, pos + self.segment_bytes - seg.size, k) - 1
            try:
                if j < k:
                    if seg.size > 0:
                        self._rotate()
                        continue
                    j = k
                self._write_chunk(seg, view[pos : ends[j]], ends=ends, k=k, j=j, first=first, ts=ts)
            except WalIOError:
                if k > 0:
                    self._undo_append(first)
                raise
            k = j + 1
        assert first + k - 1 == last
        self._note_times(first, first_ts)

    def _note_times(self, first: int, first_ts: int) -> None:
        if len(self._run_firsts) >= 2 * _RUNS_KEPT:
            del self._run_firsts[:_RUNS_KEPT], self._run_times[:_RUNS_KEPT]
        self._run_firsts.append(first)
        self._run_times.append(first_ts)

    def timestamp_of(self, sequence: int) -> int | None:
        """When the entry at `sequence` was written, or None if the log lacks it.

        From memory for entries appended since the log was opened (the last appends): exact for
        a primary's appends, whose entries share one timestamp, and for a run of a replica's
        batch the timestamp of its first entry, never later than the entry's own (lag by age
        then reads high, never low). Older entries are read from the log.
        """
        if sequence < self.first_sequence or sequence > self.last_sequence:
            return None
        firsts = self._run_firsts
        if firsts and sequence >= firsts[0]:
            return self._run_times[bisect.bisect_right(firsts, sequence) - 1]
        r = self.read(sequence, max_entries=1)
        h = decode_header(r.data)
        return None if isinstance(h, str) else h.timestamp_ns

    def _write_chunk(
        self,
        seg: Segment,
        data: memoryview,
        *,
        ends: list[int],
        k: int,
        j: int,
        first: int,
        ts: int,
    ) -> None:
        """Write entries k..j of a run that starts at sequence `first` (`data` holds just them)."""
        start = seg.size
        try:
            view = data
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as err:
            self._rollback(seg, start, err)
            raise StorageError("write to", seg.path, err, space=self.space) from err
        if seg.index is not None:
            self._index_range(seg, start, ends=ends, k=k, j=j, first=first)
        seg.size = start + len(data)
        seg.last_sequence = first + j
        self.last_timestamp_ns = ts

    def _undo_append(self, first: int) -> None:
        """Drop the part of a failed append that landed in earlier segments (all or nothing)."""
        try:
            self.truncate_after(first - 1)
        except Exception as err:
            self._failed = self._failed or err
            log.exception("space %s: cannot drop a partly written append", self.space)

    def _index_range(
        self, seg: Segment, start: int, *, ends: list[int], k: int, j: int, first: int
    ) -> None:
        """Index points (every INDEX_EVERY sequences of the segment) of entries k..j, written
        at offset `start` of `seg`."""
        assert seg.index is not None
        base = ends[k - 1] if k else 0
        seq = first + k
        seq += -(seq - seg.first_sequence) % INDEX_EVERY
        while seq <= first + j:
            i = seq - first
            seg.index.append((seq, start + (ends[i - 1] if i else 0) - base))
            seq += INDEX_EVERY

    def _rollback(self, seg: Segment, start: int, err: OSError) -> None:
        try:
            os.ftruncate(self._fd, start)
        except OSError as err2:
            self._failed = err2
            log.error(
                "space %s: cannot cut %s back to %d after %s", self.space, seg.path, start, err
            )

    def _note_epoch(self, epoch: int, first_sequence: int) -> None:
        new = epoch_history.record(self.history, epoch, first_sequence)
        if new is not None:
            epoch_history.store(self._epochs_path, new, space=self.space)
            self.history = new

    def begin_epoch(self, epoch: int) -> None:
        """Record that `epoch` starts at the next sequence (a promotion), durably."""
        self._note_epoch(epoch, self.next_sequence)

    def forget_unwritten_epochs(self) -> bool:
        """Drop epochs begun here that never got an entry (a primary deposed before its first
        write). Left in place, such an epoch would make this log refuse, as replica, a newer
        primary's entries of any lower epoch, forever (issue 11, item 7). True if any went."""
        new = epoch_history.cut_after(self.history, self.last_sequence)
        if new == self.history:
            return False
        epoch_history.store(self._epochs_path, new, space=self.space)
        self.history = new
        return True

    def _rotate(self) -> None:
        """Start a new segment. Its fsyncs (the sealed segment's, the directory's) are owed to
        the next sync, which runs off the loop: nothing counts as durable before it does."""
        path = self.wal_dir / segment_name(self.next_sequence)
        try:
            # Open the new segment before giving up the old one: if this fails, the log still
            # appends to a valid fd.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as err:
            raise StorageError("create", path, err, space=self.space) from err
        self._sealed_unsynced.append((self._fd, self._active.path))
        self._fd = fd
        self._segments.append(Segment(path, self.next_sequence, self.last_sequence, 0, []))
        # Until wal/ is fsynced the new file may vanish in a power cut, and with it every entry
        # written into it: the next sync fsyncs the directory before calling them durable.
        self._dir_unsynced = True

    @property
    def owes_rotation_sync(self) -> bool:
        """A rotation's fsyncs are still owed (under fsync `none`, a sync should follow soon)."""
        return bool(self._sealed_unsynced) or self._dir_unsynced

    def _pay_rotation_syncs(self) -> None:
        """The owed fsyncs of sealed segments and the directory, here and now (rare paths)."""
        sealed, self._sealed_unsynced = self._sealed_unsynced, []
        try:
            for fd, path in sealed:
                with self._os_errors("fsync", path):
                    os.fsync(fd)
            if self._dir_unsynced:
                with self._os_errors("fsync directory", self.wal_dir):
                    fsync_dir(self.wal_dir)
                self._dir_unsynced = False
        except StorageError as err:
            self._failed = err
            raise
        finally:
            for fd, _ in sealed:
                os.close(fd)

    # ---- durability -----------------------------------------------------------------------

    def sync(self) -> int:
        """fsync everything written so far, here. Returns the durable sequence."""
        self._check_usable()
        target = self.last_sequence
        self._pay_rotation_syncs()
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._failed = err
            raise StorageError("fsync", self._active.path, err, space=self.space) from err
        self.durable_sequence = max(self.durable_sequence, target)
        return self.durable_sequence

    def sync_handle(self) -> SyncTicket:
        """A ticket for an fsync run off the loop (`run_ticket`); pass it back to
        `mark_durable` when done.

        Lets the group commit run fsync in a thread while appends continue on the loop. The
        ticket takes over what rotations owe (sealed segments' fds, the directory), so an
        entry in a new segment is durable only once its segment's name is too.
        """
        self._check_usable()
        with self._os_errors("dup descriptor of", self._active.path):
            fd = os.dup(self._fd)
        sealed, self._sealed_unsynced = tuple(self._sealed_unsynced), []
        directory = self.wal_dir if self._dir_unsynced else None
        self._dir_unsynced = False
        return SyncTicket(
            fd, self._active.path, self.last_sequence, self.generation, sealed, directory
        )

    def mark_durable(self, ticket: SyncTicket) -> bool:
        """Apply a completed fsync. False (nothing changes) when the ticket is stale.

        A truncation while the fsync ran may have cut the entries it covered and let others be
        written under the same sequences, which that fsync never saw.
        """
        if ticket.generation != self.generation or self._fd < 0:
            return False
        self.durable_sequence = max(self.durable_sequence, min(ticket.target, self.last_sequence))
        return True

    def cut_since(self, generation: int) -> int | None:
        """The lowest sequence a truncation since `generation` kept (later ones were cut), or
        None if none ran. 0 when that is too long ago to know: assume everything was cut."""
        if generation <= self._cuts_forgotten:
            return 0
        kept = [seq for gen, seq in self._cuts if gen > generation]
        return min(kept) if kept else None

    def fail(self, err: BaseException) -> None:
        self._failed = err

    # ---- reads ----------------------------------------------------------------------------

    def _segment_for(self, sequence: int) -> Segment:
        lo = 0
        for i, seg in enumerate(self._segments):
            if seg.first_sequence <= sequence:
                lo = i
        return self._segments[lo]

    def index_job(self, sequence: int) -> IndexJob | None:
        """The scan a read from `sequence` would run on the loop first, to run elsewhere: its
        sealed segment has no index yet (segments found at open get one on first read). None
        when the read needs no scan. The active segment is left to `read`: it grows while a
        thread would scan it, and needs a scan only after a truncation."""
        if self._fd < 0 or not self.first_sequence <= sequence <= self.last_sequence:
            return None
        seg = self._segment_for(sequence)
        if seg.index is not None or seg is self._active:
            return None
        return IndexJob(seg, self.generation)

    def adopt_index(self, job: IndexJob, fd: int, index: list[tuple[int, int]]) -> None:
        """Take a finished `IndexJob`'s read fd and index; closes the fd if the log moved on
        (a truncation, a close, retention deleting the segment) or has its own already."""
        seg = job.segment
        usable = (
            job.generation == self.generation
            and self._fd >= 0
            and any(s is seg for s in self._segments)
        )
        if usable and seg.index is None:
            seg.index = index
        if usable and seg.path not in self._rfds:
            self._rfds[seg.path] = fd
        else:
            os.close(fd)

    def _rfd(self, seg: Segment) -> int:
        fd = self._rfds.get(seg.path)
        if fd is None:
            fd = self._rfds[seg.path] = os.open(seg.path, os.O_RDONLY)
        return fd

    def read(
        self,
        from_sequence: int,
        *,
        max_entries: int = 1000,
        max_bytes: int = 1 << 20,
        upto: int | None = None,
    ) -> ReadResult:
        """Stored bytes of entries from `from_sequence`, at most up to `upto` (default: last).

        Stays within one segment; every CRC is checked and a bad entry raises WalCorruption.
        At least one entry is returned when any is available, even if larger than max_bytes.
        """
        if self._fd < 0:
            raise WalClosed(f"space {self.space}: log is closed")
        end_seq = self.last_sequence if upto is None else min(upto, self.last_sequence)
        if from_sequence < self.first_sequence:
            raise SequenceError(
                f"space {self.space}: sequence {from_sequence} is no longer retained "
                f"(oldest is {self.first_sequence})"
            )
        if from_sequence > end_seq:
            return ReadResult(from_sequence, from_sequence - 1, 0, b"")
        seg = self._segment_for(from_sequence)
        fd = self._rfd(seg)
        hint = self._next_read
        if hint is not None and hint[0] == from_sequence and hint[1] is seg:
            off = hint[2]  # shipping reads where the last read ended: no index walk
        else:
            off = seek_offset(seg, from_sequence, fd)
        last_in_seg = min(seg.last_sequence, end_seq, from_sequence + max_entries - 1)
        if last_in_seg < from_sequence:  # max_entries < 1
            return ReadResult(from_sequence, from_sequence - 1, 0, b"")
        want = min(seg.size - off, max(max_bytes, HEADER_SIZE))
        data = os.pread(fd, want, off)
        got = stored_prefix(
            data, first_sequence=from_sequence, max_entries=last_in_seg - from_sequence + 1
        )
        if not isinstance(got, RunProblem) and got[0] == 0 and got[1] > len(data):
            data = os.pread(fd, got[1], off)  # one entry larger than max_bytes
            got = stored_prefix(data, first_sequence=from_sequence, max_entries=1)
        if isinstance(got, RunProblem):
            # Every CRC is checked on the way out: never serve a bad entry.
            raise WalCorruption(str(seg.path), off + got.offset, got.reason)
        n, pos = got
        if n == 0:
            raise WalCorruption(str(seg.path), off, f"entry cut short ({len(data)} bytes left)")
        seq = from_sequence + n
        self._next_read = (seq, seg, off + pos)
        return ReadResult(from_sequence, seq - 1, seq - from_sequence, data[:pos])

    def read_entries(self, from_sequence: int, *, limit: int = 1000) -> list[Entry]:
        out: list[Entry] = []
        seq = from_sequence
        while len(out) < limit and seq <= self.last_sequence:
            r = self.read(seq, max_entries=limit - len(out))
            if r.count == 0:
                break
            out.extend(iter_entries(r.data))
            seq = r.last_sequence + 1
        return out

    # ---- truncation and retention ---------------------------------------------------------

    def truncate_after(self, sequence: int) -> int:
        """Drop every entry after `sequence` (a deposed primary cutting to the fork point).

        Returns how many entries were dropped. The cut is durable before this returns.
        """
        self._next_read = None
        self._check_usable()
        if sequence >= self.last_sequence:
            return 0
        if sequence < self.first_sequence - 1:
            raise SequenceError(
                f"space {self.space}: cannot truncate to {sequence}, before the oldest retained "
                f"entry {self.first_sequence}; the replica needs a snapshot"
            )
        dropped = self.last_sequence - sequence
        self._note_cut(sequence)
        keep = bisect.bisect_right(self._run_firsts, sequence)
        del self._run_firsts[keep:], self._run_times[keep:]
        self.durable_sequence = min(self.durable_sequence, sequence)
        try:
            self._cut_files(sequence)
            new_hist = epoch_history.cut_after(self.history, sequence)
            if new_hist != self.history:
                epoch_history.store(self._epochs_path, new_hist, space=self.space)
                self.history = new_hist
        except (OSError, StorageError) as err:
            # Half-cut files and in-memory state may disagree: only recovery can be trusted now.
            self._failed = err
            if isinstance(err, StorageError):
                raise
            raise StorageError("truncate", self.wal_dir, err, space=self.space) from err
        log.warning(
            "space %s: truncated %d entries after sequence %d", self.space, dropped, sequence
        )
        return dropped

    def _note_cut(self, sequence: int) -> None:
        self.generation += 1
        if len(self._cuts) == self._cuts.maxlen:
            self._cuts_forgotten = self._cuts[0][0]
        self._cuts.append((self.generation, sequence))

    def _cut_files(self, sequence: int) -> None:
        self._pay_rotation_syncs()  # no fd of a segment about to be deleted stays owed
        seg = self._segment_for(sequence + 1)
        off = seek_offset(seg, sequence + 1, self._rfd(seg)) if not seg.empty else 0
        os.close(self._fd)
        self._fd = -1
        for later in [s for s in self._segments if s.first_sequence > seg.first_sequence]:
            self._forget(later)
            later.path.unlink()
        with seg.path.open("r+b") as f:
            f.truncate(off)
            os.fsync(f.fileno())
        fsync_dir(self.wal_dir)
        self._forget_rfd(seg)
        seg.size, seg.last_sequence, seg.index = off, sequence, None
        self._segments = [s for s in self._segments if s.first_sequence <= seg.first_sequence]
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)

    def delete_before(self, sequence: int) -> int:
        """Delete sealed segments holding only entries below `sequence`. Returns bytes freed."""
        self._next_read = None
        if self._fd < 0:
            return 0  # closed (a snapshot may be replacing these files): owns nothing to delete
        freed = 0
        doomed = [s for s in self._segments[:-1] if s.last_sequence < sequence]
        if doomed and self.owes_rotation_sync:
            self._pay_rotation_syncs()
        for seg in doomed:
            self._forget(seg)
            with self._os_errors("delete", seg.path):
                seg.path.unlink()
            # One at a time: if a later unlink fails, the list still names only real files.
            self._segments = [s for s in self._segments if s is not seg]
            freed += seg.size
        if freed:
            with self._os_errors("fsync directory", self.wal_dir):
                fsync_dir(self.wal_dir)
        return freed

    def _forget(self, seg: Segment) -> None:
        self._forget_rfd(seg)

    def _forget_rfd(self, seg: Segment) -> None:
        fd = self._rfds.pop(seg.path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self.detach()()

    def detach(self) -> Callable[[], None]:
        """Close the log as the loop sees it, now, with no I/O; returns the rest of closing
        (the fsyncs owed, then closing every fd) to run in a worker thread before the log's
        files are replaced (a snapshot install). From here on appends and reads raise
        WalClosed, retention deletes nothing, and an fsync still running marks nothing."""
        self.generation += 1  # an fsync still running can't mark a closed (or replaced) log
        ok = self._failed is None
        sealed, self._sealed_unsynced = self._sealed_unsynced, []
        wal_dir = self.wal_dir if self._dir_unsynced else None
        self._dir_unsynced = False
        fd, self._fd = self._fd, -1
        active = self._active.path
        rfds = list(self._rfds.values())
        self._rfds.clear()
        space = self.space

        def finish() -> None:
            synced = ok
            try:
                for sfd, path in sealed if synced else ():
                    try:
                        os.fsync(sfd)
                    except OSError:
                        log.exception("space %s: fsync of sealed %s at close failed", space, path)
                        synced = False
                        break
                if synced and wal_dir is not None:
                    try:
                        fsync_dir(wal_dir)
                    except OSError:
                        log.exception("space %s: fsync of %s at close failed", space, wal_dir)
                        synced = False
            finally:
                for sfd, _ in sealed:
                    os.close(sfd)
            if fd >= 0:
                if synced:
                    try:
                        os.fsync(fd)
                    except OSError:
                        log.exception("space %s: fsync of %s at close failed", space, active)
                os.close(fd)
            for rfd in rfds:
                os.close(rfd)

        return finish


class WalStore:
    """Every space's log under one data directory: `<data>/<space>/wal/`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_torn_tail: Callable[[SpaceId, int], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.segment_bytes = segment_bytes
        self._on_torn_tail = on_torn_tail
        self._logs: dict[SpaceId, SpaceLog] = {}
        data_dir.mkdir(parents=True, exist_ok=True)

    def spaces_on_disk(self) -> list[SpaceId]:
        out = []
        for p in sorted(self.data_dir.iterdir()):
            if (p / "wal").is_dir():
                try:
                    out.append(validate_space_id(p.name))
                except ValueError:
                    continue
        return out

    def open(self, space: str) -> SpaceLog:
        sid = validate_space_id(space)
        found = self._logs.get(sid)
        if found is None:
            found = self._logs[sid] = self.build(sid)
        return found

    def build(self, space: SpaceId) -> SpaceLog:
        """Open a space's log without keeping it here (`adopt` does): the blocking part of
        `open` (recovery scan, fsyncs), which a worker thread may run."""
        cb = self._on_torn_tail
        return SpaceLog(
            self.data_dir / space,
            space=space,
            segment_bytes=self.segment_bytes,
            on_torn_tail=(lambda n: cb(space, n)) if cb is not None else None,
        )

    def adopt(self, wal: SpaceLog) -> None:
        """Keep a log `build` opened as its space's log (closing one kept before)."""
        old = self._logs.get(wal.space)
        if old is not None and old is not wal:
            old.close()
        self._logs[wal.space] = wal

    def get(self, space: SpaceId) -> SpaceLog | None:
        return self._logs.get(space)

    def forget(self, space: SpaceId) -> None:
        """Close a space's log so its files can be replaced; reopen later."""
        found = self._logs.pop(space, None)
        if found is not None:
            found.close()

    def detach(self, space: SpaceId) -> Callable[[], None]:
        """`forget`, with the closing's file work returned to run in a worker thread
        (`SpaceLog.detach`); a no-op function when the space has no open log."""
        found = self._logs.pop(space, None)
        return found.detach() if found is not None else lambda: None

    def close(self) -> None:
        for lg in self._logs.values():
            lg.close()
        self._logs.clear()
