"""Waking the tailer when Engram's WAL directory changes: inotify on Linux, polling elsewhere.

inotify is called through ctypes on the C library (no dependency). It watches one directory for
writes, creations, renames and deletions; each read of events wakes the waiter. It also notes
files renamed from `wal-….log.tmp` to `wal-….log`: that is how Engram's compaction publishes its
output (`compact_from_memory`), and the tailer takes it as proof of compaction
(`Watch.compaction_renames`). Polling wakes every `poll_interval`, and notes the `.log.tmp`
names it sees in listings (`Watch.note_listing`) for the same purpose; a compaction may be too
quick for a poll to see its temp file, so the tailer has a second rule (docs/engram.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Final, Literal

from engram_contract.formats import engram_wal

log = logging.getLogger(__name__)

WatchMode = Literal["auto", "inotify", "poll"]

_IN_MODIFY: Final = 0x002
_IN_CLOSE_WRITE: Final = 0x008
_IN_MOVED_FROM: Final = 0x040
_IN_MOVED_TO: Final = 0x080
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_DELETE_SELF: Final = 0x400
_IN_MOVE_SELF: Final = 0x800
_IN_NONBLOCK: Final = 0o4000
_IN_CLOEXEC: Final = 0o2000000
_MASK: Final = (
    _IN_MODIFY
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
_EVENT: Final = struct.Struct("iIII")


def inotify_available() -> bool:
    return sys.platform.startswith("linux") and _libc() is not None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    return lib if hasattr(lib, "inotify_init1") else None


class Watch:
    """One directory's changes, as wake-ups. Create it inside the event loop."""

    def __init__(self, directory: Path, *, mode: WatchMode, poll_interval: float) -> None:
        self.dir = directory
        self.poll_interval = poll_interval
        want_inotify = mode == "inotify" or (mode == "auto" and inotify_available())
        if mode == "inotify" and not inotify_available():
            raise OSError("inotify is not available on this system (use engram_watch: poll)")
        self.mode: Literal["inotify", "poll"] = "inotify" if want_inotify else "poll"
        self._event = asyncio.Event()
        self._fd = -1
        self._wd = -1
        self._moved_from: dict[int, str] = {}  # cookie -> name renamed away
        # Names that arrived by a rename from their `.tmp` (inotify), or whose `.tmp` a listing
        # showed (polling): Engram's compaction output.
        self.compaction_renames: set[str] = set()

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    def _arm(self) -> None:
        """Start inotify on the directory once it exists (Engram creates it with the space)."""
        if self.mode != "inotify" or self._fd >= 0 or not self.dir.is_dir():
            return
        lib = _libc()
        assert lib is not None
        fd = lib.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        wd = lib.inotify_add_watch(fd, os.fsencode(self.dir), _MASK)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {self.dir}: {os.strerror(err)}")
        self._fd, self._wd = fd, wd
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("inotify on %s: %s; falling back to polling", self.dir, err)
            self.close()
            self.mode = "poll"
            self._event.set()
            return
        pos = 0
        while pos + _EVENT.size <= len(data):
            _wd, mask, cookie, length = _EVENT.unpack_from(data, pos)
            raw = data[pos + _EVENT.size : pos + _EVENT.size + length]
            name = raw.split(b"\0", 1)[0].decode(errors="replace")
            pos += _EVENT.size + length
            if mask & _IN_MOVED_FROM:
                self._moved_from[cookie] = name
            elif mask & _IN_MOVED_TO:
                src = self._moved_from.pop(cookie, "")
                if engram_wal.COMPACTION_TEMP.match(src) and src == name + ".tmp":
                    self.compaction_renames.add(name)
            if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF):
                # The directory itself went away: watch it again when it is back.
                self.close()
        if len(self._moved_from) > 64:
            self._moved_from.clear()
        self._event.set()

    def note_listing(self, names: list[str]) -> None:
        for n in names:
            m = engram_wal.COMPACTION_TEMP.match(n)
            if m:
                self.compaction_renames.add(n[: -len(".tmp")])

    async def wait(self, timeout: float) -> None:
        """Until the directory changes (inotify) or a poll interval passed; at most `timeout`.

        A change since the previous wait returns at once: the caller read the directory after
        that wait, maybe before this change."""
        self._arm()
        if self._fd < 0:
            timeout = min(timeout, self.poll_interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
        self._fd = self._wd = -1
