"""Wire protocol v2: framing (wire), message bodies (messages) and BATCH bodies (wire_batch)."""

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

from engram_contract.errors import ChecksumMismatch, FrameTooLarge, WireError
from engram_contract.formats.batch import (
    PREV_EPOCH,
    Batch,
    BatchMismatch,
    DecompressedTooLarge,
    DecompressionFailed,
    decompress_body,
    encode_batch,
    encode_snapshot_chunk,
)
from engram_contract.formats.entry import encode_entry
from engram_contract.formats.frame import (
    BODY_LENGTH_OFFSET,
    CRC_OFFSET,
    FLAG_COMPRESSED,
    HEADER,
    HEADER_SIZE,
    NO_SPACE,
    VERSION,
    DecoderPoisoned,
    Frame,
    FrameDecoder,
    MalformedFrame,
    MessageType,
    TruncatedFrame,
    UnknownMessageType,
    encode_frame,
)
from engram_contract.formats.messages import (
    MAX_NACK_MESSAGE,
    PROTOCOL_VERSION,
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
from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId, space_wire_id

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "wire-format.md"
SPACE = space_wire_id(SpaceId("default"))
T0 = 1_700_000_000_000_000_000
SETTINGS = settings(max_examples=60, deadline=None)
_RESENDS = (NackReason.GAP, NackReason.DIVERGED)  # refusals that must say where to resend from


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
    # Epoch 3 began at 7: the entry before the batch, 6, was written at epoch 2.
    return encode_batch(
        space=SPACE, epoch=3, first_seq=7, last_seq=8, count=2, entries=entries(7, 8),
        prev_epoch=2, compress=compress,
    )  # fmt: skip


def sample_heartbeat() -> bytes:
    return Heartbeat(
        SPACE, Epoch(3), Sequence(8), T0 + 8_000, T0 + 500_000_000, Epoch(3)
    ).encode()  # fmt: skip


def sample_ack() -> bytes:
    # 7 durable and matched; the log ends at entry 8 of epoch 3 (appended, fsync pending).
    return Ack(SPACE, Epoch(3), Sequence(7), T0 + 600_000_000, Sequence(8), Epoch(3)).encode()


def sample_nack_gap() -> bytes:
    return Nack(
        NackReason.GAP, Sequence(7), "log ends at 6, batch follows 8", SPACE, Epoch(3), Epoch(2)
    ).encode()


def sample_nack_diverged() -> bytes:
    # The worked example of docs/wire-format.md "Log matching": entry 10 of epoch 1 is the fork.
    return Nack(
        NackReason.DIVERGED, Sequence(11), "entry 14 is epoch 2 here, 1 on the primary",
        SPACE, Epoch(3), Epoch(1),
    ).encode()  # fmt: skip


GOLDEN: dict[str, Callable[[], bytes]] = {
    "heartbeat": sample_heartbeat,
    "ack": sample_ack,
    "nack": sample_nack_gap,
    "nack_diverged": sample_nack_diverged,
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


def test_version_is_2_in_every_frame_and_the_handshake() -> None:
    assert VERSION == PROTOCOL_VERSION == 2
    for name in sorted(GOLDEN):
        assert golden(name)[4] == 2, name
    assert "# Wire protocol v2" in DOC.read_text()


def test_doc_nack_reasons_table_lists_every_reason() -> None:
    text = DOC.read_text()
    for reason in NackReason:
        assert f"| {reason.value} | {reason.name} |" in text, reason
    assert NackReason.DIVERGED.value == 8


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
    st.characters(min_codepoint=0x20, blacklist_categories=["Cs"]), min_size=1, max_size=60
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
@given(space=spaces, epoch=u64, seqs=st.tuples(u64, u64), ts=u64, last_epoch=u64)
def test_ack_roundtrip(
    space: bytes, epoch: int, seqs: tuple[int, int], ts: int, last_epoch: int
) -> None:
    seq, last = sorted(seqs)
    msg = Ack(space, Epoch(epoch), Sequence(seq), ts, Sequence(last), Epoch(last_epoch))
    assert roundtrip(msg.encode()) == msg


def test_ack_body_layout() -> None:
    msg = roundtrip(sample_ack())
    assert msg == Ack(SPACE, Epoch(3), Sequence(7), T0 + 600_000_000, Sequence(8), Epoch(3))
    assert sample_ack()[HEADER_SIZE:] == struct.pack("<QQQQ", 7, T0 + 600_000_000, 8, 3)
    caught_up = Ack(SPACE, Epoch(3), Sequence(8), 0, Sequence(8), Epoch(3))  # sequence = last_seq
    assert roundtrip(caught_up.encode()) == caught_up


@pytest.mark.parametrize(
    "build",
    [
        lambda: Ack(SPACE, Epoch(3), Sequence(8), 0).encode(),  # last_seq defaults to 0
        lambda: Heartbeat(SPACE, Epoch(3), Sequence(8), 0, 0, Epoch(4)).encode(),
    ],
    ids=["ack-sequence-past-last", "heartbeat-last-epoch-past-epoch"],
)
def test_message_encode_refuses_what_decode_refuses(build: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        build()


@SETTINGS
@given(space=spaces, epochs=st.tuples(u64, u64), last=u64, last_ts=u64, sent=u64)
def test_heartbeat_roundtrip(
    space: bytes, epochs: tuple[int, int], last: int, last_ts: int, sent: int
) -> None:
    last_epoch, epoch = sorted(epochs)
    msg = Heartbeat(space, Epoch(epoch), Sequence(last), last_ts, sent, Epoch(last_epoch))
    assert roundtrip(msg.encode()) == msg


def test_heartbeat_body_layout() -> None:
    assert roundtrip(sample_heartbeat()) == Heartbeat(
        SPACE, Epoch(3), Sequence(8), T0 + 8_000, T0 + 500_000_000, Epoch(3)
    )
    assert sample_heartbeat()[HEADER_SIZE:] == struct.pack(
        "<QQQQ", 8, T0 + 8_000, T0 + 500_000_000, 3
    )


@SETTINGS
@given(
    reason=st.sampled_from(NackReason),
    resend=st.integers(1, 2**64 - 1),
    text=st.text(max_size=100),
    space=st.one_of(st.just(NO_SPACE), spaces),
    epoch=u64,
    hint=u64,
)
def test_nack_roundtrip(
    *, reason: NackReason, resend: int, text: str, space: bytes, epoch: int, hint: int
) -> None:
    msg = Nack(reason, Sequence(resend), text, space, Epoch(epoch), Epoch(hint))
    assert roundtrip(msg.encode()) == msg


@pytest.mark.parametrize("reason", [r for r in NackReason if r not in _RESENDS])
def test_nack_without_resend_point_roundtrips_for_other_reasons(reason: NackReason) -> None:
    msg = Nack(reason, Sequence(0), "no", SPACE, Epoch(4))
    assert roundtrip(msg.encode()) == msg


def test_nack_diverged_body_layout() -> None:
    msg = roundtrip(sample_nack_diverged())
    assert msg == Nack(
        NackReason.DIVERGED, Sequence(11), "entry 14 is epoch 2 here, 1 on the primary",
        SPACE, Epoch(3), Epoch(1),
    )  # fmt: skip
    body = sample_nack_diverged()[HEADER_SIZE:]
    assert body[:18] == struct.pack("<HQQ", 8, 11, 1)
    assert body[18:] == b"entry 14 is epoch 2 here, 1 on the primary"


@SETTINGS
@given(
    first=st.integers(1, 2**40),
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    epoch=st.integers(0, 2**32),
    compress=st.sampled_from([False, True, 1, 9]),
    space=spaces,
    prev=st.integers(0, 2**32),
)
def test_batch_roundtrip(
    *, first: int, payloads: list[bytes], epoch: int, compress: bool | int, space: bytes, prev: int
) -> None:
    body = b"".join(
        encode_entry(sequence=first + i, timestamp_ns=T0 + i, entry_type=2, epoch=epoch, payload=p)
        for i, p in enumerate(payloads)
    )
    last = first + len(payloads) - 1
    prev_epoch = 0 if first == 1 else prev % (epoch + 1)
    msg = Batch(
        space, Epoch(epoch), Sequence(first), Sequence(last), len(payloads), body, Epoch(prev_epoch)
    )
    data = msg.encode(compress=compress)
    assert roundtrip(data) == msg


@pytest.mark.parametrize("compress", [False, True])
def test_batch_prev_epoch_leads_the_body_uncompressed(compress: bool) -> None:
    big = entries(7, 60, size=100)
    data = encode_batch(
        space=SPACE, epoch=3, first_seq=7, last_seq=60, count=54, entries=big, prev_epoch=2,
        compress=compress,
    )  # fmt: skip
    frame = one(data)
    assert frame.compressed is compress
    assert frame.body[: PREV_EPOCH.size] == struct.pack("<Q", 2)
    rest = frame.body[PREV_EPOCH.size :]
    assert rest.startswith(bytes.fromhex("28b52ffd")) if compress else rest == big
    msg = roundtrip(data)
    assert isinstance(msg, Batch)
    assert (msg.prev_epoch, msg.entries) == (2, big)


def test_snapshot_chunk_carries_prev_epoch_like_a_batch() -> None:
    data = encode_snapshot_chunk(
        space=SPACE, epoch=3, first_seq=7, last_seq=8, count=2, entries=entries(7, 8),
        prev_epoch=2,
    )  # fmt: skip
    frame = one(data)
    assert frame.msg_type is MessageType.SNAPSHOT_CHUNK
    assert frame.body == struct.pack("<Q", 2) + entries(7, 8)
    msg = decode_message(frame)
    assert msg == Batch(SPACE, Epoch(3), Sequence(7), Sequence(8), 2, entries(7, 8), Epoch(2))


def test_batch_compresses_when_it_pays_and_not_otherwise() -> None:
    big = entries(1, 100, size=100)
    packed = encode_batch(
        space=SPACE, epoch=3, first_seq=1, last_seq=100, count=100, entries=big, prev_epoch=0,
        compress=True,
    )  # fmt: skip
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
            space=SPACE, epoch=3, first_seq=1, last_seq=1, count=1, entries=noise, prev_epoch=0,
            compress=True,
        )
    )  # fmt: skip
    assert not raw.compressed, "incompressible entries must go raw"
    assert raw.body == bytes(8) + noise


# --- the decoder: chunking, truncation, corruption -----------------------------------------------


def stream() -> tuple[bytes, list[Frame]]:
    parts = [GOLDEN[name]() for name in sorted(GOLDEN)]
    parts.append(sample_batch(compress=True))
    parts.append(
        encode_batch(
            space=SPACE, epoch=3, first_seq=1, last_seq=50, count=50,
            entries=entries(1, 50, size=100), prev_epoch=0, compress=True,
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
    [
        sample_batch,
        lambda: sample_batch(compress=True),
        sample_heartbeat,
        sample_ack,
        sample_nack_gap,
        sample_nack_diverged,
    ],
    ids=["batch", "batch-zstd-small", "heartbeat", "ack", "nack", "nack-diverged"],
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
        entries=entries(1, 20, size=40), prev_epoch=0, compress=True,
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
        ({"version": 1}, MalformedFrame, r"version 1 \(this decoder speaks 2\)"),  # a v1 peer
        ({"version": 3}, MalformedFrame, "version 3"),
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
    small = FrameDecoder(max_body=31)
    with pytest.raises(FrameTooLarge, match="32-byte body, over the 31-byte limit"):
        small.feed(sample_heartbeat()[:HEADER_SIZE])
    assert FrameDecoder(max_body=32).feed(sample_heartbeat())


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
        (encode_frame(MessageType.ACK, bytes(31), space=SPACE), "ACK body is 31 bytes, must be 32"),
        (encode_frame(MessageType.ACK, bytes(16), space=SPACE), "ACK body is 16 bytes"),  # v1's
        (encode_frame(MessageType.ACK, bytes(32)), "ACK must name a space"),
        (
            encode_frame(MessageType.ACK, struct.pack("<QQQQ", 9, 0, 8, 3), space=SPACE, epoch=3),
            "ACK of sequence 9 beyond the log's last entry 8",
        ),
        (encode_frame(MessageType.HEARTBEAT, bytes(32), space=SPACE, count=1), "must leave"),
        (encode_frame(MessageType.HEARTBEAT, bytes(24), space=SPACE), "24 bytes, must be 32"),
        (
            encode_frame(
                MessageType.HEARTBEAT, struct.pack("<QQQQ", 8, 0, 0, 4), space=SPACE, epoch=3
            ),
            "HEARTBEAT last_epoch 4 above its epoch 3",
        ),
        (encode_frame(MessageType.WELCOME, epoch=1), "connection-level"),
        (encode_frame(MessageType.WELCOME, space=SPACE), "connection-level"),
        (encode_frame(MessageType.WELCOME, b"x"), "WELCOME body is 1 bytes, must be 0"),
        (encode_frame(MessageType.AUTH, bytes(31)), "AUTH body is 31 bytes, must be 32"),
        (encode_frame(MessageType.HELLO, bytes(34)), "at least 35"),
        (encode_frame(MessageType.HELLO, bytes(34) + b"a\0b"), "invalid node name"),
        (encode_frame(MessageType.HELLO, bytes(34) + b"\xff"), "invalid node name"),
        (encode_frame(MessageType.NACK, struct.pack("<HQQ", 99, 0, 0)), "unknown NACK reason 99"),
        (encode_frame(MessageType.NACK, struct.pack("<HQQ", 2, 0, 3)), "GAP NACK without"),
        (encode_frame(MessageType.NACK, struct.pack("<HQQ", 8, 0, 3)), "DIVERGED NACK without"),
        (encode_frame(MessageType.NACK, struct.pack("<HQ", 2, 9)), "at least 18"),  # v1's
        (encode_frame(MessageType.NACK, struct.pack("<HQQ", 1, 0, 0) + b"\xc3"), "not UTF-8"),
        (encode_frame(MessageType.NACK, bytes(18 + MAX_NACK_MESSAGE + 1)), "over 512"),
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
        lambda: Nack(NackReason.DIVERGED, epoch_hint=Epoch(2)).encode(),
        lambda: encode_frame(MessageType.ACK, space=b"short"),
        lambda: encode_frame(MessageType.ACK, flags=FLAG_COMPRESSED),
        lambda: encode_frame(MessageType.ACK, epoch=-1),
        lambda: _batch(first=7, last=8, count=3, body=b"", prev=2),
        lambda: _batch(first=0, last=0, count=1, body=b"", prev=0),
        lambda: _batch(prev=4),  # above the frame's epoch 3
        lambda: _batch(prev=-1),
        lambda: _batch(first=1, last=2, body=entries(1, 2), prev=1),  # nothing precedes entry 1
        lambda: _batch(prev=4, chunk=True),
        lambda: _batch(first=1, last=2, body=entries(1, 2), prev=2, chunk=True),
    ],
)
def test_message_encode_rejects_invalid_values(build: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        build()


def _batch(
    *,
    first: int = 7,
    last: int = 8,
    count: int | None = None,
    body: bytes | None = None,
    prev: int,
    chunk: bool = False,
) -> bytes:
    encode = encode_snapshot_chunk if chunk else encode_batch
    return encode(
        space=SPACE,
        epoch=3,
        first_seq=first,
        last_seq=last,
        count=last - first + 1 if count is None else count,
        entries=entries(first, last) if body is None else body,
        prev_epoch=prev,
    )


def test_message_encode_accepts_prev_epoch_bounds() -> None:
    for prev in (0, 1, 3):  # anything from 0 up to the frame's epoch
        msg = roundtrip(_batch(prev=prev))
        assert isinstance(msg, Batch)
        assert msg.prev_epoch == prev
    assert isinstance(roundtrip(_batch(first=1, last=2, prev=0)), Batch)


# --- BATCH body checks and decompression limits --------------------------------------------------


def _raw_batch(
    body: bytes,
    *,
    first: int,
    last: int,
    count: int,
    epoch: int = 3,
    prev: int | None = 0,
    msg_type: MessageType = MessageType.BATCH,
) -> Frame:
    """A BATCH frame built by hand: `prev` None leaves the prev_epoch field out (v1's layout)."""
    prefix = b"" if prev is None else struct.pack("<Q", prev)
    return one(
        encode_frame(
            msg_type, prefix + body, epoch=epoch, space=SPACE,
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


@pytest.mark.parametrize("msg_type", [MessageType.BATCH, MessageType.SNAPSHOT_CHUNK])
@pytest.mark.parametrize(
    ("body", "header", "prev", "match"),
    [
        (b"", (7, 7, 1, 3), None, "body of 0 bytes has no prev_epoch field"),
        (bytes(7), (7, 7, 1, 3), None, "body of 7 bytes has no prev_epoch field"),
        (
            entries(7, 8),
            (7, 8, 2, 3),
            4,
            "prev_epoch 4 is impossible before entry 7 at frame epoch 3",
        ),
        (entries(7, 8), (7, 8, 2, 0), 1, "prev_epoch 1 is impossible"),
        (entries(1, 2), (1, 2, 2, 3), 1, "prev_epoch 1 is impossible before entry 1"),
        (entries(1, 2), (1, 2, 2, 3), 3, "prev_epoch 3 is impossible before entry 1"),
        # A v1 body (entries straight away): magic and sequence read as prev_epoch 0x7deadbeef.
        (entries(7, 8), (7, 8, 2, 3), None, "prev_epoch 33800699631 is impossible"),
    ],
)
def test_batch_prev_epoch_checked(
    body: bytes,
    header: tuple[int, int, int, int],
    prev: int | None,
    match: str,
    msg_type: MessageType,
) -> None:
    first, last, count, epoch = header
    frame = _raw_batch(
        body, first=first, last=last, count=count, epoch=epoch, prev=prev, msg_type=msg_type
    )
    with pytest.raises(BatchMismatch, match=match):
        decode_message(frame)


def test_batch_prev_epoch_checked_before_decompressing() -> None:
    packed = zstandard.ZstdCompressor().compress(entries(7, 8))
    for prev in (4, 2**64 - 1):
        frame = one(
            encode_frame(
                MessageType.BATCH, struct.pack("<Q", prev) + packed, epoch=3, space=SPACE,
                first_seq=7, last_seq=8, count=2, flags=FLAG_COMPRESSED,
            )
        )  # fmt: skip
        with pytest.raises(BatchMismatch, match="impossible"):
            decode_message(frame)
    # v1's compressed body (no prev_epoch): the zstd magic is not a possible epoch either.
    with pytest.raises(BatchMismatch, match="impossible"):
        decode_message(_bomb_frame(packed, prev=None))


def _bomb_frame(packed: bytes, *, prev: int | None = 0) -> Frame:
    prefix = b"" if prev is None else struct.pack("<Q", prev)
    return one(
        encode_frame(
            MessageType.BATCH, prefix + packed, epoch=3, space=SPACE,
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
    pkg = ROOT / "contract" / "engram_contract" / "formats"
    for name in ("frame.py", "messages.py", "batch.py", "handshake.py", "entry.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse((pkg / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"asyncio", "socket", "selectors", "ssl"}, name
