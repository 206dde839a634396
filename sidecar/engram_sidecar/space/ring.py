"""The primary's batch ring: shippable entries cut into BATCH frames once, shared by every replica.

Entries are sealed into frames here, once, and every replica stream sends those same bytes. A
batch is sealed at `batch_max_entries` or after `batch_max_delay`, or at once when no stream has
anything in flight, so light load doesn't pay the linger. Every written entry is shippable,
before its fsync (design-notes "Entries ship before they are durable").

Sealing encodes the bytes the write path just appended (`keep`), already CRC'd by their encoder,
rather than reading them back from the WAL and checking them again. A replica further behind
than the ring (catch-up) gets frames encoded from the WAL, where every CRC is checked on read.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from engram_contract.formats.batch import encode_batch
from engram_sidecar.log import epochs as epoch_history
from engram_sidecar.log.wal import Appended, SpaceLog

# Sealed frames kept for replicas to share; a replica further behind re-reads the WAL.
RING_BYTES: Final = 64 * 1024 * 1024
# A batch's entries stop at this many bytes (always at least one entry): what a WAL read returns.
BATCH_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class _Fresh:
    """Entries appended by this primary and not sealed yet, with the log generation they were
    written at: a truncation since (generation moved) means the WAL may no longer hold them."""

    appended: Appended
    generation: int


class BatchRing:
    def __init__(
        self,
        log: SpaceLog,
        *,
        wire_id: bytes,
        batch_max_entries: int,
        batch_max_delay: float,
        low_water: Callable[[], int | None],
    ) -> None:
        self.log = log
        self.wire_id = wire_id
        self.batch_max_entries = batch_max_entries
        self.batch_max_delay = batch_max_delay
        self._low_water = low_water  # the lowest sequence a replica acked; None: no replicas
        self.epoch = 0  # the assignment epoch every frame carries
        self.compress = False
        self.sealed_upto = log.last_sequence
        self._ring: deque[tuple[int, int, bytes]] = deque()  # (first, last, frame)
        self._ring_bytes = 0
        self._fresh: deque[_Fresh] = deque()
        self._fresh_bytes = 0
        self._seal_timer: asyncio.TimerHandle | None = None
        self.inflight: Callable[[], bool] = lambda: False  # set by the peer links
        self.on_sealed: Callable[[], None] = lambda: None
        self.on_batch: Callable[[int], None] = lambda n: None

    def restart(self, log: SpaceLog, sealed_upto: int) -> None:
        """A new epoch or a new log: frames sealed before may not go out, nothing is pending."""
        self.log = log
        self.sealed_upto = sealed_upto
        self._ring.clear()
        self._ring_bytes = 0
        self._drop_fresh()

    def on_truncated(self, keep_upto: int) -> None:
        self.sealed_upto = min(self.sealed_upto, keep_upto)
        self._drop_fresh()

    def keep(self, appended: Appended) -> None:
        """Entries the write path just appended: seal them from these bytes when shippable."""
        if self._low_water() is None:
            return  # nobody to ship to: on_append marks them sealed
        if self._fresh and self._fresh[-1].appended.last + 1 != appended.first:
            self._drop_fresh()
        self._fresh.append(_Fresh(appended, self.log.generation))
        self._fresh_bytes += len(appended.data)
        if self._fresh_bytes > RING_BYTES:
            self._drop_fresh()  # shipping stalls far behind: the WAL has them

    def _drop_fresh(self) -> None:
        self._fresh.clear()
        self._fresh_bytes = 0

    # ---- sealing --------------------------------------------------------------------------

    def on_append(self) -> None:
        """The log grew, or more of it became shippable: seal now, later, or not at all."""
        shippable = self.log.last_sequence
        pending = shippable - self.sealed_upto
        if pending <= 0 or self._low_water() is None:
            if self._low_water() is None:
                self.sealed_upto = shippable
                self._drop_fresh()
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
        shippable = self.log.last_sequence
        while self.sealed_upto < shippable:
            first = self.sealed_upto + 1
            frame, last = self._next_batch(first, shippable)
            self.on_batch(last - self.sealed_upto)
            self._ring.append((first, last, frame))
            self._ring_bytes += len(frame)
            self.sealed_upto = last
        while self._fresh and self._fresh[0].appended.last <= self.sealed_upto:
            self._fresh_bytes -= len(self._fresh.popleft().appended.data)
        self.trim()
        self.on_sealed()

    def _next_batch(self, first: int, upto: int) -> tuple[bytes, int]:
        fresh = self._fresh
        while fresh and (
            fresh[0].appended.last < first or fresh[0].generation != self.log.generation
        ):
            self._fresh_bytes -= len(fresh.popleft().appended.data)
        if fresh and fresh[0].appended.first <= first:
            return self._encode_fresh(first, upto)
        if fresh:
            upto = min(upto, fresh[0].appended.first - 1)
        return self.encode_from(first, upto=upto)

    def _encode_fresh(self, first: int, upto: int) -> tuple[bytes, int]:
        """A frame of entries `first..` from the bytes kept by `keep`, cut as `SpaceLog.read`
        cuts a batch: at most `batch_max_entries`, and `BATCH_BYTES` (at least one entry)."""
        last_wanted = min(upto, first + self.batch_max_entries - 1)
        parts: list[bytes] = []
        size = 0
        seq = first
        for f in self._fresh:
            a = f.appended
            if a.first > seq:
                break  # never: kept runs are contiguous
            i = seq - a.first
            start = a.ends[i - 1] if i else 0
            j = min(a.last, last_wanted) - a.first  # the run's last entry this batch may take
            # Within the byte budget: entries ending at most `room` bytes past `start`.
            room = BATCH_BYTES - size
            fit = bisect.bisect_right(a.ends, start + room, i, j + 1) - 1
            if fit < i:
                if parts:
                    break
                fit = i  # one entry larger than the budget still goes, alone
            end = a.ends[fit]
            parts.append(a.data[start:end])
            size += end - start
            seq = a.first + fit + 1
            if seq > last_wanted or fit < j:
                break
        last = seq - 1
        frame = encode_batch(
            space=self.wire_id,
            epoch=self.epoch,
            prev_epoch=epoch_history.epoch_at(self.log.history, first - 1),
            first_seq=first,
            last_seq=last,
            count=last - first + 1,
            entries=parts[0] if len(parts) == 1 else b"".join(parts),
            compress=self.compress,
        )
        return frame, last

    def encode_from(self, first: int, upto: int | None = None) -> tuple[bytes, int]:
        """A frame of entries from `first`, read back from the WAL (every CRC checked)."""
        r = self.log.read(
            first, max_entries=self.batch_max_entries, max_bytes=BATCH_BYTES, upto=upto
        )
        frame = encode_batch(
            space=self.wire_id,
            epoch=self.epoch,
            prev_epoch=epoch_history.epoch_at(self.log.history, first - 1),
            first_seq=r.first_sequence,
            last_seq=r.last_sequence,
            count=r.count,
            entries=r.data,
            compress=self.compress,
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

    def trim(self) -> None:
        """Drop frames every replica acked, and the oldest past RING_BYTES."""
        low = self._low_water()
        if low is None:
            low = self.sealed_upto
        while self._ring and (self._ring[0][1] <= low or self._ring_bytes > RING_BYTES):
            self._ring_bytes -= len(self._ring.popleft()[2])
