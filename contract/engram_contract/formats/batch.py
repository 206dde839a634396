"""Wire protocol v2, BATCH messages: WAL entries as stored, optional zstd, and their checks.

Body: the epoch of the entry just before the first one (`prev_epoch`, u64 LE; 0 when the batch
starts the log), then the entries, zstd-compressed when the frame's flag says so. The receiver
appends only when its own entry at `first_seq - 1` has that epoch (log matching, design §4).

A BATCH is encoded once and the same bytes go to every replica. The receiver bounds
decompression by the frame's declared content size before allocating, then checks that the body
is whole, CRC-valid entries whose sequences are exactly the header's contiguous range. Sans-IO.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Final, Self

import zstandard

from engram_contract.errors import FrameTooLarge
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE
from engram_contract.formats.entry import CheckedRun, RunProblem, check_run
from engram_contract.formats.frame import (
    DEFAULT_MAX_BODY,
    FLAG_COMPRESSED,
    NO_SPACE,
    Frame,
    MalformedFrame,
    MessageType,
    encode_frame,
)
from engram_contract.ids import Epoch, Sequence

DEFAULT_ZSTD_LEVEL: Final = 3
PREV_EPOCH: Final = struct.Struct("<Q")  # the body's first field, never compressed
_NO_EPOCH: Final = Epoch(0)


class BatchMismatch(MalformedFrame):
    """A BATCH body disagrees with its header (sequences, count, epoch) or holds a bad entry."""


class DecompressionFailed(MalformedFrame):
    """A compressed body is not one well-formed zstd frame that declares its content size."""


class DecompressedTooLarge(FrameTooLarge):
    """A compressed body would expand past the limit; refused before allocating it."""


_zstd = threading.local()  # zstd contexts are not thread-safe; reuse one per thread and level


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_zstd, "compressors", None)
    if cache is None:
        cache = _zstd.compressors = {}
    comp = cache.get(level)
    if comp is None:
        # One-shot compress() writes the content size, which receivers require (decompress_body).
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_zstd, "decompressor", None)
    if dctx is None:
        dctx = _zstd.decompressor = zstandard.ZstdDecompressor()
    return dctx


def _check_batch_range(first_seq: int, last_seq: int, count: int) -> str | None:
    if first_seq < 1:
        return f"first_seq {first_seq} (sequences start at 1)"
    if last_seq < first_seq:
        return f"last_seq {last_seq} below first_seq {first_seq}"
    if count != last_seq - first_seq + 1:
        return f"count {count} but {first_seq}..{last_seq} is {last_seq - first_seq + 1} entries"
    return None


def encode_batch(
    *,
    space: bytes,
    epoch: int,
    first_seq: int,
    last_seq: int,
    count: int,
    entries: bytes,
    prev_epoch: int,
    compress: bool | int = False,
) -> bytes:
    """One BATCH frame: `entries` are stored WAL entries, byte for byte, `first_seq..last_seq`.

    `prev_epoch` is the epoch of the sender's entry `first_seq - 1` (0 when first_seq is 1).

    Encode once and send the same bytes to every replica. `compress` is False, True (zstd level
    DEFAULT_ZSTD_LEVEL) or a zstd level. Compressed output no smaller than the input is dropped
    and the body is sent raw, so receivers never pay to decompress what didn't shrink.
    """
    bad = _check_batch_range(first_seq, last_seq, count)
    if bad is not None:
        raise ValueError(f"invalid batch range: {bad}")
    if len(entries) < count * ENTRY_HEADER_SIZE:
        raise ValueError(f"{len(entries)} bytes can't hold {count} entries")
    if space == NO_SPACE:
        raise ValueError("a BATCH must name a space (a 16-byte contract.space_wire_id)")
    prefix = _prev_epoch(prev_epoch, first_seq, epoch)
    body, flags = entries, 0
    if compress is not False:
        level = DEFAULT_ZSTD_LEVEL if compress is True else compress
        packed = _compressor(level).compress(entries)
        if len(packed) < len(entries):
            body, flags = packed, FLAG_COMPRESSED
    return encode_frame(
        MessageType.BATCH,
        prefix + body,
        epoch=epoch,
        space=space,
        first_seq=first_seq,
        last_seq=last_seq,
        count=count,
        flags=flags,
    )


def _prev_epoch(prev_epoch: int, first_seq: int, epoch: int) -> bytes:
    if not 0 <= prev_epoch <= epoch:
        raise ValueError(f"prev_epoch {prev_epoch} outside 0..{epoch} (the frame's epoch)")
    if first_seq == 1 and prev_epoch != 0:
        raise ValueError("a batch that starts the log has prev_epoch 0")
    return PREV_EPOCH.pack(prev_epoch)


def decompress_body(data: bytes, *, max_size: int = DEFAULT_MAX_BODY) -> bytes:
    """Expand one zstd frame, allocating at most `max_size` bytes, whatever the frame claims.

    The frame must declare its content size: zstd's one-shot decompress allocates the declared
    size even past max_output_size, so the declaration is checked first, and a frame without one
    (which would need a speculative max-size buffer) is refused.
    """
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise DecompressionFailed(f"compressed body is not a zstd frame: {exc}") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise DecompressionFailed("zstd frame does not declare its content size")
    if declared > max_size:
        raise DecompressedTooLarge(
            f"compressed body expands to {declared} bytes, over the {max_size}-byte limit"
        )
    try:
        return _decompressor().decompress(data, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DecompressionFailed(f"zstd body is corrupt: {exc}") from None


def validate_batch_body(
    entries: bytes,
    *,
    first_seq: int,
    last_seq: int,
    count: int,
    epoch: int,
    prev_epoch: int = 0,
) -> CheckedRun:
    """Check that `entries` parse as whole, CRC-valid entries `first_seq..last_seq`, no gaps.

    Also that their epochs never go back, from `prev_epoch` (the entry before the batch) to at
    most the frame's: a primary ships only entries written at its own epoch or before. Raises
    BatchMismatch naming the entry and body offset. Returns the checked run (`entry.check_run`),
    so that nobody parses or checks the entries again: the one validation of this hop.
    """
    bad = _check_batch_range(first_seq, last_seq, count)
    if bad is not None:
        raise BatchMismatch(f"BATCH header: {bad}")
    if not entries:
        raise BatchMismatch(f"BATCH body holds 0 entries, header says {count}")
    run = check_run(
        entries, first_sequence=first_seq, min_epoch=prev_epoch, max_epoch=epoch, count=count
    )
    if isinstance(run, RunProblem):
        raise BatchMismatch(f"BATCH entry {run.index} at body offset {run.offset}: {run.reason}")
    if run.last != last_seq:
        raise BatchMismatch(f"BATCH body holds {run.count} entries, header says {count}")
    return run


@dataclass(frozen=True, slots=True)
class Batch:
    """Primary → replica: entries `first_seq..last_seq`, uncompressed, exactly as stored."""

    space: bytes
    epoch: Epoch
    first_seq: Sequence
    last_seq: Sequence
    count: int
    entries: bytes
    prev_epoch: Epoch = _NO_EPOCH
    # Set by `from_frame`: the entries as checked once (CRCs, sequences, epochs), so a receiver
    # need not parse or check them again (None for a Batch built by hand). Not part of the
    # message's value.
    checked: CheckedRun | None = field(default=None, compare=False, repr=False)

    def encode(self, *, compress: bool | int = False) -> bytes:
        return encode_batch(
            space=self.space,
            epoch=self.epoch,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            count=self.count,
            entries=self.entries,
            prev_epoch=self.prev_epoch,
            compress=compress,
        )

    @classmethod
    def from_frame(cls, frame: Frame, *, max_size: int = DEFAULT_MAX_BODY) -> Self:
        """Decompress (at most `max_size` bytes) and validate every entry against the header."""
        # A SNAPSHOT_CHUNK has a BATCH's layout and rules; only where it is applied differs.
        if frame.msg_type not in (MessageType.BATCH, MessageType.SNAPSHOT_CHUNK):
            raise MalformedFrame(f"expected a BATCH frame, got {frame.msg_type.name}")
        if frame.space == NO_SPACE:
            raise MalformedFrame("BATCH must name a space")
        if len(frame.body) < PREV_EPOCH.size:
            raise BatchMismatch(f"BATCH body of {len(frame.body)} bytes has no prev_epoch field")
        (prev_epoch,) = PREV_EPOCH.unpack_from(frame.body)
        if prev_epoch > frame.epoch or (frame.first_seq == 1 and prev_epoch != 0):
            raise BatchMismatch(
                f"BATCH prev_epoch {prev_epoch} is impossible before entry {frame.first_seq} "
                f"at frame epoch {frame.epoch}"
            )
        raw = frame.body[PREV_EPOCH.size :]
        entries = decompress_body(raw, max_size=max_size) if frame.compressed else raw
        checked = validate_batch_body(
            entries,
            first_seq=frame.first_seq,
            last_seq=frame.last_seq,
            count=frame.count,
            epoch=frame.epoch,
            prev_epoch=prev_epoch,
        )
        return cls(
            frame.space,
            Epoch(frame.epoch),
            Sequence(frame.first_seq),
            Sequence(frame.last_seq),
            frame.count,
            entries,
            Epoch(prev_epoch),
            checked,
        )


def encode_snapshot_chunk(
    *,
    space: bytes,
    epoch: int,
    first_seq: int,
    last_seq: int,
    count: int,
    entries: bytes,
    prev_epoch: int,
) -> bytes:
    """A SNAPSHOT_CHUNK frame: BATCH layout (stored entries, uncompressed) under the chunk type."""
    bad = _check_batch_range(first_seq, last_seq, count)
    if bad is not None:
        raise ValueError(f"invalid chunk range: {bad}")
    if space == NO_SPACE:
        raise ValueError("SNAPSHOT_CHUNK must name a space")
    return encode_frame(
        MessageType.SNAPSHOT_CHUNK,
        _prev_epoch(prev_epoch, first_seq, epoch) + entries,
        epoch=epoch,
        space=space,
        first_seq=first_seq,
        last_seq=last_seq,
        count=count,
    )
