"""Engram's own WAL files, as Engram writes and reads them: names, entries, torn tails.

Facts from Engram's source (orchard9/engram, `engram-core/src/storage/wal.rs`; docs/engram.md
lists the functions): one file per `WalWriter::new`, named `wal-{unix_seconds:016x}.log`; each
entry is a 64-byte little-endian header then the payload. `WalEntryHeader::as_bytes` packs the
fields with no padding and leaves bytes 56..64 zero; `compute_header_crc` is CRC32C over magic,
sequence, timestamp, type, size, payload CRC and the 20 reserved bytes (bytes 0..32 ‖ 36..56);
the payload CRC is CRC32C of the payload. Engram's `validate` checks the magic and the header
CRC only (not the reserved or unused bytes), so this reader accepts exactly what it accepts.

Sans-IO: bytes in, entries and a verdict out. The tail reader (`engram_sidecar.tail`) and the
replica's Engram-format writer use it, and so do the tests' independent checks.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Final

from crc32c import crc32c

from engram_contract.formats.entry import MAGIC, MAX_PAYLOAD

HEADER: Final = struct.Struct(
    "<"
    "I"  # 0  magic
    "Q"  # 4  Engram's sequence (restarts at 0 in every file)
    "Q"  # 12 timestamp, ns since the Unix epoch
    "I"  # 20 entry type
    "I"  # 24 payload size
    "I"  # 28 payload CRC32C
    "I"  # 32 header CRC32C (bytes 0-32 and 36-56)
    "20s"  # 36 reserved (zero when Engram writes; covered by the header CRC)
    "8s"  # 56 unused (zero; outside every CRC)
)
HEADER_SIZE: Final = HEADER.size
assert HEADER_SIZE == 64
_CRC_OFFSET: Final = 32
_CRC_END: Final = 36
_COVERED_END: Final = 56

FILE_NAME: Final = re.compile(r"^wal-([0-9a-f]{16})\.log$")
# `compact_from_memory` writes `wal-{secs:016x}.log.tmp`, fsyncs it, then renames it.
COMPACTION_TEMP: Final = re.compile(r"^wal-([0-9a-f]{16})\.log\.tmp$")


def file_name(unix_seconds: int) -> str:
    return f"wal-{unix_seconds:016x}.log"


def file_seconds(name: str) -> int | None:
    """The start time in a WAL file's name, or None when `name` is not an Engram WAL file."""
    m = FILE_NAME.match(name)
    return int(m.group(1), 16) if m else None


def header_crc(head: bytes | bytearray | memoryview) -> int:
    return crc32c(head[_CRC_END:_COVERED_END], crc32c(head[:_CRC_OFFSET]))


def encode(*, sequence: int, timestamp_ns: int, entry_type: int, payload: bytes) -> bytes:
    """One entry exactly as Engram's writer lays it out (reserved and unused bytes zero)."""
    head = bytearray(
        HEADER.pack(
            MAGIC,
            sequence,
            timestamp_ns,
            entry_type,
            len(payload),
            crc32c(payload),
            0,
            bytes(20),
            bytes(8),
        )
    )
    struct.pack_into("<I", head, _CRC_OFFSET, header_crc(head))
    return bytes(head) + payload


@dataclass(frozen=True, slots=True)
class EngramEntry:
    sequence: int  # Engram's, per file
    timestamp_ns: int
    entry_type: int
    payload: bytes
    offset: int  # where the entry starts in its file
    end: int  # just past it


class Stop(enum.Enum):
    END = "end"  # every byte read was a complete, valid entry
    TORN = "torn"  # an incomplete entry at the end: more may come (or the writer died)
    CORRUPT = "corrupt"  # a complete header or payload that fails its checks


@dataclass(frozen=True, slots=True)
class ScanResult:
    entries: list[EngramEntry]
    end: int  # file offset just past the last valid entry
    stop: Stop
    reason: str | None = None  # why it stopped at `end` (TORN, CORRUPT)


def scan(
    data: bytes | bytearray | memoryview, *, base: int = 0, max_entries: int | None = None
) -> ScanResult:
    """Decode the entries of `data`, which starts at file offset `base`.

    Stops at the first incomplete entry (TORN: wait for the rest) or the first entry that fails
    a check (CORRUPT). A run of zero bytes to the end counts as TORN: a file extended before its
    data reached the disk (or preallocated) reads as zeros, and is not corruption yet.
    """
    view = memoryview(data)
    out: list[EngramEntry] = []
    pos, size = 0, len(view)
    while pos < size:
        if max_entries is not None and len(out) >= max_entries:
            return ScanResult(out, base + pos, Stop.END)
        rest = view[pos:]
        if len(rest) < HEADER_SIZE:
            return ScanResult(out, base + pos, Stop.TORN, f"{len(rest)} bytes of a header")
        head = rest[:HEADER_SIZE]
        magic, seq, ts, etype, psize, pcrc, hcrc, _reserved, _unused = HEADER.unpack(head)
        if magic != MAGIC or hcrc != header_crc(head):
            if not any(rest):
                return ScanResult(out, base + pos, Stop.TORN, "zero bytes after the last entry")
            why = (
                f"bad magic 0x{magic:08x}"
                if magic != MAGIC
                else f"header CRC32C mismatch (stored 0x{hcrc:08x}, computed "
                f"0x{header_crc(head):08x})"
            )
            return ScanResult(out, base + pos, Stop.CORRUPT, why)
        if psize > MAX_PAYLOAD:
            return ScanResult(
                out, base + pos, Stop.CORRUPT, f"payload of {psize} bytes, over {MAX_PAYLOAD}"
            )
        stop = pos + HEADER_SIZE + psize
        if stop > size:
            return ScanResult(
                out,
                base + pos,
                Stop.TORN,
                f"{size - pos - HEADER_SIZE} of the payload's {psize} bytes",
            )
        payload = view[pos + HEADER_SIZE : stop]
        got = crc32c(payload)
        if got != pcrc:
            if not any(payload) and not any(view[stop:]):
                # Header on disk, payload pages not yet: still being written.
                return ScanResult(out, base + pos, Stop.TORN, "payload not yet written")
            return ScanResult(
                out,
                base + pos,
                Stop.CORRUPT,
                f"payload CRC32C mismatch (stored 0x{pcrc:08x}, computed 0x{got:08x})",
            )
        out.append(EngramEntry(seq, ts, etype, bytes(payload), base + pos, base + stop))
        pos = stop
    return ScanResult(out, base + pos, Stop.END)


def recover(data: bytes | bytearray | memoryview) -> list[EngramEntry]:
    """What Engram's `WalReader::read_wal_file` keeps from one file: entries up to the first bad
    header or short header, skipping an entry whose payload CRC fails. A payload cut short makes
    Engram's recovery fail (`read_exact(..)?`), so it raises ValueError here too."""
    view = memoryview(data)
    out: list[EngramEntry] = []
    pos = 0
    while len(view) - pos >= HEADER_SIZE:
        head = view[pos : pos + HEADER_SIZE]
        magic, seq, ts, etype, psize, pcrc, hcrc, _r, _u = HEADER.unpack(head)
        if magic != MAGIC or hcrc != header_crc(head):
            break
        stop = pos + HEADER_SIZE + psize
        if stop > len(view):
            raise ValueError(f"entry at {pos}: payload cut short; Engram's recovery would fail")
        payload = bytes(view[pos + HEADER_SIZE : stop])
        if crc32c(payload) == pcrc:
            out.append(EngramEntry(seq, ts, etype, payload, pos, stop))
        pos = stop
    return out
