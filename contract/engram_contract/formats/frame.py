"""Wire protocol v2, framing layer: the 64-byte frame header, frame encoding, incremental decoding.

Sans-IO: bytes in, `Frame`s out; no sockets, no event loop. Message bodies (what each frame type
carries) live in `engram_sidecar.messages` and, for BATCH, `engram_sidecar.wire_batch`; the
handshake in `engram_sidecar.auth`. The published layout, with golden vectors, is
docs/wire-format.md.

A `Frame` keeps its body exactly as sent (compressed when `compressed` is set): decompressing is
the message layer's job, so that frames a receiver rejects on their header (stale epoch, unknown
space) cost no decompression, and so that the decoder's only limit is on bytes actually buffered.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from crc32c import crc32c

from engram_contract.errors import ChecksumMismatch, FrameTooLarge, WireError

MAGIC: Final = 0x52474E45  # b"ENGR" on the wire (little-endian)
# 2: BATCH bodies carry the previous entry's epoch (log matching), ACK and NACK grew (see
# docs/wire-format.md "Changes from v1"). A v1 peer fails on the first header: no silent mix.
VERSION: Final = 2

HEADER: Final = struct.Struct(
    "<"  # little-endian, no padding
    "I"  # 0  magic: 0x52474E45 = b"ENGR"; a stream that is not ours fails on its first frame
    "B"  # 4  version: frame format version, 2
    "B"  # 5  message type (MessageType)
    "H"  # 6  flags: bit 0 = body is zstd-compressed (BATCH only); other bits must be zero
    "Q"  # 8  epoch: the sender's epoch for `space`; 0 on connection-level messages
    "16s"  # 16 space: uuid5(SPACE_NAMESPACE, space id); all zero on connection-level messages
    "Q"  # 32 first_seq: first entry sequence in a BATCH, else 0
    "Q"  # 40 last_seq: last entry sequence in a BATCH, else 0
    "I"  # 48 count: entries in a BATCH, else 0
    "I"  # 52 body_length: bytes that follow the header, as sent (compressed size if compressed)
    "I"  # 56 reserved, must be zero
    "I"  # 60 crc32c: over the header with this field zeroed, continued over the body as sent
)
HEADER_SIZE: Final = HEADER.size
# Offsets derived from the declaration above, never typed twice (aiokafka's default_records style).
BODY_LENGTH_OFFSET: Final = struct.calcsize("<IBBHQ16sQQI")
CRC_OFFSET: Final = struct.calcsize("<IBBHQ16sQQIII")
assert HEADER_SIZE == 64
assert CRC_OFFSET == HEADER_SIZE - 4

FLAG_COMPRESSED: Final = 0x0001
KNOWN_FLAGS: Final = FLAG_COMPRESSED
DEFAULT_MAX_BODY: Final = 16 * 1024 * 1024
SPACE_ID_SIZE: Final = 16
NO_SPACE: Final = bytes(SPACE_ID_SIZE)
_ZERO_CRC: Final = bytes(4)
_U64_MAX: Final = 2**64 - 1
_U32_MAX: Final = 2**32 - 1


class MessageType(enum.IntEnum):
    """Frame types of the protocol. Numbers are permanent; gaps are kept for later messages."""

    # 1-9: connection set-up (space id zero, epoch zero)
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    # 10-19: per-space replication stream
    BATCH = 10
    ACK = 11
    HEARTBEAT = 12
    NACK = 13
    # 20-29: snapshot catch-up (a replica too far behind is rebuilt from the primary's log)
    SNAPSHOT_BEGIN = 20
    SNAPSHOT_CHUNK = 21
    SNAPSHOT_END = 22
    SNAPSHOT_ACK = 23


CONNECTION_TYPES: Final = frozenset(
    {MessageType.HELLO, MessageType.CHALLENGE, MessageType.AUTH, MessageType.WELCOME}
)


class UnknownMessageType(WireError):
    """A frame's type byte names no known message."""


class MalformedFrame(WireError):
    """A frame's header or body breaks a rule of the format (bad magic, flags, sizes, fields)."""


class DecoderPoisoned(WireError):
    """The decoder already failed; the connection must be recycled, not read further."""


class TruncatedFrame(WireError):
    """The stream ended (or must end) with part of a frame buffered."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded, CRC-checked frame. `body` is as sent: zstd bytes when `compressed` is true."""

    msg_type: MessageType
    flags: int
    epoch: int
    space: bytes
    first_seq: int
    last_seq: int
    count: int
    body: bytes

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)


def encode_frame(
    msg_type: MessageType,
    body: bytes = b"",
    *,
    epoch: int = 0,
    space: bytes = NO_SPACE,
    first_seq: int = 0,
    last_seq: int = 0,
    count: int = 0,
    flags: int = 0,
) -> bytes:
    """Header + body, ready to write.

    Raises ValueError on out-of-range fields: a bug here must fail loudly at the sender, not emit a
    frame that makes every receiver recycle its connection.
    """
    if len(space) != SPACE_ID_SIZE:
        raise ValueError(f"space id must be {SPACE_ID_SIZE} bytes, got {len(space)}")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:04x}")
    if flags & FLAG_COMPRESSED and msg_type is not MessageType.BATCH:
        raise ValueError(f"only BATCH bodies may be compressed, not {msg_type.name}")
    if len(body) > _U32_MAX:
        raise ValueError(f"body of {len(body)} bytes does not fit a u32 length")
    for name, value, top in (
        ("epoch", epoch, _U64_MAX),
        ("first_seq", first_seq, _U64_MAX),
        ("last_seq", last_seq, _U64_MAX),
        ("count", count, _U32_MAX),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} out of range 0..{top}")
    fields = [MAGIC, VERSION, msg_type, flags, epoch, space, first_seq, last_seq, count, len(body)]
    # The CRC is the last field, so the zeroed-CRC header is just the packed header with crc=0.
    crc = crc32c(body, crc32c(HEADER.pack(*fields, 0, 0)))
    return HEADER.pack(*fields, 0, crc) + body


@dataclass(frozen=True, slots=True)
class _Header:
    msg_type: MessageType
    flags: int
    epoch: int
    space: bytes
    first_seq: int
    last_seq: int
    count: int
    body_length: int
    crc: int


def _parse_header(buf: bytearray, pos: int, max_body: int) -> _Header:
    """Check what can be checked before the body arrives; the CRC is checked with the body."""
    (magic, version, mtype, flags, epoch, space, first, last, count, blen, reserved, crc) = (
        HEADER.unpack_from(buf, pos)
    )
    if magic != MAGIC:
        raise MalformedFrame(f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x} b'ENGR')")
    if version != VERSION:
        raise MalformedFrame(f"unsupported frame version {version} (this decoder speaks {VERSION})")
    try:
        msg_type = MessageType(mtype)
    except ValueError:
        raise UnknownMessageType(f"unknown message type {mtype}") from None
    if flags & ~KNOWN_FLAGS:
        raise MalformedFrame(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:04x} in {msg_type.name}")
    if flags & FLAG_COMPRESSED and msg_type is not MessageType.BATCH:
        raise MalformedFrame(f"compressed flag set on {msg_type.name}; only BATCH may compress")
    if reserved != 0:
        raise MalformedFrame(f"reserved header field is 0x{reserved:08x}, must be zero")
    if blen > max_body:
        raise FrameTooLarge(
            f"{msg_type.name} declares a {blen}-byte body, over the {max_body}-byte limit"
        )
    return _Header(msg_type, flags, epoch, space, first, last, count, blen, crc)


class FrameDecoder:
    """Incremental decoder: feed bytes in any chunking, get whole, CRC-checked frames.

    Any error poisons the decoder: every later `feed` raises DecoderPoisoned, because after a bad
    frame the stream's framing can't be trusted and the connection must be recycled. Frames that
    preceded the bad one in the same `feed` are dropped with it, which is safe: acks are
    cumulative and a reconnecting primary resends from each replica's acknowledged sequence.
    """

    __slots__ = ("_buf", "_error", "_header", "_max_body")

    def __init__(self, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        if not 0 <= max_body <= _U32_MAX:
            raise ValueError(f"max_body must be 0..{_U32_MAX}, got {max_body}")
        self._max_body = max_body
        self._buf = bytearray()
        self._header: _Header | None = None
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held toward the next, incomplete frame (0 at a frame boundary)."""
        return len(self._buf)

    @property
    def poisoned(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append `data`; return every frame it completes, in order. Raises WireError subclasses."""
        if self._error is not None:
            raise DecoderPoisoned(f"decoder failed earlier ({self._error}); recycle the connection")
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        try:
            while True:
                avail = len(buf) - pos
                header = self._header
                if header is None:
                    if avail < HEADER_SIZE:
                        break
                    header = self._header = _parse_header(buf, pos, self._max_body)
                end = pos + HEADER_SIZE + header.body_length
                if len(buf) < end:
                    break
                frames.append(_finish(buf, pos, end, header))
                self._header = None
                pos = end
        except WireError as exc:
            self._error = exc
            self._buf = bytearray()
            self._header = None
            raise
        if pos:
            # One bulk delete per feed keeps buffering linear however the stream is chunked.
            del buf[:pos]
        return frames

    def check_eof(self) -> None:
        """Call when the peer closed: raises TruncatedFrame if a frame was cut off mid-way.

        The decoder can't tell a slow peer from a dead one; only the transport knows the stream
        ended, so detecting truncation at EOF is its job, done through this method.
        """
        if self._error is None and self._buf:
            need = HEADER_SIZE if self._header is None else HEADER_SIZE + self._header.body_length
            self._error = TruncatedFrame(
                f"stream ended inside a frame: {len(self._buf)} of {need} bytes received"
            )
        if self._error is not None:
            raise self._error


def _finish(buf: bytearray, pos: int, end: int, header: _Header) -> Frame:
    # Slices stay temporaries: a live export of `buf` would make the caller's resize raise.
    with memoryview(buf) as view:
        body = view[pos + HEADER_SIZE : end].tobytes()
        crc = crc32c(view[pos : pos + CRC_OFFSET])
    crc = crc32c(body, crc32c(_ZERO_CRC, crc))
    if crc != header.crc:
        raise ChecksumMismatch(
            f"{header.msg_type.name} frame CRC32C mismatch "
            f"(stored 0x{header.crc:08x}, computed 0x{crc:08x})"
        )
    return Frame(
        header.msg_type,
        header.flags,
        header.epoch,
        header.space,
        header.first_seq,
        header.last_seq,
        header.count,
        body,
    )
