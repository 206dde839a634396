"""Replica side of snapshot catch-up: build a log next to the live one, then swap it in.

The snapshot is written to `<space>/snapshot.tmp/` (its own `wal/` and `epochs.json`) while the
live log keeps serving. Installing is: fsync, write the COMPLETE marker, move the live `wal/` to
`wal.old/`, move the snapshot's `wal/` into place, replace `epochs.json`, delete the leftovers.
`recover()` runs before a space's log is opened: with the marker it finishes an interrupted
install; without it, it deletes the partial snapshot and restores `wal.old/` if needed. So a
partial snapshot is never served as if complete.

Every failing OS call raises StorageError (path, errno), so a full disk during catch-up reads as
a storage problem, not as a broken connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from engram_contract.formats.entry import CheckedRun
from engram_contract.ids import SpaceId
from engram_sidecar.errors import SequenceError, StorageError
from engram_sidecar.log import epochs as epoch_history
from engram_sidecar.log.segment import fsync_dir, write_all
from engram_sidecar.log.wal import SpaceLog

log = logging.getLogger(__name__)

TMP = "snapshot.tmp"
MARKER = "COMPLETE"


@contextlib.contextmanager
def _os_errors(op: str, path: Path, space: str = "") -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise StorageError(op, path, err, space=space) from err


class SnapshotBuilder:
    """Accumulates one snapshot of `first..last` for a space, off to the side."""

    def __init__(
        self,
        space_dir: Path,
        *,
        space: SpaceId,
        first: int,
        last: int,
        epoch: int,
        history: epoch_history.History,
        segment_bytes: int,
    ) -> None:
        self.space_dir = space_dir
        self.first, self.last, self.epoch = first, last, epoch
        self.dir = space_dir / TMP
        discard(space_dir)
        with _os_errors("create", self.dir, space):
            self.dir.mkdir(parents=True)
        epoch_history.store(self.dir / "epochs.json", history, space=space)
        self.log = SpaceLog(
            self.dir, space=space, segment_bytes=segment_bytes, first_sequence=first
        )

    def append(self, data: bytes, checked: CheckedRun | None = None) -> int:
        """Append a chunk's entries; `checked` as for `SpaceLog.append_stored` (chunks arrive
        through `Batch.from_frame`, which checked them)."""
        _, last = self.log.append_stored(data, checked)
        return last

    def durable(self) -> int:
        return self.log.sync()

    def finish(self) -> None:
        """Check completeness, make it durable and mark it complete. Raises SequenceError."""
        if self.log.first_sequence != self.first or self.log.last_sequence != self.last:
            raise SequenceError(
                f"snapshot holds {self.log.first_sequence}..{self.log.last_sequence}, "
                f"expected {self.first}..{self.last}"
            )
        self.log.sync()
        self.log.close()
        marker = self.dir / MARKER
        with _os_errors("write", marker, self.log.space):
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, f"{self.first} {self.last}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.dir)

    def abandon(self) -> None:
        self.log.close()
        discard(self.space_dir)


def discard(space_dir: Path) -> None:
    tmp = space_dir / TMP
    if tmp.exists() and not (tmp / MARKER).exists():
        with _os_errors("delete", tmp):
            shutil.rmtree(tmp)


def install(space_dir: Path) -> None:
    """Swap a COMPLETE snapshot in for the live log (the live log must be closed)."""
    tmp = space_dir / TMP
    if not (tmp / MARKER).exists():
        raise SequenceError(f"{tmp}: no complete snapshot to install")
    with _os_errors("install snapshot into", space_dir):
        _swap_in(space_dir, tmp)


def _swap_in(space_dir: Path, tmp: Path) -> None:
    live, old = space_dir / "wal", space_dir / "wal.old"
    if live.exists() and (tmp / "wal").exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(live, old)
        fsync_dir(space_dir)
    if (tmp / "wal").exists():
        os.replace(tmp / "wal", live)
    if (tmp / "epochs.json").exists():
        os.replace(tmp / "epochs.json", space_dir / "epochs.json")
    fsync_dir(space_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(space_dir)


def recover(space_dir: Path) -> str | None:
    """Finish or undo an interrupted snapshot before the space's log is opened."""
    tmp, live, old = space_dir / TMP, space_dir / "wal", space_dir / "wal.old"
    if (tmp / MARKER).exists():
        install(space_dir)
        return "finished installing a complete snapshot"
    said = None
    with _os_errors("recover snapshot state of", space_dir):
        if tmp.exists():
            shutil.rmtree(tmp)
            said = "discarded a partial snapshot"
        if old.exists():
            if live.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, live)
                said = "restored the log a failed snapshot install had moved"
            fsync_dir(space_dir)
    if said:
        log.warning("%s: %s", space_dir, said)
    return said
