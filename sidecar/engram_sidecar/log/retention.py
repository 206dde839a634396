"""Which sealed segments of a log retention may delete: a floor and a ceiling (issue 6).

Keeps every entry a replica still lacks, and at least `min_entries`; but past `max_bytes` a gone
replica stops pinning the disk: the oldest segments are released and that replica will need a
snapshot. The caller counts and logs what was released.
"""

from __future__ import annotations

from dataclasses import dataclass

from engram_sidecar.log.wal import SpaceLog


@dataclass(frozen=True, slots=True)
class Released:
    freed: int  # bytes deleted
    forced: bool  # past max_bytes, segments a replica still needed went too
    keep_from: int  # the oldest sequence kept (or meant to be)


def release(
    wal: SpaceLog, *, needed_from: int | None, min_entries: int, max_bytes: int
) -> Released:
    """Delete the sealed segments no one needs. `needed_from`: the oldest entry a replica still
    lacks (its acked sequence + 1, the lowest of them), None when no replica waits on this log."""
    keep_from = wal.last_sequence - min_entries + 1
    if needed_from is not None:
        keep_from = min(keep_from, needed_from)
    forced = False
    if wal.size_bytes > max_bytes:
        # Release the oldest sealed segments until the log fits under the ceiling.
        size, cut = wal.size_bytes, keep_from
        for seg in wal.segments[:-1]:
            if size <= max_bytes:
                break
            size -= seg.size
            cut = max(cut, seg.last_sequence + 1)
        forced = cut > keep_from
        keep_from = cut
    freed = wal.delete_before(keep_from) if keep_from > wal.first_sequence else 0
    return Released(freed, forced, keep_from)
