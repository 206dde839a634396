"""The binary write body (`engram_contract.formats.records`): the golden example in docs/api.md,
every malformed case, and that the one-buffer encoder writes what the per-entry encoder does."""

from __future__ import annotations

import gc
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engram_contract.formats import records
from engram_contract.formats.entry import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    EntryType,
    encode_entries,
    encode_entry,
    iter_entries,
)
from engram_contract.formats.records import RecordsError, decode_records, encode_records

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _golden(name: str) -> bytes:
    m = re.search(rf"<!-- golden:{name} -->\n```text\n([0-9a-f\s]+?)```", DOC.read_text())
    assert m, f"no golden:{name} block in {DOC}"
    return bytes.fromhex("".join(m.group(1).split()))


def _rec(etype: int, payload: bytes, *, length: int | None = None) -> bytes:
    return struct.pack("<II", etype, len(payload) if length is None else length) + payload


GOLDEN_RECORDS = [(1, b'{"what":"met Ada"}'), (3, b"\x00\x01\xff")]


def test_records_golden_example_in_api_doc() -> None:
    body = _golden("records")
    assert len(body) == 37
    assert encode_records(GOLDEN_RECORDS) == body
    assert [(t, bytes(p)) for t, p in decode_records(body)] == GOLDEN_RECORDS


def test_records_header_is_declared_once_and_documented() -> None:
    assert records.RECORD_HEADER.format == "<II"
    assert records.RECORD_HEADER_SIZE == 8
    assert f'`"{records.RECORD_HEADER.format}"`' in DOC.read_text()


def test_records_decode_leaves_nothing_for_the_garbage_collector_to_walk() -> None:
    """A primary holds each request's records until its acks are in. Views into the body
    were objects the collector tracks, thousands per request, and under load a backlog of
    them made every collection longer (records.decode_records): payloads are bytes now."""
    body = bytearray(_rec(1, b"abc") + _rec(6, b"") + _rec(2, b"z" * 300))
    out = decode_records(body)
    assert out == [(1, b"abc"), (6, b""), (2, b"z" * 300)]
    assert all(type(p) is bytes for _, p in out)
    gc.collect(0)  # tuples of untracked objects are untracked at their first collection
    assert not any(gc.is_tracked(r) or gc.is_tracked(r[1]) for r in out)
    body[8] = ord("X")  # a copy: the request buffer can go
    assert out[0][1] == b"abc"
    assert decode_records(memoryview(bytes(body))) == decode_records(bytes(body))


@pytest.mark.parametrize(
    ("body", "code", "record", "offset"),
    [
        (b"", records.EMPTY, 0, 0),
        (b"\x01\x00\x00", records.TRUNCATED, 0, 0),
        (_rec(1, b"ok") + b"\x01\x00\x00\x00\x05\x00\x00", records.TRUNCATED, 1, 10),
        (_rec(1, b"ok") + _rec(1, b"abc", length=4), records.PAST_END, 1, 10),
        (_rec(1, b"", length=1), records.PAST_END, 0, 0),
        (_rec(1, b"ok") + _rec(7, b"x"), records.UNKNOWN_TYPE, 1, 10),
        (_rec(0, b"x"), records.UNKNOWN_TYPE, 0, 0),
        (_rec(0xFFFFFFFF, b"x"), records.UNKNOWN_TYPE, 0, 0),
        (_rec(1, b"", length=MAX_PAYLOAD + 1), records.TOO_LARGE, 0, 0),
        (_rec(1, b"", length=0xFFFFFFFF), records.TOO_LARGE, 0, 0),
    ],
)
def test_records_malformed_bodies_are_refused_with_a_code(
    body: bytes, code: str, record: int, offset: int
) -> None:
    with pytest.raises(RecordsError) as err:
        decode_records(body)
    assert (err.value.code, err.value.record, err.value.offset) == (code, record, offset)
    assert f"record {record}" in str(err.value) or code == records.EMPTY


def test_records_limits_are_the_callers() -> None:
    body = _rec(1, b"x") * 3
    assert len(decode_records(body, max_records=3)) == 3
    with pytest.raises(RecordsError) as err:
        decode_records(body, max_records=2)
    assert (err.value.code, err.value.record) == (records.TOO_MANY, 2)
    with pytest.raises(RecordsError) as err:
        decode_records(_rec(1, b"abcd"), max_payload=3)
    assert err.value.code == records.TOO_LARGE


def test_records_encoder_refuses_what_the_server_would() -> None:
    with pytest.raises(ValueError, match="at least one record"):
        encode_records([])
    with pytest.raises(ValueError, match="entry type 9"):
        encode_records([(9, b"x")])


@given(
    st.lists(
        st.tuples(st.sampled_from([int(t) for t in EntryType]), st.binary(max_size=300)),
        min_size=1,
        max_size=30,
    )
)
def test_records_round_trip(recs: list[tuple[int, bytes]]) -> None:
    assert [(t, bytes(p)) for t, p in decode_records(encode_records(recs))] == recs


@given(
    st.lists(
        st.tuples(st.sampled_from([int(t) for t in EntryType]), st.binary(max_size=300)),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 2**40),
    st.integers(0, 2**62),
    st.integers(0, 2**40),
)
def test_encode_entries_is_byte_identical_to_the_per_entry_encoder(
    recs: list[tuple[int, bytes]], first: int, ts: int, epoch: int
) -> None:
    data, ends = encode_entries(recs, first_sequence=first, timestamp_ns=ts, epoch=epoch)
    want = [
        encode_entry(sequence=first + i, timestamp_ns=ts, entry_type=t, epoch=epoch, payload=p)
        for i, (t, p) in enumerate(recs)
    ]
    assert data == b"".join(want)
    assert ends == [sum(len(w) for w in want[: i + 1]) for i in range(len(want))]
    assert ends[-1] == len(data) == HEADER_SIZE * len(recs) + sum(len(p) for _, p in recs)


def test_encode_entries_takes_views_of_a_binary_body() -> None:
    body = encode_records([(1, b"alpha"), (2, b"")])
    data, _ = encode_entries(decode_records(body), first_sequence=5, timestamp_ns=9, epoch=2)
    got = iter_entries(data)  # every CRC checked
    assert [(e.sequence, e.entry_type, e.epoch, e.payload) for e in got] == [
        (5, 1, 2, b"alpha"),
        (6, 2, 2, b""),
    ]


def test_encode_entries_of_nothing() -> None:
    assert encode_entries([], first_sequence=1, timestamp_ns=0, epoch=1) == (b"", [])
