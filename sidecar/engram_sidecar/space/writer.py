"""The one write path of a space: append to the log, then wait as the fsync policy says.

The primary's writes (`Space.write`) and the replica's applied batches (`Space.apply`) both
append here and settle here (`GroupCommit.settle`: until an fsync covers the write under
`always`, not at all otherwise). A storage error on either path becomes the space's storage
state, logged once per change and counted by the node (`on_storage_change`); a write completed
as the policy promises clears it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engram_contract.formats.entry import CheckedRun, Record
from engram_contract.ids import NodeName, SpaceId
from engram_sidecar.errors import EngramError
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.storage_health import StorageHealth
from engram_sidecar.log.wal import Appended, SpaceLog

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Written:
    """A write to settle: `last` is the sequence it waits for; `generation` the log's right
    after the append (a truncation since cut it: WalTruncated, never an acknowledgement)."""

    last: int
    generation: int


class SpaceWriter:
    def __init__(
        self, wal: SpaceLog, commit: GroupCommit, *, space: SpaceId, node: NodeName
    ) -> None:
        self.log = wal
        self.commit = commit
        self.space = space
        self.node = node
        # The disk's state for this space (ENOSPC, EIO...): shown in status and metrics.
        self.storage = StorageHealth()
        self.on_storage_change: Callable[[str], None] = lambda state: None

    def replace(self, wal: SpaceLog, commit: GroupCommit) -> GroupCommit:
        """A snapshot was installed: write to its log from now on. Returns the old commit."""
        old, self.log, self.commit = self.commit, wal, commit
        return old

    @property
    def promised_sequence(self) -> int:
        """What this node holds as far as its fsync policy promises: durable under `always`,
        written otherwise (with `none` nothing is ever synced, yet the entries are held)."""
        return self.commit.promised_sequence

    @property
    def waits(self) -> bool:
        """Whether a write counts only once an fsync covers it (fsync `always`)."""
        return self.commit.waits

    # ---- appending ------------------------------------------------------------------------

    def append(self, records: Iterable[Record], *, epoch: int) -> Appended:
        """A primary's write: encode and append entries at `epoch` (not yet settled)."""
        try:
            done = self.log.append_entries(records, epoch=epoch)
        except (EngramError, OSError) as err:
            self.note_error(err)
            raise
        self.commit.after_append()
        if not self.waits:
            self.clear_error()
        return done

    def append_timed(
        self, records: Iterable[tuple[int, bytes]], *, epoch: int, timestamps: Sequence[int]
    ) -> Appended:
        """`append`, with each entry's timestamp kept as given (`SpaceLog.append_timed`): the
        tail of Engram's own WAL keeps Engram's."""
        try:
            done = self.log.append_timed(records, epoch=epoch, timestamps=timestamps)
        except (EngramError, OSError) as err:
            self.note_error(err)
            raise
        self.commit.after_append()
        if not self.waits:
            self.clear_error()
        return done

    def append_stored(self, data: bytes, checked: CheckedRun | None = None) -> tuple[int, int]:
        """A replica's write: entries as the primary stored them, `checked` by the frame
        decoder (`SpaceLog.append_stored`). Returns (first, last)."""
        try:
            first, last = self.log.append_stored(data, checked)
        except (EngramError, OSError) as err:
            self.note_error(err)
            raise
        self.commit.after_append()
        if not self.waits:
            self.clear_error()
        return first, last

    def written(self, last: int) -> Written:
        """What to settle for a write that ended at `last`, taken right after it."""
        return Written(last, self.log.generation)

    async def settle(self, w: Written) -> None:
        """Wait as the fsync policy says: until an fsync covers `w` under `always`, not at all
        otherwise. Raises StorageError (fsync failed) or WalTruncated (`w` was cut meanwhile)."""
        if not self.waits:
            return
        try:
            await self.commit.settle(w.last, generation=w.generation)
        except EngramError as err:
            self.note_error(err)
            raise
        self.clear_error()

    async def stop(self) -> None:
        """Stop the group commit (its interval fsyncs, and wait for one in flight)."""
        await self.commit.stop()

    async def sync_all(self) -> None:
        """Until everything written is durable, whatever the policy (a fence's answer)."""
        await self.commit.wait_durable(self.log.last_sequence)

    # ---- the log's other writes -----------------------------------------------------------

    def begin_epoch(self, epoch: int) -> None:
        self.log.begin_epoch(epoch)

    def forget_unwritten_epochs(self) -> None:
        try:
            self.log.forget_unwritten_epochs()
        except (EngramError, OSError) as err:
            self.note_error(err)
            raise

    def truncate_after(self, keep_upto: int) -> int:
        return self.log.truncate_after(keep_upto)

    # ---- disk health ----------------------------------------------------------------------

    def note_error(self, err: BaseException) -> None:
        """A disk failure: logged once per change of state, counted, shown in status."""
        if self.storage.record(err):
            log.error("space %s: storage failed (%s): %s", self.space, self.storage.state, err)
            self.on_storage_change(self.storage.state)

    def clear_error(self) -> None:
        if self.storage.clear():
            log.info("space %s: storage works again", self.space)
            self.on_storage_change("ok")
