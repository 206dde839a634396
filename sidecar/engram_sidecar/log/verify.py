"""Offline checks of stored WALs, for `engram-replication wal verify` and `wal dump`.

Reads segments directly (never opens a SpaceLog, which would repair a torn tail): a check must
report what is on disk, not change it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engram_contract.formats.entry import HEADER_SIZE, Entry, check_payload, decode_header
from engram_sidecar.errors import WalCorruption
from engram_sidecar.log import epochs as epoch_history
from engram_sidecar.log.segment import list_segments, scan, valid_entry_after


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: offset {self.offset}: {self.reason}"


@dataclass(frozen=True, slots=True)
class SpaceReport:
    space: str
    segments: int
    entries: int
    first_sequence: int
    last_sequence: int
    bytes: int
    problems: list[Problem]


def verify_space(space_dir: Path) -> SpaceReport:
    """Check every entry of every segment: CRCs, sequence continuity, epochs never going back."""
    wal_dir = space_dir / "wal"
    problems: list[Problem] = []
    segs = list_segments(wal_dir) if wal_dir.is_dir() else []
    if not segs:
        problems.append(Problem(str(wal_dir), 0, "no WAL segments"))
    entries = total = 0
    expect: int | None = None
    last_epoch = 0
    first_seq = segs[0][0] if segs else 0
    for i, (first, path) in enumerate(segs):
        total += path.stat().st_size
        if expect is not None and first != expect:
            problems.append(Problem(str(path), 0, f"segment starts at {first}, expected {expect}"))
        res = scan(path, first)
        entries += res.entries
        if res.epochs and res.epochs[0][0] < last_epoch:
            problems.append(Problem(str(path), 0, "epoch goes back across segments"))
        if res.last_epoch is not None:
            last_epoch = res.last_epoch
        if res.error is not None:
            off, why = res.error
            tail = (
                i == len(segs) - 1 and valid_entry_after(path, off, res.last_sequence + 1) is None
            )
            if tail:
                why += " (torn tail: recovery truncates it on next open)"
            problems.append(Problem(str(path), off, why))
        expect = res.last_sequence + 1
    try:
        epoch_history.load(space_dir / "epochs.json")
    except WalCorruption as err:
        problems.append(Problem(err.path, err.offset, err.reason))
    return SpaceReport(
        space_dir.name, len(segs), entries, first_seq, (expect or 1) - 1, total, problems
    )


def dump(space_dir: Path, from_sequence: int = 1) -> Iterator[tuple[str, int, Entry | Problem]]:
    """Every entry from `from_sequence` as (file, offset, entry), stopping at the first problem."""
    for first, path in list_segments(space_dir / "wal"):
        data = path.read_bytes()
        view = memoryview(data)
        pos, seq = 0, first
        while pos < len(data):
            h = decode_header(view, pos)
            if isinstance(h, str):
                yield str(path), pos, Problem(str(path), pos, h)
                return
            body = view[pos + HEADER_SIZE : pos + HEADER_SIZE + h.payload_size]
            bad = check_payload(h, body)
            if bad is None and h.sequence != seq:
                bad = f"sequence {h.sequence}, expected {seq}"
            if bad is not None:
                yield str(path), pos, Problem(str(path), pos, bad)
                return
            if h.sequence >= from_sequence:
                yield (
                    str(path),
                    pos,
                    Entry(h.sequence, h.epoch, h.timestamp_ns, h.entry_type, bytes(body)),
                )
            pos += HEADER_SIZE + h.payload_size
            seq += 1
