"""A replica's log, written again as Engram WAL files that an Engram server can start from.

On a replica with `engram_data_root`, every entry the space's log holds durably is appended to
`<engram_data_root>/<space>/wal/wal-{unix_seconds:016x}.log` exactly as the log stores it: that
is Engram's layout, with this project's sequence in Engram's sequence field and the epoch in the
first 8 of Engram's reserved bytes (covered by Engram's header CRC, ignored by its reader).
Engram's recovery (`WalReader::scan_all`) sorts every entry of every file by sequence, and ours
are unique and rising, so it replays them in the log's order. Type, timestamp and payload are the
primary's, byte for byte.

The mirror's position is `<data>/<space>/engram-mirror.json` (file, offset, sequence), replaced
after each fsync of the file. On start a mirror file longer than the stored offset is cut back
to it (a write the crash interrupted), so Engram never meets a torn entry there. When the log is
cut (a deposed primary rejoining), the mirror is cut to match; entries a snapshot skipped (older
than the primary's retention) can't be written and are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engram_contract.formats import engram_wal
from engram_sidecar.log.segment import fsync_dir, fsync_file, replace_atomically, write_all
from engram_sidecar.metrics import Metrics
from engram_sidecar.space.hosted import Space
from engram_sidecar.tail.cursor import FILE as TAIL_CURSOR
from engram_sidecar.tail.follower import wal_files

log = logging.getLogger(__name__)

FILE: Final = "engram-mirror.json"

MAX_ENTRIES: Final = 20_000  # per step: one write, one fsync, one position file
MAX_BYTES: Final = 8 * 1024 * 1024


@dataclass
class MirrorState:
    file: str = ""
    offset: int = 0
    sequence: int = 0  # the last entry written to `file`


def load(space_dir: Path) -> MirrorState:
    try:
        raw = json.loads((space_dir / FILE).read_bytes())
        return MirrorState(str(raw["file"]), int(raw["offset"]), int(raw["sequence"]))
    except FileNotFoundError:
        return MirrorState()
    except (OSError, ValueError, KeyError, TypeError) as err:
        # The mirror is rebuilt from the log, never trusted blindly: start a new file.
        log.warning("%s: unreadable (%s); writing a new mirror file", space_dir / FILE, err)
        return MirrorState()


class Mirror:
    def __init__(self, sp: Space, *, engram_root: Path, metrics: Metrics) -> None:
        self.sp = sp
        self.dir = engram_root / sp.id / "wal"
        self.metrics = metrics
        self.state: MirrorState | None = None
        self._generation = -1
        self.skipped = 0  # entries the log never held here (a snapshot started after them)
        self.error: str | None = None

    def view(self) -> dict[str, Any]:
        s = self.state
        return {
            "state": "mirroring",
            "error": self.error,
            "file": s.file if s else None,
            "offset": s.offset if s else None,
            "sequence": s.sequence if s else None,
            "skipped_entries": self.skipped,
        }

    def _path(self) -> Path:
        assert self.state is not None
        return self.dir / self.state.file

    def _set_aside_own_files(self) -> None:
        """This node led the space in tail mode (its tail cursor is here) and follows another
        primary now: its Engram files hold Engram's own writes, a divergent tail included.
        Move them aside, whole, to `wal.deposed-<unix seconds>/` and mirror the log (cut to the
        fork point, then the new primary's entries) from its start: an Engram restarted here
        recovers exactly the replicated log. The tail cursor goes last: it marks the move."""
        cursor = self.sp.path / TAIL_CURSOR
        if not cursor.exists():
            return
        names = wal_files(os.listdir(self.dir)) if self.dir.is_dir() else []
        if names:
            aside = self.dir.parent / f"wal.deposed-{int(time.time())}"
            aside.mkdir(exist_ok=True)
            for n in names:
                os.replace(self.dir / n, aside / n)
            fsync_dir(aside)
            fsync_dir(self.dir)
            log.warning(
                "space %s: this node's own Engram files (%d) moved to %s; the Engram container "
                "here must restart to recover the replicated log (docs/engram.md)",
                self.sp.id,
                len(names),
                aside,
            )
        for stale in (self.sp.path / FILE, cursor):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        fsync_dir(self.sp.path)

    def _open(self) -> None:
        """Load the position; cut back a mirror file a crash left longer than it."""
        self._set_aside_own_files()
        s = load(self.sp.path)
        if s.file:
            try:
                size = (self.dir / s.file).stat().st_size
            except FileNotFoundError:
                # Engram compacted it away (it started here): what it held is in Engram's
                # own files now. Go on in a new file.
                s = MirrorState(sequence=s.sequence)
            else:
                if size > s.offset:
                    os.truncate(self.dir / s.file, s.offset)
                    log.warning("space %s: cut %s back to %d", self.sp.id, s.file, s.offset)
                elif size < s.offset:
                    log.warning(
                        "space %s: %s is shorter than the mirror wrote; new file",
                        self.sp.id,
                        s.file,
                    )
                    s = MirrorState(sequence=s.sequence)
        self.state = s
        self._generation = self.sp.log.generation

    def _store(self) -> None:
        assert self.state is not None
        s = self.state
        data = json.dumps({"file": s.file, "offset": s.offset, "sequence": s.sequence}).encode()
        replace_atomically(self.sp.path / FILE, data, space=self.sp.id)

    def _cut(self, keep_upto: int) -> None:
        """The log was cut after `keep_upto`: cut the mirror file to match."""
        s = self.state
        assert s is not None
        if s.sequence <= keep_upto:
            return
        if s.file:
            data = self._path().read_bytes()
            end = 0
            for e in engram_wal.scan(data).entries:
                if e.sequence > keep_upto:
                    break
                end = e.end
            os.truncate(self._path(), end)
            fsync_file(self._path())
            s.offset = end
        s.sequence = keep_upto
        self._store()
        log.info("space %s: Engram mirror cut after %d", self.sp.id, keep_upto)

    def _new_file(self) -> None:
        s = self.state
        assert s is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        names = wal_files(os.listdir(self.dir))
        newest = engram_wal.file_seconds(names[-1]) if names else None
        secs = int(time.time())
        if newest is not None and newest >= secs:
            secs = newest + 1
        s.file, s.offset = engram_wal.file_name(secs), 0
        fd = os.open(self._path(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        fsync_dir(self.dir)

    async def step(self) -> bool:
        """Write what the log holds durably beyond the mirror. True when anything was written.
        The write and fsyncs run in a thread: the replica's event loop goes on applying."""
        if self.state is None:
            self._open()
        s = self.state
        assert s is not None
        lg = self.sp.log
        if lg.generation != self._generation:
            kept = lg.cut_since(self._generation)
            self._generation = lg.generation
            if kept is not None:
                self._cut(kept)
        if s.sequence > lg.last_sequence:
            self._cut(lg.last_sequence)
        upto = min(self.sp.applied_sequence, lg.last_sequence)
        if upto <= s.sequence:
            return False
        start = s.sequence + 1
        if start < lg.first_sequence:
            self.skipped += lg.first_sequence - start
            log.warning(
                "space %s: entries %d..%d were never held here (a snapshot began after them); "
                "the Engram mirror goes on from %d",
                self.sp.id,
                start,
                lg.first_sequence - 1,
                lg.first_sequence,
            )
            start = lg.first_sequence
        # The log's entries as stored are valid Engram entries already (Engram's layout; our
        # epoch sits in reserved bytes its header CRC covers and its reader ignores): copied
        # as they are, no decoding and re-encoding.
        parts: list[bytes] = []
        size, count, last, seq = 0, 0, s.sequence, start
        while seq <= upto and size < MAX_BYTES:
            r = lg.read(seq, max_entries=MAX_ENTRIES, max_bytes=MAX_BYTES - size, upto=upto)
            if r.count == 0:
                break
            parts.append(r.data)
            size += len(r.data)
            count += r.count
            last, seq = r.last_sequence, r.last_sequence + 1
        if not parts:
            return False
        if not s.file:
            self._new_file()
        if not await asyncio.to_thread(_append, self._path(), b"".join(parts)):
            # Deleted while written: an Engram starting here compacted the directory (it deletes
            # every file it did not write). Whether its compaction saw these entries is unknown:
            # write them again in a new file. A restated episode is applied twice at Engram's
            # next start (the same id, stored again); a lost one would be gone.
            log.warning(
                "space %s: %s was deleted while the mirror wrote it; entries %d..%d go to a new "
                "file",
                self.sp.id,
                s.file,
                start,
                last,
            )
            s.file, s.offset = "", 0
            return True
        s.offset += size
        s.sequence = last
        await asyncio.to_thread(self._store)
        self.metrics.mirror_entries.labels(self.sp.id).inc(count)
        return True


def _append(path: Path, data: bytes) -> bool:
    """Append and fsync; False when the file was deleted meanwhile (the write went nowhere)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        write_all(fd, data)
        os.fsync(fd)
        return os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)
