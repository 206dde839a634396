"""Wire protocol v1: framing (wire), message bodies (messages) and BATCH bodies (wire_batch)."""

from __future__ import annotations

import ast
import itertools
import random
import re
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_sidecar.contract import Epoch, NodeName, Sequence, SpaceId, space_wire_id
from engram_sidecar.entry import encode_entry
from engram_sidecar.errors import ChecksumMismatch, FrameTooLarge, WireError
from engram_sidecar.messages import (
    MAX_NACK_MESSAGE,
    Ack,
    Auth,
    Challenge,
    Heartbeat,
    Hello,
    Message,
    Nack,
    NackReason,
    Welcome,
    decode_message,
)
from engram_sidecar.wire import (
    BODY_LENGTH_OFFSET,
    CRC_OFFSET,
    FLAG_COMPRESSED,
    HEADER,
    HEADER_SIZE,
    NO_SPACE,
    DecoderPoisoned,
    Frame,
    FrameDecoder,
    MalformedFrame,
    MessageType,
    TruncatedFrame,
    UnknownMessageType,
    encode_frame,
)
from engram_sidecar.wire_batch import (
    Batch,
    BatchMismatch,
    DecompressedTooLarge,
    DecompressionFailed,
    decompress_body,
    encode_batch,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "wire-format.md"
SPACE = space_wire_id(SpaceId("default"))
T0 = 1_700_000_000_000_000_000
SETTINGS = settings(max_examples=60, deadline=None)


def golden(name: str) -> bytes:
    """A golden vector, parsed out of docs/wire-format.md so the doc and the test can't drift."""
    m = re.search(rf"<!-- golden:{name} -->\n```text\n([0-9a-f\s]+?)```", DOC.read_text())
    assert m is not None, f"golden vector {name!r} missing from {DOC}"
    return bytes.fromhex("".join(m.group(1).split()))


def entries(first: int, last: int, *, epoch: int = 3, size: int | None = None) -> bytes:
    return b"".join(
        encode_entry(
            sequence=s,
            timestamp_ns=T0 + s * 1000,
            entry_type=1,
            epoch=epoch,
            payload=b"episode-%d" % s if size is None else bytes([s % 256]) * size,
        )
        for s in range(first, last + 1)
    )


def one(data: bytes) -> Frame:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1
    return frames[0]


def roundtrip(data: bytes) -> Message:
    return decode_message(one(data))


def sample_batch(*, compress: bool = False) -> bytes:
    return encode_batch(
        space=SPACE, epoch=3, first_seq=7, last_seq=8, count=2, entries=entries(7, 8),
        compress=compress,
    )  # fmt: skip


def sample_heartbeat() -> bytes:
    return Heartbeat(SPACE, Epoch(3), Sequence(8), T0 + 8_000, T0 + 500_000_000).encode()


GOLDEN = {
    "heartbeat": sample_heartbeat,
    "ack": lambda: Ack(SPACE, Epoch(3), Sequence(8), T0 + 600_000_000).encode(),
    "nack": lambda: Nack(NackReason.GAP, Sequence(9), "gap: have 6", SPACE, Epoch(3)).encode(),
    "batch": sample_batch,
    "hello": lambda: Hello(NodeName("node-0"), bytes(range(32))).encode(),
    "welcome": lambda: Welcome().encode(),
}


# --- layout and golden vectors ------------------------------------------------------------------


def test_header_layout_is_64_bytes_with_crc_last() -> None:
    assert HEADER.size == HEADER_SIZE == 64
    assert HEADER.format == "<IBBHQ16sQQIIII"
    assert (BODY_LENGTH_OFFSET, CRC_OFFSET) == (52, 60)
    assert sample_heartbeat()[:4] == b"ENGR"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vector_matches_doc_byte_for_byte(name: str) -> None:
    data = GOLDEN[name]()
    assert data == golden(name), f"{name}: encoder output differs from docs/wire-format.md"
    assert roundtrip(data) == roundtrip(golden(name))


def test_golden_space_id_is_documented_uuid5() -> None:
    assert SPACE.hex() == "c5b73087a63e569c9a96eace7f059a00"
    assert SPACE.hex() in DOC.read_text()


def test_crc_covers_zeroed_header_then_body_as_sent() -> None:
    for data in (golden("batch"), sample_batch(compress=True), golden("heartbeat")):
        (stored,) = struct.unpack_from("<I", data, CRC_OFFSET)
        assert stored == crc32c(data[HEADER_SIZE:], crc32c(data[:CRC_OFFSET] + bytes(4)))


# --- round trips --------------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
spaces = st.binary(min_size=16, max_size=16).filter(lambda b: b != NO_SPACE)
names = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)), min_size=1, max_size=60
).filter(lambda s: 0x7F not in s.encode())
nonces = st.binary(min_size=32, max_size=32)


@SETTINGS
@given(name=names, nonce=nonces, version=st.integers(1, 0xFFFF))
def test_hello_roundtrip(name: str, nonce: bytes, version: int) -> None:
    msg = Hello(NodeName(name), nonce, version)
    assert roundtrip(msg.encode()) == msg


@SETTINGS
@given(name=names, nonce=nonces, proof=nonces, version=st.integers(1, 0xFFFF))
def test_challenge_roundtrip(name: str, nonce: bytes, proof: bytes, version: int) -> None:
    msg = Challenge(NodeName(name), nonce, proof, version)
    assert roundtrip(msg.encode()) == msg


@SETTINGS
@given(proof=nonces)
def test_auth_and_welcome_roundtrip(proof: bytes) -> None:
    assert roundtrip(Auth(proof).encode()) == Auth(proof)
    assert roundtrip(Welcome().encode()) == Welcome()


@SETTINGS
@given(space=spaces, epoch=u64, seq=u64, ts=u64)
def test_ack_roundtrip(space: bytes, epoch: int, seq: int, ts: int) -> None:
    msg = Ack(space, Epoch(epoch), Sequence(seq), ts)
    assert roundtrip(msg.encode()) == msg


@SETTINGS
@given(space=spaces, epoch=u64, last=u64, last_ts=u64, sent=u64)
def test_heartbeat_roundtrip(space: bytes, epoch: int, last: int, last_ts: int, sent: int) -> None:
    msg = Heartbeat(space, Epoch(epoch), Sequence(last), last_ts, sent)
    assert roundtrip(msg.encode()) == msg


@SETTINGS
@given(
    reason=st.sampled_from(NackReason),
    resend=st.integers(1, 2**64 - 1),
    text=st.text(max_size=100),
    space=st.one_of(st.just(NO_SPACE), spaces),
    epoch=u64,
)
def test_nack_roundtrip(
    reason: NackReason, resend: int, text: str, space: bytes, epoch: int
) -> None:
    msg = Nack(reason, Sequence(resend), text, space, Epoch(epoch))
    assert roundtrip(msg.encode()) == msg


@SETTINGS
@given(
    first=st.integers(1, 2**40),
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    epoch=st.integers(0, 2**32),
    compress=st.sampled_from([False, True, 1, 9]),
    space=spaces,
)
def test_batch_roundtrip(
    first: int, payloads: list[bytes], epoch: int, compress: bool | int, space: bytes
) -> None:
    body = b"".join(
        encode_entry(sequence=first + i, timestamp_ns=T0 + i, entry_type=2, epoch=epoch, payload=p)
        for i, p in enumerate(payloads)
    )
    last = first + len(payloads) - 1
    msg = Batch(space, Epoch(epoch), Sequence(first), Sequence(last), len(payloads), body)
    data = msg.encode(compress=compress)
    assert roundtrip(data) == msg


def test_batch_compresses_when_it_pays_and_not_otherwise() -> None:
    big = entries(1, 100, size=100)
    packed = encode_batch(
        space=SPACE, epoch=3, first_seq=1, last_seq=100, count=100, entries=big, compress=True
    )
    frame = one(packed)
    assert frame.compressed
    assert len(frame.body) < len(big)
    assert isinstance(decode_message(frame), Batch)
    assert decode_message(frame) == roundtrip(packed)
    assert Batch.from_frame(frame).entries == big
    noise = encode_entry(
        sequence=1, timestamp_ns=T0, entry_type=1, epoch=3, payload=random.Random(1).randbytes(4000)
    )
    raw = one(
        encode_batch(
            space=SPACE, epoch=3, first_seq=1, last_seq=1, count=1, entries=noise, compress=True
        )
    )
    assert not raw.compressed, "incompressible entries must go raw"
    assert raw.body == noise


# --- the decoder: chunking, truncation, corruption -----------------------------------------------


def stream() -> tuple[bytes, list[Frame]]:
    parts = [GOLDEN[name]() for name in sorted(GOLDEN)]
    parts.append(sample_batch(compress=True))
    parts.append(
        encode_batch(
            space=SPACE, epoch=3, first_seq=1, last_seq=50, count=50,
            entries=entries(1, 50, size=100), compress=True,
        )
    )  # fmt: skip
    return b"".join(parts), [one(p) for p in parts]


def test_decoder_splits_at_every_byte_boundary_give_same_frames() -> None:
    data, want = stream()
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        got = dec.feed(data[:cut]) + dec.feed(data[cut:])
        assert got == want, f"split at {cut}"
        assert dec.buffered == 0
        dec.check_eof()


def test_decoder_byte_at_a_time_gives_same_frames() -> None:
    data, want = stream()
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
    assert got == want


@SETTINGS
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_decoder_any_chunking_gives_same_frames(cuts: list[int]) -> None:
    data, want = stream()
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    dec = FrameDecoder()
    got: list[Frame] = []
    for a, b in itertools.pairwise(bounds):
        got += dec.feed(memoryview(data)[a:b])
    assert got == want


@pytest.mark.parametrize("make", [sample_batch, sample_heartbeat], ids=["batch", "heartbeat"])
def test_decoder_truncation_yields_nothing_until_eof(make: Callable[[], bytes]) -> None:
    data = make()
    for cut in range(len(data)):
        dec = FrameDecoder()
        assert dec.feed(data[:cut]) == []
        assert dec.buffered == cut
        if cut:
            with pytest.raises(TruncatedFrame, match=f"{cut} of"):
                dec.check_eof()
        else:
            dec.check_eof()


def _decode_all(data: bytes) -> None:
    dec = FrameDecoder()
    for frame in dec.feed(data):
        decode_message(frame)
    dec.check_eof()


@pytest.mark.parametrize(
    "make",
    [sample_batch, lambda: sample_batch(compress=True), sample_heartbeat, GOLDEN["nack"]],
    ids=["batch", "batch-zstd-small", "heartbeat", "nack"],
)
def test_decoder_every_single_bit_flip_raises_wire_error(make: Callable[[], bytes]) -> None:
    data = make()
    _decode_all(data)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(WireError):
            _decode_all(bytes(flipped))


def test_decoder_every_bit_flip_of_compressed_batch_raises_wire_error() -> None:
    data = encode_batch(
        space=SPACE, epoch=3, first_seq=1, last_seq=20, count=20,
        entries=entries(1, 20, size=40), compress=True,
    )  # fmt: skip
    assert one(data).compressed
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(WireError):
            _decode_all(bytes(flipped))


def _with_header(data: bytes, **fields: int) -> bytes:
    """`data` with header fields overwritten (CRC left stale: header checks come first)."""
    offsets = {"magic": (0, "<I"), "version": (4, "<B"), "type": (5, "<B"), "flags": (6, "<H")}
    offsets |= {"reserved": (56, "<I"), "body_length": (BODY_LENGTH_OFFSET, "<I")}
    out = bytearray(data)
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, out, off, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"magic": 0x12345678}, MalformedFrame, "bad magic"),
        ({"version": 2}, MalformedFrame, "version 2"),
        ({"type": 24}, UnknownMessageType, "type 24"),
        ({"type": 99}, UnknownMessageType, "type 99"),
        ({"flags": 0x0002}, MalformedFrame, "unknown flag bits 0x0002"),
        ({"flags": FLAG_COMPRESSED}, MalformedFrame, "compressed flag set on HEARTBEAT"),
        ({"reserved": 1}, MalformedFrame, "reserved"),
    ],
)
def test_decoder_checks_header_as_soon_as_64_bytes_arrive(
    fields: dict[str, int], error: type[WireError], match: str
) -> None:
    bad = _with_header(sample_heartbeat(), **fields)
    dec = FrameDecoder()
    assert dec.feed(bad[: HEADER_SIZE - 1]) == []
    with pytest.raises(error, match=match):
        dec.feed(bad[HEADER_SIZE - 1 : HEADER_SIZE])


def test_decoder_rejects_over_limit_length_before_allocating() -> None:
    header = _with_header(sample_heartbeat()[:HEADER_SIZE], body_length=2**32 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge, match="4294967295-byte body"):
            FrameDecoder().feed(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    small = FrameDecoder(max_body=23)
    with pytest.raises(FrameTooLarge, match="24-byte body, over the 23-byte limit"):
        small.feed(sample_heartbeat()[:HEADER_SIZE])
    assert FrameDecoder(max_body=24).feed(sample_heartbeat())


def test_decoder_crc_mismatch_then_poisoned() -> None:
    data = bytearray(sample_heartbeat())
    data[-1] ^= 0x80
    dec = FrameDecoder()
    with pytest.raises(ChecksumMismatch, match="HEARTBEAT frame CRC32C mismatch"):
        dec.feed(sample_heartbeat() + bytes(data))
    assert dec.poisoned
    with pytest.raises(DecoderPoisoned, match="recycle the connection"):
        dec.feed(sample_heartbeat())
    with pytest.raises(ChecksumMismatch):
        dec.check_eof()


# --- message checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode_frame(MessageType.ACK, bytes(15), space=SPACE), "ACK body is 15 bytes, must be 16"),
        (encode_frame(MessageType.ACK, bytes(16)), "ACK must name a space"),
        (encode_frame(MessageType.HEARTBEAT, bytes(24), space=SPACE, count=1), "must leave"),
        (encode_frame(MessageType.WELCOME, epoch=1), "connection-level"),
        (encode_frame(MessageType.WELCOME, space=SPACE), "connection-level"),
        (encode_frame(MessageType.WELCOME, b"x"), "WELCOME body is 1 bytes, must be 0"),
        (encode_frame(MessageType.AUTH, bytes(31)), "AUTH body is 31 bytes, must be 32"),
        (encode_frame(MessageType.HELLO, bytes(34)), "at least 35"),
        (encode_frame(MessageType.HELLO, bytes(34) + b"a\0b"), "invalid node name"),
        (encode_frame(MessageType.HELLO, bytes(34) + b"\xff"), "invalid node name"),
        (encode_frame(MessageType.NACK, struct.pack("<HQ", 99, 0)), "unknown NACK reason 99"),
        (encode_frame(MessageType.NACK, struct.pack("<HQ", 2, 0)), "GAP NACK without"),
        (encode_frame(MessageType.NACK, struct.pack("<HQ", 1, 0) + b"\xc3"), "not UTF-8"),
        (encode_frame(MessageType.NACK, bytes(10 + MAX_NACK_MESSAGE + 1)), "over 512"),
    ],
)
def test_message_decode_rejects_malformed_body(data: bytes, match: str) -> None:
    with pytest.raises(MalformedFrame, match=match):
        roundtrip(data)


def test_message_nack_encode_truncates_on_char_boundary() -> None:
    msg = roundtrip(Nack(NackReason.INTERNAL, message="é" * 400).encode())
    assert isinstance(msg, Nack)
    assert msg.message == "é" * (MAX_NACK_MESSAGE // 2)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello(NodeName("n"), bytes(31)).encode(),
        lambda: Hello(NodeName(""), bytes(32)).encode(),
        lambda: Hello(NodeName("x" * 254), bytes(32)).encode(),
        lambda: Auth(bytes(33)).encode(),
        lambda: Ack(NO_SPACE, Epoch(1), Sequence(1), 0).encode(),
        lambda: Nack(NackReason.GAP).encode(),
        lambda: encode_frame(MessageType.ACK, space=b"short"),
        lambda: encode_frame(MessageType.ACK, flags=FLAG_COMPRESSED),
        lambda: encode_frame(MessageType.ACK, epoch=-1),
        lambda: encode_batch(space=SPACE, epoch=3, first_seq=7, last_seq=8, count=3, entries=b""),
        lambda: encode_batch(space=SPACE, epoch=3, first_seq=0, last_seq=0, count=1, entries=b""),
    ],
)
def test_message_encode_rejects_invalid_values(build: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        build()


# --- BATCH body checks and decompression limits --------------------------------------------------


def _raw_batch(body: bytes, *, first: int, last: int, count: int, epoch: int = 3) -> Frame:
    return one(
        encode_frame(
            MessageType.BATCH, body, epoch=epoch, space=SPACE,
            first_seq=first, last_seq=last, count=count,
        )
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "header", "match"),
    [
        (entries(7, 8), (6, 8, 2, 3), "count 2 but 6..8 is 3 entries"),
        (entries(7, 8), (8, 9, 2, 3), "entry 0 at body offset 0: sequence 7, expected 8"),
        (entries(7, 8), (7, 7, 1, 3), "more than the 1 entries"),
        (entries(7, 8), (7, 9, 3, 3), "holds 2 entries, header says 3"),
        (entries(7, 7) + entries(9, 9), (7, 8, 2, 3), "offset 73: sequence 9, expected 8"),
        (entries(7, 8), (7, 8, 2, 2), "entry epoch 3 above the frame's 2"),
        (entries(7, 8)[:-1], (7, 8, 2, 3), "payload runs 1 bytes past"),
        (entries(7, 8) + b"\0", (7, 8, 2, 3), "offset 146: more than the 2 entries"),
        (entries(7, 8) + b"\0", (7, 9, 3, 3), "offset 146: short header"),
        (b"", (7, 7, 1, 3), "holds 0 entries"),
        (entries(7, 7)[:-1] + b"X", (7, 7, 1, 3), "payload CRC32C mismatch"),
        (b"\0" * 64, (1, 1, 1, 3), "bad magic"),
        (entries(7, 8), (0, 1, 2, 3), "first_seq 0"),
    ],
)
def test_batch_body_disagreeing_with_header_rejected(
    body: bytes, header: tuple[int, int, int, int], match: str
) -> None:
    first, last, count, epoch = header
    with pytest.raises(BatchMismatch, match=match):
        decode_message(_raw_batch(body, first=first, last=last, count=count, epoch=epoch))


def _bomb_frame(packed: bytes) -> Frame:
    return one(
        encode_frame(
            MessageType.BATCH, packed, epoch=3, space=SPACE,
            first_seq=1, last_seq=1, count=1, flags=FLAG_COMPRESSED,
        )
    )  # fmt: skip


def test_batch_decompression_bomb_rejected_without_allocating() -> None:
    packed = zstandard.ZstdCompressor(level=3).compress(bytes(17 * 1024 * 1024))
    assert len(packed) < 4096
    frame = _bomb_frame(packed)
    tracemalloc.start()
    try:
        with pytest.raises(DecompressedTooLarge, match="over the 16777216-byte limit"):
            decode_message(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    with pytest.raises(DecompressedTooLarge):
        Batch.from_frame(_bomb_frame(zstandard.ZstdCompressor().compress(bytes(101))), max_size=100)


def test_batch_zstd_frame_lying_about_size_rejected_without_allocating() -> None:
    # Magic, descriptor (8-byte content size, single segment), size 2**40, one empty raw block.
    liar = bytes.fromhex("28b52ffde0") + struct.pack("<Q", 2**40) + bytes.fromhex("010000")
    with pytest.raises(DecompressedTooLarge, match="1099511627776 bytes"):
        decode_message(_bomb_frame(liar))
    small_liar = liar[:5] + struct.pack("<Q", 100) + liar[13:]
    with pytest.raises(DecompressionFailed, match="corrupt"):
        decode_message(_bomb_frame(small_liar))


def test_batch_compressed_body_must_be_one_sized_zstd_frame() -> None:
    comp = zstandard.ZstdCompressor()
    body = entries(1, 1)
    stream_obj = comp.compressobj()
    unsized = stream_obj.compress(body) + stream_obj.flush()
    with pytest.raises(DecompressionFailed, match="does not declare its content size"):
        decode_message(_bomb_frame(unsized))
    with pytest.raises(DecompressionFailed, match="not a zstd frame"):
        decode_message(_bomb_frame(b"not zstd at all"))
    with pytest.raises(DecompressionFailed, match="corrupt"):
        decode_message(_bomb_frame(comp.compress(body) + b"trailing"))
    assert decompress_body(comp.compress(body)) == body


def test_wire_modules_import_no_asyncio_or_sockets() -> None:
    pkg = ROOT / "sidecar" / "engram_sidecar"
    for name in ("wire.py", "messages.py", "wire_batch.py", "auth.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse((pkg / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"asyncio", "socket", "selectors", "ssl"}, name
