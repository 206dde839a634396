"""The binary write body (`Content-Type: application/x-engram-entries`): entries to append.

A request body is one or more records, back to back, nothing before, between or after them.
Each record is (little-endian), declared once below:

| offset | size | field |
|---|---|---|
| 0 | 4 | entry type, u32 (1..6, `entry.EntryType`) |
| 4 | 4 | payload length in bytes, u32 (at most `entry.MAX_PAYLOAD`) |
| 8 | length | payload, opaque bytes, stored as they are |

The primary fills in what the stored entry adds (sequence, timestamp, epoch, both CRC32Cs), so a
client never computes a CRC, and a body is parsed in one pass with no per-entry text decoding.
A body that is not exactly such records is refused whole (`RecordsError`, with a `code`), so a
bad request writes nothing. Sans-IO: bytes in, values out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from engram_contract.formats.entry import ENTRY_TYPE_NAMES, MAX_PAYLOAD, EntryType

CONTENT_TYPE: Final = "application/x-engram-entries"

RECORD_HEADER: Final = struct.Struct(
    "<"
    "I"  # 0 entry type
    "I"  # 4 payload length
)
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size
assert RECORD_HEADER_SIZE == 8

ENTRY_TYPES: Final = frozenset(int(t) for t in EntryType)

# The error codes a refused body carries (docs/api.md, "Binary writes").
EMPTY: Final = "empty_body"
TRUNCATED: Final = "truncated_record"
PAST_END: Final = "length_past_end"
UNKNOWN_TYPE: Final = "unknown_type"
TOO_LARGE: Final = "payload_too_large"
TOO_MANY: Final = "too_many_records"


class RecordsError(ValueError):
    """A body that is not a run of whole records. `code` names the rule it broke (one of the
    constants above), `record` the index of the offending record and `offset` where it starts."""

    def __init__(self, code: str, message: str, *, record: int, offset: int) -> None:
        super().__init__(message)
        self.code = code
        self.record = record
        self.offset = offset


def encode_records(records: Iterable[tuple[int, bytes]]) -> bytes:
    """A body of `records` (type, payload): what a client sends. Checks what the server would."""
    parts: list[bytes] = []
    pack = RECORD_HEADER.pack
    for i, (etype, payload) in enumerate(records):
        if etype not in ENTRY_TYPES:
            raise ValueError(f"record {i}: entry type {etype} is not one of 1..{max(ENTRY_TYPES)}")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"record {i}: payload of {len(payload)} bytes over {MAX_PAYLOAD}")
        parts.append(pack(etype, len(payload)))
        parts.append(payload)
    if not parts:
        raise ValueError("a body needs at least one record")
    return b"".join(parts)


def decode_records(
    body: bytes | bytearray | memoryview,
    *,
    max_records: int | None = None,
    max_payload: int = MAX_PAYLOAD,
) -> list[tuple[int, bytes]]:
    """The records of `body` as (type, payload), in one pass.

    Payloads are bytes sliced from `body`, not views into it: a memoryview is an object the
    garbage collector tracks, a bytes object is not, and a (type, bytes) tuple is untracked at
    its first collection. A primary holds each request's records until its fsync (and acks)
    are in; with views, a backlog of requests under load was thousands of tracked objects per
    request, promoted into the old generations, so every collection walked more of them: the
    primary slowed as its backlog grew, and the backlog grew (docs/design-notes.md, "Payloads
    as bytes, not views"). Copying 100 bytes costs what making a view does.

    Raises RecordsError on the first rule broken; nothing is returned for a bad body.
    """
    data = body if isinstance(body, bytes) else bytes(body)
    view = memoryview(data)
    end = len(view)
    if end == 0:
        raise RecordsError(EMPTY, "the body holds no records", record=0, offset=0)
    out: list[tuple[int, bytes]] = []
    unpack = RECORD_HEADER.unpack_from
    hsize = RECORD_HEADER_SIZE
    types = ENTRY_TYPES
    limit = end if max_records is None else max_records
    pos = 0
    while pos < end:
        if end - pos < hsize:
            raise RecordsError(
                TRUNCATED,
                f"record {len(out)} at offset {pos}: {end - pos} bytes left, a record header "
                f"needs {hsize}",
                record=len(out),
                offset=pos,
            )
        etype, size = unpack(view, pos)
        start = pos + hsize
        stop = start + size
        if etype not in types or size > max_payload or stop > end or len(out) >= limit:
            raise _why(
                etype,
                size,
                left=end - start,
                index=len(out),
                pos=pos,
                max_payload=max_payload,
                limit=limit,
            )
        out.append((etype, data[start:stop]))
        pos = stop
    return out


def _why(
    etype: int, size: int, *, left: int, index: int, pos: int, max_payload: int, limit: int
) -> RecordsError:
    """The error for a record the fast loop refused (built only on failure)."""
    where = f"record {index} at offset {pos}"
    if index >= limit:
        return RecordsError(
            TOO_MANY,
            f"more than {limit} records in one body (max_entries_per_request)",
            record=index,
            offset=pos,
        )
    if etype not in ENTRY_TYPES:
        return RecordsError(
            UNKNOWN_TYPE,
            f"{where}: entry type {etype} is not one of "
            + ", ".join(f"{int(t)} ({name})" for name, t in ENTRY_TYPE_NAMES.items()),
            record=index,
            offset=pos,
        )
    if size > max_payload:
        return RecordsError(
            TOO_LARGE,
            f"{where}: payload length {size} over the {max_payload}-byte limit",
            record=index,
            offset=pos,
        )
    return RecordsError(
        PAST_END,
        f"{where}: payload length {size} runs {size - left} bytes past the end of the body",
        record=index,
        offset=pos,
    )
