"""Reading one space's Engram WAL directory in Engram's file order, from a position.

`Follower` keeps the file being followed open, so a file Engram deletes (its compaction deletes
every older file) can still be read to its end through the open descriptor. It reads, it never
writes: the descriptor is read-only, and `fsync` on it makes what Engram wrote durable before
the tailer ships it. The decisions are small pure functions (`next_file`, `looks_compacted`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engram_contract.formats import engram_wal
from engram_contract.formats.entry import EntryType

READ_BYTES: Final = 1024 * 1024


def wal_files(names: list[str]) -> list[str]:
    """Engram's WAL files among `names`, in Engram's order (`WalReader::scan_all` sorts names)."""
    return sorted(n for n in names if engram_wal.FILE_NAME.match(n))


def next_file(files: list[str], current: str) -> str | None:
    """The file after `current` in Engram's order ("" = before the first), or None."""
    later = [f for f in files if f > current]
    return later[0] if later else None


def looks_compacted(first: engram_wal.EngramEntry | None) -> bool:
    """Shaped like `compact_from_memory` output: it starts with an EpisodeStore at Engram
    sequence 0 (it numbers the episodes it rewrites from 0). Necessary, not sufficient."""
    return first is not None and first.sequence == 0 and first.entry_type == EntryType.EPISODE_STORE


@dataclass(frozen=True, slots=True)
class Read:
    scan: engram_wal.ScanResult
    size: int  # the file's size when read


class Follower:
    def __init__(self, wal_dir: Path) -> None:
        self.dir = wal_dir
        self.name = ""
        self._fd = -1
        self.inode = 0

    def listing(self) -> list[str]:
        try:
            return os.listdir(self.dir)
        except FileNotFoundError:
            return []

    def open(self, name: str) -> bool:
        """Follow `name` from now on; False when it does not exist (any more)."""
        self.close()
        try:
            fd = os.open(self.dir / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self._fd, self.name, self.inode = fd, name, os.fstat(fd).st_ino
        return True

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def read(self, offset: int, *, max_entries: int) -> Read:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, min(READ_BYTES, max(0, size - offset)), offset)
        res = engram_wal.scan(data, base=offset, max_entries=max_entries)
        if res.stop is engram_wal.Stop.TORN and not res.entries and len(data) == READ_BYTES:
            # One entry larger than a read: read it whole.
            data = os.pread(self._fd, size - offset, offset)
            res = engram_wal.scan(data, base=offset, max_entries=max_entries)
        return Read(res, size)

    def first_entry(self, name: str) -> engram_wal.EngramEntry | None:
        try:
            with open(self.dir / name, "rb") as f:
                data = f.read(READ_BYTES)
        except FileNotFoundError:
            return None
        res = engram_wal.scan(data, max_entries=1)
        return res.entries[0] if res.entries else None

    def size_of(self, name: str) -> int | None:
        try:
            return (self.dir / name).stat().st_size
        except FileNotFoundError:
            return None

    def fsync(self) -> None:
        """Make what Engram wrote durable before it is shipped (Engram fsyncs per batch by
        default, but not under `FsyncMode::Timer` or `None`)."""
        os.fsync(self._fd)

    def unlinked(self) -> bool:
        """Engram deleted the followed file (it is read through the open descriptor)."""
        return os.fstat(self._fd).st_nlink == 0

    def replaced(self) -> bool:
        """The followed name now names another file: a rename replaced it (compaction in the
        same second as the writer's file gets the same name)."""
        try:
            return (self.dir / self.name).stat().st_ino != self.inode
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self.name = ""
        self.inode = 0
