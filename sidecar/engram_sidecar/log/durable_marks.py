"""Test-only: where each WAL segment was last made durable, so a test can play a power loss.

A SIGKILL loses the process, not the page cache, so it never takes away entries that were
written but not yet fsynced. A power loss does. The chaos tests (tests/chaos, fault kind
`power-cut`) start nodes with ENGRAM_TEST_DURABLE_MARKS=<ms>: each group-commit fsync starts
that many milliseconds late (a slow disk, so that a kill often finds entries written and not yet
synced, which a fast one leaves for a fraction of a millisecond), and each completed one
then records, for every segment it covered, the segment's inode and its size when the fsync
began (everything written before an fsync starts is covered by it) in `wal/.durable-marks.json`.
After a SIGKILL, `lose_unsynced` cuts each segment back to that size and deletes segments
written after the newest marked one: what a power loss could have left.

The mark is written after the fsync returns and before the group commit counts the entries
durable, so nothing is ever acknowledged past a mark: a cut never takes an acknowledged entry
that a real power loss would have kept. Marks understate durability where other fsyncs ran
(closing a log, a snapshot install, recovery), which only makes the test cut entries nobody
acknowledged. A mark whose inode no longer matches (a snapshot swapped the directory in, a
segment was deleted and written again) is ignored. Not a setting: `main` removes the variable
from the environment before the settings are read. Never set it in production
(docs/configuration.md, "Test-only hooks").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from engram_sidecar.log.segment import list_segments

ENV: Final = "ENGRAM_TEST_DURABLE_MARKS"
FILE: Final = ".durable-marks.json"

enabled = False  # set by engram_sidecar.main from ENV (`enable`)
delay = 0.0  # seconds each group-commit fsync starts late: a slow disk, so a cut finds a tail


def enable(value: str) -> None:
    """ENV's value: milliseconds each fsync starts late (0 for none). Raises ValueError."""
    global enabled, delay  # a process-wide test hook, set once at start-up
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not 0.0 <= ms <= 1000.0:
        raise ValueError(f"{ENV}={value!r}: expected milliseconds from 0 to 1000")
    enabled, delay = True, ms / 1000


def sizes(fds: Iterable[tuple[int, Path]]) -> list[tuple[str, int, int]]:
    """(name, inode, size) of each segment, taken before its fsync starts."""
    out = []
    for fd, path in fds:
        st = os.fstat(fd)
        out.append((path.name, st.st_ino, st.st_size))
    return out


def note(wal_dir: Path, covered: Iterable[tuple[str, int, int]]) -> None:
    """Record segments an fsync just made durable up to their size (never lowering a mark of
    the same inode). No fsync: a SIGKILL keeps the page cache, and that is all it models."""
    path = wal_dir / FILE
    try:
        marks: dict[str, list[int]] = json.loads(path.read_text())
    except (OSError, ValueError):
        marks = {}
    for name, ino, size in covered:
        old = marks.get(name)
        keep = old[1] if old is not None and old[0] == ino else 0
        marks[name] = [ino, max(size, keep)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(marks))
    os.replace(tmp, path)


def lose_unsynced(wal_dir: Path) -> tuple[int, int]:
    """Cut every segment under `wal_dir` back to its mark, and delete segments newer than the
    newest marked one, as a power loss could. Returns (segments changed, bytes lost). Does
    nothing when no mark matches the files there."""
    try:
        marks: dict[str, list[int]] = json.loads((wal_dir / FILE).read_text())
    except (OSError, ValueError):
        return 0, 0
    segments = list_segments(wal_dir)
    valid: dict[str, int] = {}
    for _, p in segments:
        m = marks.get(p.name)
        if m is not None and p.stat().st_ino == m[0]:
            valid[p.name] = m[1]
    if not valid:
        return 0, 0
    newest = max(valid)
    changed = lost = 0
    for _, p in segments:
        size = p.stat().st_size
        if p.name in valid:
            if size > valid[p.name]:
                os.truncate(p, valid[p.name])
                changed, lost = changed + 1, lost + size - valid[p.name]
        elif p.name > newest:
            p.unlink()
            changed, lost = changed + 1, lost + size
    return changed, lost
