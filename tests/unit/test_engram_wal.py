"""Engram's own WAL files: names, the entry as Engram lays it out, torn tails, corruption."""

from __future__ import annotations

import struct

import pytest

from engram_contract.formats import engram_wal as ew


def _crc32c_reference(data: bytes) -> int:
    """Bitwise CRC32C (reflected 0x82F63B78), independent of the library the codec uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _engram_entry(seq: int, ts: int, etype: int, payload: bytes) -> bytes:
    """An entry built field by field the way `WalEntryHeader::as_bytes` writes it."""
    pcrc = _crc32c_reference(payload)
    covered = (
        struct.pack("<I", 0xDEADBEEF)
        + struct.pack("<Q", seq)
        + struct.pack("<Q", ts)
        + struct.pack("<I", etype)
        + struct.pack("<I", len(payload))
        + struct.pack("<I", pcrc)
        + bytes(20)
    )
    hcrc = _crc32c_reference(covered)
    return covered[:32] + struct.pack("<I", hcrc) + bytes(20) + bytes(8) + payload


def test_crc_vector() -> None:
    assert _crc32c_reference(b"123456789") == 0xE3069283


def test_golden_entry() -> None:
    got = ew.encode(sequence=7, timestamp_ns=1_700_000_000_123_456_789, entry_type=3, payload=b"m1")
    assert got == _engram_entry(7, 1_700_000_000_123_456_789, 3, b"m1")
    assert got[:4] == bytes.fromhex("efbeadde")
    assert len(got) == 64 + 2
    # A fixed vector, so a change of layout can't pass by changing both sides.
    assert got.hex() == (
        "efbeadde"
        "0700000000000000"
        "15cd853dfe9c9717"
        "03000000"
        "02000000"
        "75a24973"
        "bd324b8c" + "00" * 28 + "6d31"
    )


def test_file_names() -> None:
    assert ew.file_name(0x6571_0000) == "wal-0000000065710000.log"
    assert ew.file_seconds("wal-0000000065710000.log") == 0x65710000
    for bad in (
        "wal-65710000.log",
        "wal-0000000065710000.log.tmp",
        "x.log",
        "wal-000000006571000G.log",
    ):
        assert ew.file_seconds(bad) is None
    assert ew.COMPACTION_TEMP.match("wal-0000000065710000.log.tmp")


def test_scan_entries_and_offsets() -> None:
    data = b"".join(_engram_entry(i, 10 + i, 1, bytes([i]) * i) for i in range(5))
    r = ew.scan(data, base=100)
    assert r.stop is ew.Stop.END
    assert [e.sequence for e in r.entries] == [0, 1, 2, 3, 4]
    assert [e.payload for e in r.entries] == [bytes([i]) * i for i in range(5)]
    assert r.entries[0].offset == 100 and r.end == 100 + len(data)
    assert r.entries[1].offset == r.entries[0].end
    limited = ew.scan(data, max_entries=2)
    assert len(limited.entries) == 2 and limited.end == limited.entries[1].end


@pytest.mark.parametrize("cut", [1, 20, 63, 64, 65, 70])
def test_torn_tail_waits(cut: int) -> None:
    whole = _engram_entry(0, 1, 1, b"a" * 10) + _engram_entry(1, 2, 1, b"b" * 10)
    first = 74
    r = ew.scan(whole[: first + cut])
    assert r.stop is ew.Stop.TORN
    assert len(r.entries) == 1 and r.end == first


def test_zero_fill_is_torn_not_corrupt() -> None:
    good = _engram_entry(0, 1, 1, b"x")
    r = ew.scan(good + bytes(4096))
    assert r.stop is ew.Stop.TORN and r.end == len(good)
    # A header on disk whose payload pages are still zeros.
    head_only = _engram_entry(1, 2, 1, b"yyyy")[:64] + bytes(4)
    r = ew.scan(good + head_only)
    assert r.stop is ew.Stop.TORN and r.end == len(good)


def test_corrupt_entry_mid_file() -> None:
    a, b, c = (_engram_entry(i, i, 1, b"payload%d" % i) for i in range(3))
    for offset in (0, 5, 13, 21, 25, 29, 33, 40, 64 + 3):
        bad = bytearray(b)
        bad[offset] ^= 0x10
        r = ew.scan(a + bytes(bad) + c)
        assert r.stop is ew.Stop.CORRUPT, offset
        assert r.end == len(a) and len(r.entries) == 1
        assert r.reason


def test_unused_bytes_are_not_checked_as_engram_does() -> None:
    e = bytearray(_engram_entry(0, 1, 1, b"z"))
    e[60] = 0xFF  # bytes 56..64: outside every CRC in Engram
    assert ew.scan(bytes(e)).stop is ew.Stop.END


def test_oversized_payload_is_corrupt() -> None:
    head = bytearray(_engram_entry(0, 1, 1, b"")[:64])
    struct.pack_into("<I", head, 24, ew.MAX_PAYLOAD + 1)
    struct.pack_into("<I", head, 32, _crc32c_reference(bytes(head[:32] + head[36:56])))
    assert ew.scan(bytes(head)).stop is ew.Stop.CORRUPT


def test_recover_follows_engram_reader() -> None:
    a, b, c, d = (_engram_entry(i, i, 1, b"p%d" % i) for i in range(4))
    bad_payload = bytearray(b)
    bad_payload[-1] ^= 1
    bad_header = bytearray(d)
    bad_header[0] ^= 1
    got = ew.recover(a + bytes(bad_payload) + c + bytes(bad_header) + a)
    # Payload CRC failure: skipped; bad header: the rest of the file is dropped.
    assert [e.sequence for e in got] == [0, 2]
    assert [e.sequence for e in ew.recover(a + b[:30])] == [0]
    with pytest.raises(ValueError, match="cut short"):
        ew.recover(a + b[:65])
