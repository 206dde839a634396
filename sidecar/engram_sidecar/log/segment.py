"""One WAL segment file: scanning, the sparse index, positioned reads, recovery of a torn tail.

A segment is `<first_sequence:020d>.wal`, so the segment holding sequence S is found from the file
names alone (the last one whose first sequence is <= S). Inside a segment, a sparse in-memory
index (every INDEX_EVERY entries) narrows a seek to a short forward walk.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from engram_contract.formats.entry import (
    HEADER_SIZE,
    MAGIC,
    EntryHeader,
    check_payload,
    decode_header,
)
from engram_sidecar.errors import StorageError, WalCorruption

SEGMENT_RE: Final = re.compile(r"^(\d{20})\.wal$")
# One index point per 256 entries: a seek walks at most 255 headers, and the index of a full
# 64 MiB segment of 100-byte entries stays under 20 KiB.
INDEX_EVERY: Final = 256
_SCAN_CHUNK: Final = 4 * 1024 * 1024
_MAGIC_BYTES: Final = MAGIC.to_bytes(4, "little")


def segment_name(first_sequence: int) -> str:
    return f"{first_sequence:020d}.wal"


@dataclass
class ScanResult:
    """What a walk over a segment found."""

    end_offset: int  # offset just past the last valid entry
    last_sequence: int  # first_sequence - 1 when empty
    last_epoch: int | None
    last_timestamp_ns: int | None
    entries: int
    index: list[tuple[int, int]]  # (sequence, offset)
    epochs: list[tuple[int, int]]  # (epoch, first sequence) where the epoch changes
    error: tuple[int, str] | None = None  # offset and reason of the first invalid entry


@dataclass
class Segment:
    path: Path
    first_sequence: int
    last_sequence: int  # first_sequence - 1 when empty
    size: int
    index: list[tuple[int, int]] | None = field(default=None)  # None until first needed

    @property
    def empty(self) -> bool:
        return self.last_sequence < self.first_sequence


def scan(path: Path, first_sequence: int, *, verify_payloads: bool = True) -> ScanResult:
    """Walk every entry of `path`, checking CRCs and that sequences continue by one.

    Stops at the first invalid entry and reports it in `error`; the caller decides whether that is
    a torn tail (truncate) or corruption (refuse).
    """
    res = ScanResult(0, first_sequence - 1, None, None, 0, [], [])
    with path.open("rb") as f:
        data = f.read()  # segments are bounded (64 MiB default); one read beats many small ones
    view = memoryview(data)
    pos = 0
    expect = first_sequence
    end = len(data)
    while pos < end:
        h = decode_header(view, pos)
        if isinstance(h, str):
            res.error = (pos, h)
            break
        if h.sequence != expect:
            res.error = (pos, f"sequence {h.sequence} where {expect} was expected")
            break
        if pos + HEADER_SIZE + h.payload_size > end:
            res.error = (pos, "entry runs past the end of the file (torn write)")
            break
        if verify_payloads:
            bad = check_payload(h, view[pos + HEADER_SIZE : pos + HEADER_SIZE + h.payload_size])
            if bad is not None:
                res.error = (pos, bad)
                break
        if res.last_epoch is None or h.epoch != res.last_epoch:
            if res.last_epoch is not None and h.epoch < res.last_epoch:
                res.error = (pos, f"epoch {h.epoch} after epoch {res.last_epoch}")
                break
            res.epochs.append((h.epoch, h.sequence))
        if res.entries % INDEX_EVERY == 0:
            res.index.append((h.sequence, pos))
        res.entries += 1
        res.last_sequence = h.sequence
        res.last_epoch = h.epoch
        res.last_timestamp_ns = h.timestamp_ns
        pos += HEADER_SIZE + h.payload_size
        expect += 1
    res.end_offset = pos
    return res


def valid_entry_after(path: Path, offset: int, min_sequence: int) -> int | None:
    """Offset of a well-formed header past `offset` with sequence >= min_sequence, if any.

    A torn tail leaves nothing valid behind the tear; finding a valid later entry means the bad
    bytes are in the middle of the log, which is corruption, not a crash artefact.
    """
    with path.open("rb") as f:
        f.seek(offset + 1)
        data = f.read()
    base = offset + 1
    i = data.find(_MAGIC_BYTES)
    while i != -1:
        h = decode_header(data, i)
        if isinstance(h, EntryHeader) and h.sequence >= min_sequence:
            return base + i
        i = data.find(_MAGIC_BYTES, i + 1)
    return None


def seek_offset(seg: Segment, sequence: int, fd: int) -> int:
    """Byte offset of `sequence` inside `seg`, via the sparse index and a short header walk."""
    if seg.index is None:
        res = scan(seg.path, seg.first_sequence, verify_payloads=False)
        if res.error is not None:
            raise WalCorruption(str(seg.path), res.error[0], res.error[1])
        seg.index = res.index
    i = bisect.bisect_right(seg.index, (sequence, 1 << 62)) - 1
    seq, off = seg.index[i] if i >= 0 else (seg.first_sequence, 0)
    while seq < sequence:
        raw = os.pread(fd, HEADER_SIZE, off)
        h = decode_header(raw)
        if isinstance(h, str):
            raise WalCorruption(str(seg.path), off, h)
        off += HEADER_SIZE + h.payload_size
        seq += 1
    return off


def list_segments(wal_dir: Path) -> list[tuple[int, Path]]:
    out: list[tuple[int, Path]] = []
    for p in wal_dir.iterdir():
        m = SEGMENT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    out.sort()
    return out


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out: a nearly full disk may take only part of a buffer."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_atomically(path: Path, data: bytes, *, space: str = "") -> None:
    """Make `data` the content of `path`: write a temp file, fsync it, rename, fsync the dir.

    After a crash at any point the file holds the old content or the new, never a mix. A
    failure raises StorageError naming the step and leaves the old content in place (the
    temp file is removed, so a full disk isn't left fuller).
    """
    tmp = path.with_suffix(".tmp")
    step, target = "create", tmp
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            step = "write"
            write_all(fd, data)
            step = "fsync"
            os.fsync(fd)
        finally:
            os.close(fd)
        step = "rename"
        os.replace(tmp, path)
        step, target = "fsync directory", path.parent
        fsync_dir(path.parent)
    except OSError as err:
        if step != "fsync directory":
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise StorageError(step, target, err, space=space) from err
