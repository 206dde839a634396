"""The tail of one space's Engram WAL on the node that leads the space (docs/engram.md).

Each step reads the complete entries after the cursor, fsyncs Engram's file, appends them to the
space's log with this project's sequence and epoch (Engram's type, timestamp and payload kept
byte for byte), waits until they are durable, then stores the cursor. Engram's files are taken
in Engram's order; a file is finished once it is drained and a newer one has data (or Engram
deleted it). A torn tail waits; a dead writer's torn tail (a newer file has data) is counted and
left behind, as Engram's own reader does. A corrupt entry stops the space's tail with an error
(state `stopped`, a metric), never skipped. A file that is compaction output is not shipped: its
entries restate what was shipped from the files it replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from engram_contract.formats import engram_wal
from engram_sidecar.errors import EngramError
from engram_sidecar.metrics import Metrics
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.membership import NotWritable
from engram_sidecar.tail import cursor as cursors
from engram_sidecar.tail.cursor import Cursor, CursorError
from engram_sidecar.tail.follower import Follower, Read, looks_compacted, next_file, wal_files
from engram_sidecar.tail.watch import Watch

log = logging.getLogger(__name__)

MAX_ENTRIES: Final = 2000  # per append: one fsync of Engram's file and one of ours
CORRUPT_RECHECKS: Final = 3  # re-reads, `recheck_delay` apart, before a bad entry stops the tail
COMPACTION_GRACE: Final = 0.5  # seconds for Engram to delete the files its compaction replaced


class TailStopped(Exception):
    """The tail of this space can't go on without an operator (docs/engram.md, "Errors")."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


class SpaceTail:
    def __init__(
        self,
        sp: Space,
        *,
        engram_root: Path,
        metrics: Metrics,
        watch: Watch,
        recheck_delay: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sp = sp
        self.follower = Follower(engram_root / sp.id / "wal")
        self.metrics = metrics
        self.watch = watch
        self.recheck_delay = recheck_delay
        self.clock = clock
        self.cursor: Cursor | None = None
        self.state = "starting"
        self.error: str | None = None
        self.torn_left = 0  # bytes of dead writers' torn tails left behind

    # ---- view -----------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        c = self.cursor
        return {
            "state": self.state,
            "error": self.error,
            "watch": self.watch.mode,
            "file": c.file if c else None,
            "offset": c.offset if c else None,
            "sequence": c.sequence if c else None,
            "engram_sequence": c.engram_sequence if c else None,
            "compacted_files": list(c.compacted) if c else [],
            "torn_bytes_left": self.torn_left,
        }

    def stop(self, err: TailStopped) -> None:
        self.state, self.error = "stopped", str(err)
        self.metrics.tail_errors.labels(self.sp.id, err.kind).inc()
        self.metrics.tail_stopped.labels(self.sp.id).set(1)
        log.error("space %s: tail of Engram's WAL stopped: %s", self.sp.id, err)

    def close(self) -> None:
        self.follower.close()

    # ---- start: where to resume -----------------------------------------------------------

    def _store(self) -> None:
        assert self.cursor is not None
        cursors.store(self.sp.path, self.cursor, space=self.sp.id)

    def reconcile(self) -> None:
        """Find where to resume: the stored cursor, rolled forward over entries appended after
        it (a crash between the append and the cursor's replacement) or back to the log's end
        (the log was cut); or, with no cursor, Engram's first file (empty log) or the current end
        of Engram's files (the log holds entries from elsewhere: a promoted replica)."""
        try:
            c = cursors.load(self.sp.path)
        except CursorError as err:
            raise TailStopped(str(err), "cursor") from err
        last = self.sp.log.last_sequence
        files = wal_files(self.follower.listing())
        if c is None:
            c = Cursor(sequence=last)
            if last > 0 and files:
                c.file, c.offset = files[-1], self.follower.size_of(files[-1]) or 0
                log.warning(
                    "space %s: the log holds %d entries and no tail cursor; following Engram's "
                    "files from their current end (%s at %d)",
                    self.sp.id,
                    last,
                    c.file,
                    c.offset,
                )
        elif c.sequence > last:
            c.drop_after(last)
            self._locate(c, last)
        self.cursor = c
        if c.sequence < last:
            self._roll_forward(last)
        self._store()
        if c.file:
            self.follower.open(c.file)

    def _locate(self, c: Cursor, sequence: int) -> None:
        """Point `c` just past the Engram entry our `sequence` came from (the log was cut)."""
        run = c.run_of(sequence)
        if run is None:
            c.file, c.offset, c.engram_sequence = "", 0, -1
            c.runs.clear()
            return
        skip = sequence - run.sequence + 1
        c.file, c.offset = run.file, run.offset
        if self.follower.open(run.file):
            r = self.follower.read(run.offset, max_entries=skip)
            if len(r.scan.entries) == skip:
                c.offset = r.scan.end
                c.engram_sequence = r.scan.entries[-1].sequence
        log.warning(
            "space %s: log cut after %d; tail resumes at %s:%d",
            *(self.sp.id, sequence, c.file, c.offset),
        )

    def _roll_forward(self, last: int) -> None:
        """Entries after the cursor are in the log: they are the next entries of the cursor's
        file (one append is one read of one file). Match each, and move the cursor over them."""
        c = self.cursor
        assert c is not None
        name = c.file or next(iter(wal_files(self.follower.listing())), "")
        have = self.sp.log.read_entries(c.sequence + 1, limit=last - c.sequence)
        if name and not self.follower.open(name):
            # Engram deleted the file meanwhile (its compaction at a restart): there is nothing
            # left to resume in it. The log's extra entries were its next ones.
            c.note(
                sequence=c.sequence + 1,
                file=name,
                offset=c.offset,
                end=c.offset,
                engram_sequence=c.engram_sequence + 1,
            )
            c.sequence, c.engram_sequence = last, c.engram_sequence + (last - c.sequence)
            log.warning(
                "space %s: Engram's %s is gone; the log's entries up to %d came from it",
                self.sp.id,
                name,
                last,
            )
            return
        if not name:
            raise TailStopped(
                f"the log holds entries {c.sequence + 1}..{last} after the tail cursor, and "
                "Engram wrote no file they could come from",
                "cursor",
            )
        r = self.follower.read(c.offset, max_entries=len(have))
        for mine, theirs in zip(have, r.scan.entries, strict=False):
            same = (
                mine.entry_type == theirs.entry_type
                and mine.timestamp_ns == theirs.timestamp_ns
                and mine.payload == theirs.payload
            )
            if not same:
                break
            c.note(
                sequence=mine.sequence,
                file=name,
                offset=theirs.offset,
                end=theirs.end,
                engram_sequence=theirs.sequence,
            )
        if c.sequence != last:
            raise TailStopped(
                f"the log holds entries {c.sequence + 1}..{last} that are not the next entries "
                f"of Engram's {name} at offset {c.offset}; writes must come from Engram's files "
                "only in tail mode",
                "cursor",
            )
        log.info(
            "space %s: tail cursor rolled forward to %d (%s:%d)", self.sp.id, last, name, c.offset
        )

    # ---- one step -------------------------------------------------------------------------

    async def step(self) -> bool:
        """Ship what is there, or move to the next file. True when anything changed."""
        if self.cursor is None:
            self.reconcile()
        c = self.cursor
        assert c is not None
        if not self.follower.is_open:
            return await self._advance(None)
        r = self.follower.read(c.offset, max_entries=MAX_ENTRIES)
        if r.scan.entries:
            await self._ship(r)
            return True
        if r.scan.stop is engram_wal.Stop.CORRUPT:
            await self._confirm_corrupt(r)
            return True
        if self.follower.replaced():
            self._compacted_in_place()
            return True
        return await self._advance(r)

    async def _ship(self, r: Read) -> None:
        sp, c = self.sp, self.cursor
        assert c is not None
        entries = r.scan.entries
        sp.membership.check_writable()  # NotWritable: the caller waits and retries
        self.state, self.error = "following", None
        self.follower.fsync()
        epoch = sp.membership.accepted_epoch
        done = sp.writer.append_timed(
            [(e.entry_type, e.payload) for e in entries],
            epoch=epoch,
            timestamps=[e.timestamp_ns for e in entries],
        )
        written = sp.writer.written(done.last)
        sp.ring.keep(done)
        sp.ring.on_append()  # shipped as written, like any write (Space.write)
        sp.on_appended(done.last)
        if sp.writer.waits:
            await sp.writer.settle(written)
        else:
            await sp.writer.sync_all()
        for i, e in enumerate(entries):
            c.note(
                sequence=done.first + i,
                file=self.follower.name,
                offset=e.offset,
                end=e.end,
                engram_sequence=e.sequence,
            )
        await asyncio.to_thread(self._store)  # its fsyncs off the loop the streams share
        self.metrics.tail_entries.labels(sp.id).inc(len(entries))
        age = (time.time_ns() - entries[-1].timestamp_ns) / 1e9
        self.metrics.tail_delay.labels(sp.id).observe(max(0.0, age))

    async def _confirm_corrupt(self, r: Read) -> None:
        """A bad entry may be one being written as we read it: fsync, re-read, and only stop
        when it stays bad."""
        c = self.cursor
        assert c is not None
        for _ in range(CORRUPT_RECHECKS):
            await asyncio.sleep(self.recheck_delay)
            self.follower.fsync()
            again = self.follower.read(c.offset, max_entries=MAX_ENTRIES)
            if again.scan.stop is not engram_wal.Stop.CORRUPT or again.scan.entries:
                return
        raise TailStopped(
            f"Engram's {self.follower.name} has a bad entry at offset {c.offset}: "
            f"{r.scan.reason}. Entries after it are not shipped; see docs/engram.md, 'Errors'",
            "corrupt",
        )

    def _compacted_in_place(self) -> None:
        """The followed name was replaced by a rename: compaction output under the same name."""
        c = self.cursor
        assert c is not None
        name = self.follower.name
        self.follower.open(name)
        size = self.follower.size_of(name) or 0
        self._take_compacted(name, size)

    def _take_compacted(self, name: str, size: int) -> None:
        c = self.cursor
        assert c is not None
        c.file, c.offset, c.engram_sequence = name, size, -1
        c.compacted = [*c.compacted, name][-64:]
        self.metrics.tail_compactions.labels(self.sp.id).inc()
        log.info("space %s: %s is Engram's compaction output; not shipped again", self.sp.id, name)
        self._store()

    async def _advance(self, r: Read | None) -> bool:
        """Move to the next file when the current one is finished."""
        c = self.cursor
        assert c is not None
        names = self.follower.listing()
        self.watch.note_listing(names)
        files = wal_files(names)
        nxt = next_file(files, c.file)
        if nxt is None:
            return False
        current_gone = not self.follower.is_open or self.follower.unlinked()
        if not current_gone and not self.follower.size_of(nxt):
            return False  # the current file may still be written: the next one has no data
        if r is not None and r.scan.stop is engram_wal.Stop.TORN:
            torn = r.size - c.offset
            self.torn_left += torn
            self.metrics.tail_torn_bytes.labels(self.sp.id).inc(torn)
            log.warning(
                "space %s: %d bytes of a torn entry end %s (its writer is gone: %s exists); "
                "left behind, as Engram's reader does",
                self.sp.id,
                torn,
                c.file,
                nxt,
            )
        if c.file and not self.follower.is_open:
            log.warning(
                "space %s: Engram's %s, where the tail stood, is gone; moving to %s",
                self.sp.id,
                c.file,
                nxt,
            )
        if c.file and await self._is_compaction(nxt):
            self.follower.open(nxt)
            self._take_compacted(nxt, self.follower.size_of(nxt) or 0)
            return True
        self.follower.open(nxt)
        c.file, c.offset, c.engram_sequence = nxt, 0, -1
        self._store()
        return True

    async def _is_compaction(self, name: str) -> bool:
        """Engram's compaction renames `name.tmp` to `name`, then deletes every other `.log`
        (`compact_from_memory`). Proof: the rename was seen, or the file is shaped like its
        output and every older file is gone, the followed one included."""
        if name in self.watch.compaction_renames:
            return True
        if not looks_compacted(self.follower.first_entry(name)):
            return False
        deadline = self.clock() + COMPACTION_GRACE
        while True:
            gone = not self.follower.is_open or self.follower.unlinked()
            older = [f for f in wal_files(self.follower.listing()) if f < name]
            if gone and not older:
                return True
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.02)


async def run_step(tail: SpaceTail) -> bool:
    """One step, with the tail's errors turned into its state. True when anything changed."""
    if tail.state == "stopped":
        return False
    try:
        return await tail.step()
    except NotWritable as err:
        tail.state = "waiting"
        tail.error = err.reason
        return False
    except TailStopped as err:
        tail.stop(err)
        return False
    except (EngramError, OSError) as err:
        # A failed append or fsync: find the position again from the cursor and the log.
        tail.error = f"{err}"
        tail.cursor = None
        tail.follower.close()
        log.warning("space %s: tail: %s", tail.sp.id, err)
        return False
