"""Group commit: concurrent appends to one space share one fsync.

Appends write to the page cache on the event loop (microseconds, and ordered for free); a writer
then waits until an fsync covers its last sequence. At most one fsync per log runs at a time, off
the loop (`fsync_engine`: kernel AIO or a worker thread), on a duplicate fd; whatever was written
while it ran is covered by the next one.
So with 64 concurrent writers the disk sees a handful of fsyncs, not 64.

Policies: `always` (an append returns once durable), `interval` (a background task fsyncs every
`interval` seconds; appends return once written), `none` (fsync only at rotation and close).

A truncation may run on the loop while an fsync runs in its thread. The fsync's result then
counts for nothing (the log's generation moved on), and a writer whose entries the truncation
cut gets WalTruncated instead of an acknowledgement, even if new entries later reuse its
sequences and become durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from engram_sidecar.errors import StorageError, WalIOError, WalTruncated
from engram_sidecar.log import durable_marks
from engram_sidecar.log.fsync_engine import Fsyncer, ThreadFsyncer
from engram_sidecar.log.wal import FsyncPolicy, SpaceLog

log = logging.getLogger(__name__)


class GroupCommit:
    def __init__(
        self,
        wal: SpaceLog,
        *,
        policy: FsyncPolicy = "always",
        interval: float = 0.05,
        fsync: Callable[[int], None] | None = None,
        engine: Fsyncer | None = None,
    ) -> None:
        self.wal = wal
        self.policy = policy
        self.interval = interval
        # Where the fsyncs run (fsync_engine.py): the node's engine, shared by its logs. A test
        # that injects `fsync` (to hold one open) gets it run in a worker thread; None there:
        # os.fsync, looked up at each call.
        self.engine: Fsyncer = (
            engine if engine is not None and fsync is None else ThreadFsyncer(fsync)
        )
        self._inflight: asyncio.Future[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.fsyncs = 0

    def start(self) -> None:
        if self.policy == "interval" and self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                await self._inflight

    @property
    def waits(self) -> bool:
        """Whether a write counts only once an fsync covers it (`always`), so `settle` waits."""
        return self.policy == "always"

    @property
    def promised_sequence(self) -> int:
        """The last entry the log holds as far as its policy promises: the last durable one
        under `always`, the last written otherwise (with `none` nothing is ever synced, yet the
        entries are held). What a replica may acknowledge, and what a primary may ship."""
        if self.waits:
            return self.wal.durable_sequence
        return self.wal.last_sequence

    async def settle(self, sequence: int, *, generation: int | None = None) -> None:
        """Wait as the policy says for a write that ended at `sequence`: until an fsync covers
        it under `always` (`wait_durable`, same arguments and errors), not at all otherwise."""
        if self.waits:
            await self.wait_durable(sequence, generation=generation)

    async def append(self, records: Iterable[tuple[int, bytes]], *, epoch: int) -> tuple[int, int]:
        """Append, then settle: for tools and benchmarks that drive a bare log. The sidecar
        writes through `engram_sidecar.space.writer.SpaceWriter`, which settles the same way."""
        first, last = self.wal.append(records, epoch=epoch)
        self.after_append()
        await self.settle(last)
        return first, last

    def after_append(self) -> None:
        """An append rotated the log: under `none` and `interval`, pay its fsyncs (the sealed
        segment, the directory) soon, in the background, off the loop. Under `always` the
        next settle pays them."""
        if self.waits or self._inflight is not None or not self.wal.owes_rotation_sync:
            return
        self._inflight = asyncio.ensure_future(self._sync_once())
        self._inflight.add_done_callback(self._background_done)

    def _background_done(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("space %s: fsync after rotation failed: %s", self.wal.space, fut.exception())

    async def wait_durable(self, sequence: int, *, generation: int | None = None) -> None:
        """Return once `sequence` is durable.

        Raises WalIOError (StorageError) if the fsync failed, and WalTruncated if a truncation
        cut `sequence` while waiting: whatever holds that sequence now is not what was written.
        `generation`: the log's generation right after the append, for a caller that starts
        waiting later (a task); by default, the generation now.
        """
        if generation is None:
            generation = self.wal.generation
        while True:
            kept = self.wal.cut_since(generation)
            if kept is not None and kept < sequence:
                raise WalTruncated(
                    f"space {self.wal.space}: entry {sequence} was cut (log truncated after "
                    f"{kept}) before an fsync covered it; it is not durable and must not be acked"
                )
            if self.wal.durable_sequence >= sequence:
                return
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(self._sync_once())
            fut = self._inflight
            await asyncio.shield(fut)

    async def _sync_once(self) -> None:
        try:
            ticket = self.wal.sync_handle()
            covered = None
            if durable_marks.enabled:  # test-only (chaos power cuts)
                covered = durable_marks.sizes([*ticket.sealed, (ticket.fd, ticket.path)])
                if durable_marks.delay:
                    await asyncio.sleep(durable_marks.delay)
            try:
                await self.engine.run(ticket, space=self.wal.space)
            except StorageError as err:
                self.wal.fail(err)
                raise
            self.fsyncs += 1
            if covered is not None:  # test-only: before anything counts as durable
                durable_marks.note(ticket.path.parent, covered)
            self.wal.mark_durable(ticket)
        finally:
            self._inflight = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.wal.durable_sequence < self.wal.last_sequence:
                try:
                    await self.wait_durable(self.wal.last_sequence)
                except WalTruncated:
                    continue  # the next tick syncs what the log holds now
                except WalIOError:
                    log.exception("space %s: interval fsync failed", self.wal.space)
                    return
