"""The on-disk WAL entry codec: layout, CRCs, and that every single-bit flip is caught."""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from engram_contract.errors import WalCorruption
from engram_contract.formats.entry import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Entry,
    EntryHeader,
    EntryType,
    check_payload,
    decode_header,
    encode_entry,
    iter_entries,
)


def _crc32c_reference(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli, reflected polynomial 0x82F63B78), independent of the library."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _decode_all(buf: bytes) -> tuple[EntryHeader, bytes]:
    h = decode_header(buf)
    assert isinstance(h, EntryHeader), h
    body = buf[HEADER_SIZE:]
    assert check_payload(h, body) is None
    return h, body


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert _crc32c_reference(b"123456789") == 0xE3069283


def test_entry_golden_header_layout() -> None:
    payload = b"hello, engram"
    buf = encode_entry(
        sequence=0x0102030405060708,
        timestamp_ns=1_700_000_000_123_456_789,
        entry_type=EntryType.MEMORY_UPDATE,
        epoch=7,
        payload=payload,
    )
    assert len(buf) == HEADER_SIZE + len(payload) == 64 + 13
    assert buf[0:4] == bytes([0xEF, 0xBE, 0xAD, 0xDE])
    assert buf[4:12] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert struct.unpack_from("<Q", buf, 12)[0] == 1_700_000_000_123_456_789
    assert struct.unpack_from("<I", buf, 20)[0] == 2
    assert struct.unpack_from("<I", buf, 24)[0] == len(payload)
    assert struct.unpack_from("<I", buf, 28)[0] == _crc32c_reference(payload)
    assert struct.unpack_from("<Q", buf, 36)[0] == 7
    assert buf[44:56] == bytes(12)
    assert buf[56:64] == bytes(8)
    want_hcrc = _crc32c_reference(buf[0:32] + buf[36:56])
    assert struct.unpack_from("<I", buf, 32)[0] == want_hcrc
    assert buf[64:] == payload


def test_entry_golden_bytes() -> None:
    # A fixed vector: any change to the layout shows up here byte for byte.
    buf = encode_entry(sequence=1, timestamp_ns=2, entry_type=3, epoch=4, payload=b"x")
    pcrc = _crc32c_reference(b"x")
    head_wo_crc = (
        bytes.fromhex("efbeadde")
        + (1).to_bytes(8, "little")
        + (2).to_bytes(8, "little")
        + (3).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
        + pcrc.to_bytes(4, "little")
    )
    tail = (4).to_bytes(8, "little") + bytes(12)
    hcrc = _crc32c_reference(head_wo_crc + tail)
    assert buf == head_wo_crc + hcrc.to_bytes(4, "little") + tail + bytes(8) + b"x"


@given(
    sequence=st.integers(0, 2**64 - 1),
    timestamp_ns=st.integers(0, 2**64 - 1),
    entry_type=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=2048),
)
def test_entry_round_trip(
    sequence: int, timestamp_ns: int, entry_type: int, epoch: int, payload: bytes
) -> None:
    buf = encode_entry(
        sequence=sequence,
        timestamp_ns=timestamp_ns,
        entry_type=entry_type,
        epoch=epoch,
        payload=payload,
    )
    h, body = _decode_all(buf)
    assert (h.sequence, h.timestamp_ns, h.entry_type, h.epoch) == (
        sequence,
        timestamp_ns,
        entry_type,
        epoch,
    )
    assert h.payload_size == len(payload)
    assert body == payload
    assert iter_entries(buf) == [Entry(sequence, epoch, timestamp_ns, entry_type, payload)]


@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_entry_iter_entries_decodes_a_run(payloads: list[bytes]) -> None:
    data = b"".join(
        encode_entry(sequence=10 + i, timestamp_ns=i, entry_type=1, epoch=2, payload=p)
        for i, p in enumerate(payloads)
    )
    got = iter_entries(data)
    assert [e.sequence for e in got] == list(range(10, 10 + len(payloads)))
    assert [e.payload for e in got] == payloads


def _detected(buf: bytes) -> bool:
    h = decode_header(buf)
    if isinstance(h, str):
        return True
    return check_payload(h, buf[HEADER_SIZE:]) is not None


@pytest.mark.parametrize("payload", [b"", b"p", b"an episodic memory payload \x00\xff"])
def test_entry_every_single_bit_flip_is_detected(payload: bytes) -> None:
    buf = encode_entry(
        sequence=123456, timestamp_ns=987654321, entry_type=1, epoch=3, payload=payload
    )
    assert not _detected(buf)
    for bit in range(len(buf) * 8):
        flipped = bytearray(buf)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert _detected(bytes(flipped)), f"flip of bit {bit % 8} in byte {bit // 8} missed"


@pytest.mark.parametrize("offset", range(56, 64))
def test_entry_nonzero_unused_bytes_are_rejected(offset: int) -> None:
    buf = bytearray(encode_entry(sequence=1, timestamp_ns=1, entry_type=1, epoch=1, payload=b""))
    buf[offset] = 0x01
    assert isinstance(decode_header(bytes(buf)), str)


def test_entry_flip_in_iter_entries_names_the_offset() -> None:
    a = encode_entry(sequence=1, timestamp_ns=1, entry_type=1, epoch=1, payload=b"aaaa")
    b = bytearray(encode_entry(sequence=2, timestamp_ns=1, entry_type=1, epoch=1, payload=b"bbbb"))
    b[HEADER_SIZE + 1] ^= 0x10
    with pytest.raises(WalCorruption) as exc:
        iter_entries(a + bytes(b), where="seg")
    assert exc.value.path == "seg"
    assert exc.value.offset == len(a)


def test_entry_short_header_is_reported() -> None:
    buf = encode_entry(sequence=1, timestamp_ns=1, entry_type=1, epoch=1, payload=b"")
    assert decode_header(buf[:63]) == "short header"


def test_entry_oversized_payload_size_is_refused() -> None:
    # A header claiming more than MAX_PAYLOAD is refused even with a valid CRC.
    buf = bytearray(encode_entry(sequence=1, timestamp_ns=1, entry_type=1, epoch=1, payload=b""))
    struct.pack_into("<I", buf, 24, MAX_PAYLOAD + 1)
    struct.pack_into("<I", buf, 32, crc32c(bytes(buf[36:56]), crc32c(bytes(buf[:32]))))
    reason = decode_header(bytes(buf))
    assert isinstance(reason, str)
    assert "limit" in reason
