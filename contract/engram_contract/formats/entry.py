"""The on-disk WAL entry: Engram's 64-byte header, then the payload. No trailer.

Layout (little-endian), declared once below. Offsets 0–36 are Engram's; we put the entry's epoch in
the first 8 of Engram's 20 reserved bytes so that the header CRC covers it.

| offset | size | field |
|---|---|---|
| 0  | 4  | magic 0xDEADBEEF (bytes EF BE AD DE) |
| 4  | 8  | sequence, u64, per space, from 1, never reused |
| 12 | 8  | timestamp, ns since the Unix epoch, u64 |
| 20 | 4  | entry type, u32 (1..6, see EntryType) |
| 24 | 4  | payload size, u32 |
| 28 | 4  | CRC32C of the payload |
| 32 | 4  | CRC32C of bytes 0–32 ‖ 36–56 (52 bytes) |
| 36 | 8  | epoch that wrote the entry, u64 (ours; Engram: reserved) |
| 44 | 12 | reserved, must be zero |
| 56 | 8  | unused, must be zero |

Engram leaves bytes 56–64 outside every CRC. We can't cover them without breaking Engram's
layout, so we require them to be zero instead: a flipped bit there is still detected.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from crc32c import crc32c

from engram_contract.errors import WalCorruption

MAGIC: Final = 0xDEADBEEF

HEADER: Final = struct.Struct(
    "<"
    "I"  # 0  magic
    "Q"  # 4  sequence
    "Q"  # 12 timestamp_ns
    "I"  # 20 entry type
    "I"  # 24 payload size
    "I"  # 28 payload CRC32C
    "I"  # 32 header CRC32C (bytes 0-32 and 36-56)
    "Q"  # 36 epoch
    "12s"  # 44 reserved, zero
    "8s"  # 56 unused, zero
)
HEADER_SIZE: Final = HEADER.size
assert HEADER_SIZE == 64
# Derived from the declaration above, never typed twice (as frame.py's offsets): for readers that
# peek at one field of a stored entry (its size) without decoding the header.
PAYLOAD_SIZE_OFFSET: Final = struct.calcsize("<IQQI")
assert PAYLOAD_SIZE_OFFSET == 24

_CRC_OFFSET: Final = 32
_CRC_END: Final = 36
_COVERED_END: Final = 56
_CRC: Final = struct.Struct("<I")
_ZERO12: Final = bytes(12)
_ZERO8: Final = bytes(8)
# Entries above this are refused: keeps a corrupt size field from asking for gigabytes.
MAX_PAYLOAD: Final = 64 * 1024 * 1024


class EntryType(enum.IntEnum):
    EPISODE_STORE = 1
    MEMORY_UPDATE = 2
    MEMORY_DELETE = 3
    CONSOLIDATION = 4
    CHECKPOINT = 5
    COMPACTION_MARKER = 6


ENTRY_TYPE_NAMES: Final = {
    "episode": EntryType.EPISODE_STORE,
    "update": EntryType.MEMORY_UPDATE,
    "delete": EntryType.MEMORY_DELETE,
    "consolidation": EntryType.CONSOLIDATION,
    "checkpoint": EntryType.CHECKPOINT,
    "compaction_marker": EntryType.COMPACTION_MARKER,
}


@dataclass(frozen=True, slots=True)
class EntryHeader:
    sequence: int
    timestamp_ns: int
    entry_type: int
    payload_size: int
    payload_crc: int
    epoch: int


def encode_entry(
    *, sequence: int, timestamp_ns: int, entry_type: int, epoch: int, payload: bytes
) -> bytes:
    """Header + payload, exactly as stored and as shipped."""
    pcrc = crc32c(payload)
    head = bytearray(
        HEADER.pack(
            MAGIC,
            sequence,
            timestamp_ns,
            entry_type,
            len(payload),
            pcrc,
            0,
            epoch,
            _ZERO12,
            _ZERO8,
        )
    )
    hcrc = crc32c(head[_CRC_END:_COVERED_END], crc32c(head[:_CRC_OFFSET]))
    struct.pack_into("<I", head, _CRC_OFFSET, hcrc)
    return bytes(head) + payload


# An entry to append: (entry type, payload). The payload may be a view into a request body.
Record: TypeAlias = tuple[int, bytes | bytearray | memoryview]

# The leading fields `encode_entries` writes into a zeroed buffer; the rest of a header is zeros.
_LEAD: Final = struct.Struct(HEADER.format[:9])  # "<IQQIIIIQ": magic .. epoch
assert _LEAD.size == 44
_HEAD32: Final = struct.Struct(
    HEADER.format[:7]
)  # "<IQQIII": bytes 0-32, the header CRC's first part
assert _HEAD32.size == _CRC_OFFSET
# Bytes 36-56: the epoch, then the reserved bytes the header CRC covers (zero).
_EPOCH_TAIL: Final = struct.Struct("<Q12x")
assert _EPOCH_TAIL.size == _COVERED_END - _CRC_END
# A whole header with the reserved and unused bytes as integers, so a reader checks them for
# zero without slicing: "<IQQIIIIQ" then reserved (Q, I) and unused (Q).
_WHOLE: Final = struct.Struct(_LEAD.format + "QIQ")
assert _WHOLE.size == HEADER_SIZE


def encode_entries(
    records: Iterable[Record],
    *,
    first_sequence: int,
    timestamp_ns: int,
    epoch: int,
) -> tuple[bytes, list[int]]:
    """Entries `first_sequence..` for `records` (type, payload), built in one buffer: the bytes
    `encode_entry` would give for each, concatenated, and where each entry ends in them.

    One allocation, headers packed in place, one CRC32C over each payload and one over each
    header (its two covered ranges chained): what a primary appends and ships as it is.
    """
    items = records if isinstance(records, list | tuple) else list(records)
    total = HEADER_SIZE * len(items) + sum([len(p) for _, p in items])
    buf = bytearray(total)
    ends: list[int] = []
    append = ends.append
    # Bytes 36-56 (epoch, then zeros) are the same for every entry of the run: packed once.
    tail = _EPOCH_TAIL.pack(epoch)
    head = _HEAD32.pack
    pack = _LEAD.pack_into
    off = 0
    seq = first_sequence
    for etype, payload in items:
        size = len(payload)
        body = off + HEADER_SIZE
        end = body + size
        buf[body:end] = payload
        pcrc = crc32c(payload)
        hcrc = crc32c(tail, crc32c(head(MAGIC, seq, timestamp_ns, etype, size, pcrc)))
        pack(buf, off, MAGIC, seq, timestamp_ns, etype, size, pcrc, hcrc, epoch)
        append(end)
        off = end
        seq += 1
    return bytes(buf), ends


def decode_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> EntryHeader | str:
    """Parse and check one header at `offset`. Returns the header, or a reason it is invalid.

    Returning the reason (not raising) lets recovery tell a torn tail from corruption cheaply.
    """
    if len(buf) - offset < HEADER_SIZE:
        return "short header"
    view = memoryview(buf)[offset : offset + HEADER_SIZE]
    magic, seq, ts, etype, size, pcrc, hcrc, epoch, reserved, unused = HEADER.unpack(view)
    if magic != MAGIC:
        return f"bad magic 0x{magic:08x}"
    want = crc32c(view[_CRC_END:_COVERED_END], crc32c(view[:_CRC_OFFSET]))
    if hcrc != want:
        return f"header CRC32C mismatch (stored 0x{hcrc:08x}, computed 0x{want:08x})"
    if reserved != _ZERO12 or unused != _ZERO8:
        return "reserved header bytes are not zero"
    if size > MAX_PAYLOAD:
        return f"payload size {size} over the {MAX_PAYLOAD}-byte limit"
    return EntryHeader(seq, ts, etype, size, pcrc, epoch)


def check_payload(header: EntryHeader, payload: bytes | memoryview) -> str | None:
    """None when the payload matches its header's size and CRC, else the reason."""
    if len(payload) != header.payload_size:
        return f"payload is {len(payload)} bytes, header says {header.payload_size}"
    got = crc32c(payload)
    if got != header.payload_crc:
        return f"payload CRC32C mismatch (stored 0x{header.payload_crc:08x}, computed 0x{got:08x})"
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded entry, for readers that want fields rather than bytes."""

    sequence: int
    epoch: int
    timestamp_ns: int
    entry_type: int
    payload: bytes


def iter_entries(data: bytes | bytearray | memoryview, *, where: str = "<buffer>") -> list[Entry]:
    """Decode a run of stored entries, checking every CRC; WalCorruption on the first bad one."""
    out: list[Entry] = []
    view = memoryview(data)
    pos = 0
    end = len(view)
    while pos < end:
        h = decode_header(view, pos)
        if isinstance(h, str):
            raise WalCorruption(where, pos, h)
        body = view[pos + HEADER_SIZE : pos + HEADER_SIZE + h.payload_size]
        bad = check_payload(h, body)
        if bad is not None:
            raise WalCorruption(where, pos, bad)
        out.append(Entry(h.sequence, h.epoch, h.timestamp_ns, h.entry_type, bytes(body)))
        pos += HEADER_SIZE + h.payload_size
    return out


def walk_entries(
    data: bytes | bytearray | memoryview, *, where: str = "<buffer>", check_payloads: bool = True
) -> list[EntryHeader]:
    """The headers of a run of stored entries, every header CRC (and payload CRC) checked.

    Lighter than `iter_entries`: no payload copies, one pass. WalCorruption on the first bad one.
    """
    out: list[EntryHeader] = []
    with memoryview(data) as view:
        pos, end = 0, len(view)
        while pos < end:
            h = decode_header(view, pos)
            if isinstance(h, str):
                raise WalCorruption(where, pos, h)
            stop = pos + HEADER_SIZE + h.payload_size
            if stop > end:
                raise WalCorruption(where, pos, "entry runs past the end of the data")
            if check_payloads:
                bad = check_payload(h, view[pos + HEADER_SIZE : stop])
                if bad is not None:
                    raise WalCorruption(where, pos, bad)
            out.append(h)
            pos = stop
    return out


@dataclass(frozen=True, slots=True)
class CheckedRun:
    """A run of stored entries `first..last`, every check done once (`check_run`): header and
    payload CRCs, reserved bytes, sequences continuing by one, epochs never going back. What
    an appender needs to write the run without parsing it again."""

    first: int
    last: int
    ends: list[int]  # ends[i]: offset just past entry first + i
    epochs: list[tuple[int, int]]  # (epoch, first sequence) of each epoch in the run, in order
    last_timestamp_ns: int
    first_timestamp_ns: int = 0  # of the run's first entry (of the whole run, after a cut)

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    @property
    def last_epoch(self) -> int:
        return self.epochs[-1][0]

    def entry_epochs(self) -> list[int]:
        """The epoch of each entry, in order."""
        out: list[int] = []
        bounds = [seq for _, seq in self.epochs[1:]] + [self.last + 1]
        for (epoch, start), stop in zip(self.epochs, bounds, strict=True):
            out.extend([epoch] * (stop - start))
        return out

    def without_first(self, n: int) -> tuple[int, CheckedRun | None]:
        """Where entry `first + n` starts, and the run from it (None when nothing is left)."""
        if n <= 0:
            return 0, self
        if n >= self.count:
            return self.ends[-1], None
        cut = self.ends[n - 1]
        seq = self.first + n
        kept = [
            (e, max(q, seq))
            for i, (e, q) in enumerate(self.epochs)
            if i + 1 == len(self.epochs) or self.epochs[i + 1][1] > seq
        ]
        ends = [e - cut for e in self.ends[n:]]
        return cut, CheckedRun(
            seq, self.last, ends, kept, self.last_timestamp_ns, self.first_timestamp_ns
        )


@dataclass(frozen=True, slots=True)
class RunProblem:
    """Why `check_run` refused a run: the entry (index in the run), its byte offset, and
    whether its bytes are bad (`corrupt`) or just out of order (sequence, epoch, no entries)."""

    index: int
    offset: int
    reason: str
    corrupt: bool = True


def check_run(
    data: bytes | bytearray | memoryview,
    *,
    first_sequence: int | None = None,
    min_epoch: int = 0,
    max_epoch: int | None = None,
    count: int | None = None,
) -> CheckedRun | RunProblem:
    """Check a run of stored entries in one pass: the one validation a replica does per hop.

    Every header CRC, reserved bytes and payload CRC; sequences from `first_sequence` (else the
    first entry's) on by one; epochs at least `min_epoch`, never going back, at most
    `max_epoch`; at most `count` entries. The reason is worked out only for a run that fails
    (the fast loop just compares), so a good run costs one unpack and three CRC calls per
    entry, and no objects but its end offset.
    """
    view = memoryview(data).cast("B")
    end = len(view)
    if end == 0:
        return RunProblem(0, 0, "no entries", corrupt=False)
    unpack = _WHOLE.unpack_from
    top = (1 << 64) if max_epoch is None else max_epoch
    ends: list[int] = []
    append = ends.append
    epochs: list[tuple[int, int]] = []
    cur = min_epoch
    if first_sequence is None:  # the run's own first sequence, if its header is there at all
        first_sequence = unpack(view, 0)[1] if end >= HEADER_SIZE else 0
    want = first_sequence
    beyond = first_sequence + (end if count is None else count)  # the first sequence too many
    tail_epoch, tail = -1, b""
    ts = 0
    pos = 0
    while pos < end:
        if want == beyond:
            return RunProblem(want - first_sequence, pos, f"more than the {count} entries", False)
        if end - pos < HEADER_SIZE:
            return _run_problem(view, pos, index=len(ends), want=want, low=cur, top=top)
        magic, seq, ts, _etype, size, pcrc, hcrc, epoch, res1, res2, unused = unpack(view, pos)
        body = pos + HEADER_SIZE
        stop = body + size
        if epoch != tail_epoch:
            tail_epoch, tail = epoch, _EPOCH_TAIL.pack(epoch)
        if (
            magic != MAGIC
            or seq != want
            or res1
            or res2
            or unused
            or not cur <= epoch <= top
            or stop > end
            or crc32c(tail, crc32c(view[pos : pos + _CRC_OFFSET])) != hcrc
            or crc32c(view[body:stop]) != pcrc
        ):
            return _run_problem(view, pos, index=len(ends), want=want, low=cur, top=top)
        if epoch != cur or not epochs:
            epochs.append((epoch, seq))
            cur = epoch
        want = seq + 1
        append(stop)
        pos = stop
    first_ts = unpack(view, 0)[2]
    return CheckedRun(want - len(ends), want - 1, ends, epochs, ts, first_ts)


def stored_prefix(
    data: bytes | bytearray | memoryview, *, first_sequence: int, max_entries: int
) -> tuple[int, int] | RunProblem:
    """(entries, bytes) of the longest prefix of `data` made of whole, valid entries numbered
    from `first_sequence`, at most `max_entries` of them: what a WAL read serves.

    The checks of `check_run` (every CRC, reserved bytes, sequences by one) in the same fused
    loop, so reading back for a replica behind the ring costs what the replica's own check
    does. An entry cut short by the end of `data` ends the prefix instead of failing it: a
    read of so many bytes usually stops mid-entry. A bad entry is a RunProblem (its reason
    worked out only then). (0, n): the first entry is whole-headed but n bytes long, more than
    `data` holds, so the caller reads n bytes; (0, 0): not even a first header (or
    `max_entries` < 1, which a caller checks for first).
    """
    view = memoryview(data).cast("B")
    end = len(view)
    unpack = _WHOLE.unpack_from
    tail_epoch, tail = -1, b""
    want = first_sequence
    stop_at = first_sequence + max_entries
    top = 1 << 64  # a read checks no epochs
    pos = 0
    while want < stop_at and end - pos >= HEADER_SIZE:
        magic, seq, _ts, _etype, size, pcrc, hcrc, epoch, res1, res2, unused = unpack(view, pos)
        body = pos + HEADER_SIZE
        stop = body + size
        if epoch != tail_epoch:
            tail_epoch, tail = epoch, _EPOCH_TAIL.pack(epoch)
        if (
            magic != MAGIC
            or res1
            or res2
            or unused
            or size > MAX_PAYLOAD
            or crc32c(tail, crc32c(view[pos : pos + _CRC_OFFSET])) != hcrc
        ):
            return _run_problem(view, pos, index=want - first_sequence, want=want, low=0, top=top)
        if stop > end:
            return (0, stop) if pos == 0 else (want - first_sequence, pos)
        if seq != want or crc32c(view[body:stop]) != pcrc:
            return _run_problem(view, pos, index=want - first_sequence, want=want, low=0, top=top)
        want += 1
        pos = stop
    return want - first_sequence, pos


def _run_problem(
    view: memoryview, pos: int, *, index: int, want: int, low: int, top: int
) -> RunProblem:
    """The reason the entry at `pos` failed `check_run` (the slow path, on failure only)."""
    h = decode_header(view, pos)
    if isinstance(h, str):
        return RunProblem(index, pos, h)
    stop = pos + HEADER_SIZE + h.payload_size
    if stop > len(view):
        return RunProblem(index, pos, f"payload runs {stop - len(view)} bytes past the end")
    bad = check_payload(h, view[pos + HEADER_SIZE : stop])
    if bad is not None:
        return RunProblem(index, pos, bad)
    if h.sequence != want:
        return RunProblem(index, pos, f"sequence {h.sequence}, expected {want}", corrupt=False)
    if h.epoch > top:
        return RunProblem(
            index, pos, f"entry epoch {h.epoch} above the frame's {top}", corrupt=False
        )
    if h.epoch < low:
        return RunProblem(index, pos, f"entry epoch {h.epoch} after epoch {low}", corrupt=False)
    return RunProblem(index, pos, "entry failed its checks")
