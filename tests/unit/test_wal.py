"""The WAL store: sequences, segments, reads, recovery, epochs, the replica path, disk failures."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engram_contract.errors import InvalidSpaceId, WalCorruption, WalError
from engram_contract.formats.entry import HEADER_SIZE, EntryType, encode_entry
from engram_contract.ids import SpaceId, validate_space_id
from engram_sidecar.errors import SequenceError, WalClosed, WalIOError
from engram_sidecar.log.segment import INDEX_EVERY, scan, segment_name
from engram_sidecar.log.verify import verify_space
from engram_sidecar.log.wal import SpaceLog, WalStore

TS = 1_700_000_000_000_000_000
SPACE = SpaceId("space-1")


def _clock() -> int:
    return TS


def payload_for(seq: int) -> bytes:
    # Sizes vary with the sequence so that offsets are not a multiple of anything.
    return f"episode {seq:06d}".encode() + bytes(seq % 13)


def expected(seq: int, epoch: int = 1) -> bytes:
    return encode_entry(
        sequence=seq,
        timestamp_ns=TS,
        entry_type=EntryType.EPISODE_STORE,
        epoch=epoch,
        payload=payload_for(seq),
    )


def open_log(
    root: Path,
    *,
    segment_bytes: int = 1 << 20,
    on_torn_tail: Callable[[int], None] | None = None,
) -> SpaceLog:
    return SpaceLog(
        root / SPACE,
        space=SPACE,
        segment_bytes=segment_bytes,
        clock_ns=_clock,
        on_torn_tail=on_torn_tail,
    )


def fill(lg: SpaceLog, n: int, *, epoch: int = 1) -> None:
    for _ in range(n):
        seq = lg.next_sequence
        first, last = lg.append([(EntryType.EPISODE_STORE, payload_for(seq))], epoch=epoch)
        assert first == last == seq


def read_all(lg: SpaceLog, start: int | None = None) -> bytes:
    out = bytearray()
    seq = lg.first_sequence if start is None else start
    while seq <= lg.last_sequence:
        r = lg.read(seq)
        assert r.count > 0
        assert r.first_sequence == seq
        out += r.data
        seq = r.last_sequence + 1
    return bytes(out)


def active_path(lg: SpaceLog) -> Path:
    return lg.segments[-1].path


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


# ---- sequences ------------------------------------------------------------------------------


def test_wal_sequences_start_at_one(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    assert (lg.first_sequence, lg.last_sequence, lg.next_sequence) == (1, 0, 1)
    assert lg.append([(1, b"a")], epoch=1) == (1, 1)
    lg.close()


def test_wal_sequences_are_strictly_monotonic(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=2000)
    seen: list[int] = []
    for n in [1, 3, 1, 7, 2, 1, 20, 5]:
        first, last = lg.append([(1, b"x" * 40)] * n, epoch=1)
        assert last - first + 1 == n
        seen.extend(range(first, last + 1))
    assert seen == list(range(1, len(seen) + 1))
    lg.close()


def test_wal_append_of_nothing_is_refused(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    with pytest.raises(SequenceError):
        lg.append([], epoch=1)
    assert lg.append([(1, b"a")], epoch=1) == (1, 1)
    lg.close()


def test_wal_sequences_survive_close_and_reopen(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    fill(lg, 10)
    lg.close()
    lg = open_log(tmp_path)
    assert (lg.first_sequence, lg.last_sequence) == (1, 10)
    assert lg.recovery.truncated_bytes == 0
    assert lg.recovery.truncated_reason is None
    fill(lg, 1)
    assert lg.last_sequence == 11
    assert read_all(lg) == b"".join(expected(s) for s in range(1, 12))
    lg.close()


def test_wal_rotation_names_segments_by_first_sequence(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    segs = lg.segments
    assert len(segs) > 3
    for seg in segs:
        assert seg.path.name == segment_name(seg.first_sequence)
        assert seg.size <= 600
        data = seg.path.read_bytes()
        assert data[4:12] == seg.first_sequence.to_bytes(8, "little")
    names = sorted(p.name for p in lg.wal_dir.iterdir())
    assert names == [segment_name(s.first_sequence) for s in segs]
    lg.close()
    lg = open_log(tmp_path, segment_bytes=600)
    assert lg.last_sequence == 40
    assert read_all(lg) == b"".join(expected(s) for s in range(1, 41))
    fill(lg, 1)
    assert lg.last_sequence == 41
    lg.close()


def test_wal_segment_name_is_zero_padded_first_sequence() -> None:
    assert segment_name(1) == "00000000000000000001.wal"
    assert segment_name(12345) == "00000000000000012345.wal"


def test_wal_an_entry_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=200)
    lg.append([(1, b"a")], epoch=1)
    lg.append([(1, b"b" * 500)], epoch=1)
    lg.append([(1, b"c")], epoch=1)
    assert [s.first_sequence for s in lg.segments] == [1, 2, 3]
    assert lg.read(2).data[HEADER_SIZE:] == b"b" * 500
    lg.close()


def test_wal_a_multi_entry_append_is_cut_at_the_same_entry_as_single_appends(
    tmp_path: Path,
) -> None:
    one = SpaceLog(tmp_path / "one" / SPACE, space=SPACE, segment_bytes=600, clock_ns=_clock)
    many = SpaceLog(tmp_path / "many" / SPACE, space=SPACE, segment_bytes=600, clock_ns=_clock)
    fill(one, 40)
    many.append([(EntryType.EPISODE_STORE, payload_for(s)) for s in range(1, 41)], epoch=1)
    assert [(s.first_sequence, s.size) for s in many.segments] == [
        (s.first_sequence, s.size) for s in one.segments
    ]
    assert all(s.size <= 600 for s in many.segments)
    assert read_all(many) == read_all(one)
    one.close()
    many.close()


# ---- retention and truncation ---------------------------------------------------------------


def test_wal_delete_before_drops_sealed_segments_and_keeps_sequences(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    segs = lg.segments
    cut = segs[2].first_sequence  # drop the first two segments only
    freed = lg.delete_before(cut)
    assert freed == segs[0].size + segs[1].size
    assert lg.first_sequence == cut
    assert not segs[0].path.exists()
    assert not segs[1].path.exists()
    with pytest.raises(SequenceError):
        lg.read(cut - 1)
    assert lg.read(cut).first_sequence == cut
    lg.close()
    lg = open_log(tmp_path, segment_bytes=600)
    assert (lg.first_sequence, lg.last_sequence) == (cut, 40)
    fill(lg, 1)
    assert lg.last_sequence == 41
    assert read_all(lg) == b"".join(expected(s) for s in range(cut, 42))
    lg.close()


def test_wal_delete_before_never_deletes_the_active_segment(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    lg.delete_before(10_000)
    assert len(lg.segments) == 1
    assert lg.last_sequence == 40
    lg.close()
    lg = open_log(tmp_path, segment_bytes=600)
    assert lg.last_sequence == 40
    fill(lg, 1)
    assert lg.last_sequence == 41
    lg.close()


def test_wal_delete_before_everything_keeps_the_sequence(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    # An oversized entry gets a segment of its own, sealing the one before; retain nothing sealed.
    lg.append([(1, b"z" * 700)], epoch=1)
    lg.append([(1, b"y")], epoch=1)
    lg.delete_before(lg.last_sequence)
    assert lg.first_sequence == lg.last_sequence == 42
    lg.close()
    lg = open_log(tmp_path, segment_bytes=600)
    assert lg.next_sequence == 43
    lg.close()


@pytest.mark.parametrize("keep", [0, 1, 5, 6, 7, 23, 39])
def test_wal_truncate_after_drops_the_tail(tmp_path: Path, keep: int) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    assert lg.truncate_after(keep) == 40 - keep
    assert lg.last_sequence == keep
    assert lg.next_sequence == keep + 1
    assert lg.durable_sequence <= keep
    assert read_all(lg, 1) == b"".join(expected(s) for s in range(1, keep + 1))
    fill(lg, 3)  # new entries take the freed sequences, at a new epoch or not
    assert lg.last_sequence == keep + 3
    lg.close()
    lg = open_log(tmp_path, segment_bytes=600)
    assert lg.last_sequence == keep + 3
    assert read_all(lg, 1) == b"".join(expected(s) for s in range(1, keep + 4))
    for seg in lg.segments:
        assert seg.path.name == segment_name(seg.first_sequence)
    assert not verify_space(tmp_path / SPACE).problems
    lg.close()


def test_wal_truncate_after_the_end_is_a_no_op(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    fill(lg, 5)
    assert lg.truncate_after(5) == 0
    assert lg.truncate_after(9) == 0
    assert lg.last_sequence == 5
    lg.close()


def test_wal_truncate_before_retained_entries_is_refused(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    cut = lg.segments[1].first_sequence
    lg.delete_before(cut)
    with pytest.raises(SequenceError):
        lg.truncate_after(cut - 2)
    assert lg.truncate_after(cut - 1) == 40 - (cut - 1)
    assert lg.next_sequence == cut
    lg.close()


# ---- reads ----------------------------------------------------------------------------------

# Enough entries per segment that the sparse index has several points in each.
_BIG_SEG = 60_000  # entries are 84..96 bytes: ~650 per segment
_N_BIG = 1500


@pytest.fixture(scope="module")
def big_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("biglog")
    lg = open_log(root, segment_bytes=_BIG_SEG)
    fill(lg, _N_BIG)
    assert len(lg.segments) >= 2
    assert all(s.last_sequence - s.first_sequence + 1 > INDEX_EVERY for s in lg.segments[:-1])
    lg.close()
    return root


def _check_reads_from_every_sequence(lg: SpaceLog) -> None:
    want = [expected(s) for s in range(1, _N_BIG + 1)]
    for s in range(1, _N_BIG + 1):
        r = lg.read(s, max_entries=3)
        assert r.first_sequence == s
        assert r.count == r.last_sequence - s + 1 >= 1
        assert r.data == b"".join(want[s - 1 : r.last_sequence])
        seg = next(g for g in lg.segments if g.first_sequence <= s <= g.last_sequence)
        assert r.last_sequence <= seg.last_sequence  # never spans a segment boundary


def test_wal_read_from_any_sequence_after_reopen(big_log_dir: Path) -> None:
    lg = open_log(big_log_dir, segment_bytes=_BIG_SEG)
    _check_reads_from_every_sequence(lg)
    lg.close()


def test_wal_read_from_any_sequence_while_appending(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=_BIG_SEG)
    fill(lg, _N_BIG)
    _check_reads_from_every_sequence(lg)
    lg.close()


def test_wal_read_covers_the_log_across_segments(big_log_dir: Path) -> None:
    lg = open_log(big_log_dir, segment_bytes=_BIG_SEG)
    assert read_all(lg) == b"".join(expected(s) for s in range(1, _N_BIG + 1))
    entries = lg.read_entries(1, limit=_N_BIG)
    assert [e.sequence for e in entries] == list(range(1, _N_BIG + 1))
    assert entries[700].payload == payload_for(701)
    lg.close()


def test_wal_read_respects_upto_and_limits(big_log_dir: Path) -> None:
    lg = open_log(big_log_dir, segment_bytes=_BIG_SEG)
    r = lg.read(10, upto=14)
    assert (r.first_sequence, r.last_sequence, r.count) == (10, 14, 5)
    r = lg.read(10, max_bytes=1)  # at least one entry, even when larger than max_bytes
    assert (r.last_sequence, r.data) == (10, expected(10))
    r = lg.read(10, max_bytes=len(expected(10)) + len(expected(11)) + 10)
    assert r.last_sequence == 11
    r = lg.read(_N_BIG + 1)
    assert (r.count, r.data) == (0, b"")
    r = lg.read(5, upto=4)
    assert r.count == 0
    r = lg.read(5, max_entries=0)
    assert (r.count, r.data) == (0, b"")
    lg.close()


def test_wal_read_never_serves_a_corrupt_entry_in_a_sealed_segment(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    sealed = lg.segments[1]
    bad_seq = sealed.first_sequence + 2
    bad_off = len(b"".join(expected(s) for s in range(sealed.first_sequence, bad_seq)))
    lg.close()
    flip(sealed.path, bad_off + HEADER_SIZE + 3)  # a payload byte
    lg = open_log(tmp_path, segment_bytes=600)  # only the active segment is scanned on open
    for start in (sealed.first_sequence, bad_seq - 1, bad_seq):
        with pytest.raises(WalCorruption) as exc:
            lg.read(start)
        assert exc.value.path == str(sealed.path)
        assert exc.value.offset == bad_off
        assert "CRC" in exc.value.reason
        assert str(sealed.path) in str(exc.value)
    # Entries of other segments are still served.
    assert lg.read(1).count > 0
    assert lg.read(bad_seq + 1).first_sequence == bad_seq + 1
    lg.close()


def test_wal_read_reports_a_corrupt_header_with_its_file_offset(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 40)
    sealed = lg.segments[0]
    bad_seq = sealed.first_sequence + 3
    bad_off = len(b"".join(expected(s) for s in range(1, bad_seq)))
    flip(sealed.path, bad_off + 13)  # a timestamp byte: header CRC
    for start in (1, bad_seq):
        with pytest.raises(WalCorruption) as exc:
            lg.read(start)
        assert exc.value.path == str(sealed.path)
        assert exc.value.offset == bad_off
    lg.close()


# ---- recovery -------------------------------------------------------------------------------

_TORN_TAILS: dict[str, Callable[[int], bytes]] = {
    "garbage": lambda seq: b"\x13\x37\xc0\xde" * 25,
    "half-entry": lambda seq: expected(seq)[: HEADER_SIZE + 3],
    "half-header": lambda seq: expected(seq)[:30],
    "zeros": lambda seq: bytes(4096),
    "magic-only": lambda seq: expected(seq)[:4],
}


@pytest.mark.parametrize("kind", sorted(_TORN_TAILS))
def test_wal_recovery_truncates_a_torn_tail(tmp_path: Path, kind: str) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 10)
    path = active_path(lg)
    good_size = path.stat().st_size
    lg.close()
    tail = _TORN_TAILS[kind](11)
    with path.open("ab") as f:
        f.write(tail)
    torn: list[int] = []
    lg = open_log(tmp_path, segment_bytes=600, on_torn_tail=torn.append)
    assert lg.recovery.truncated_bytes == len(tail)
    assert lg.recovery.truncated_reason
    assert torn == [len(tail)]
    assert path.stat().st_size == good_size
    assert lg.last_sequence == 10
    fill(lg, 1)
    assert lg.last_sequence == 11
    assert read_all(lg) == b"".join(expected(s) for s in range(1, 12))
    lg.close()
    assert not verify_space(tmp_path / SPACE).problems


def test_wal_store_counts_torn_tails_per_space(tmp_path: Path) -> None:
    store = WalStore(tmp_path)
    lg = store.open("alpha")
    lg.append([(1, b"one")], epoch=1)
    path = active_path(lg)
    store.close()
    with path.open("ab") as f:
        f.write(b"\xff" * 7)
    seen: list[tuple[str, int]] = []
    store = WalStore(tmp_path, on_torn_tail=lambda space, n: seen.append((space, n)))
    lg = store.open("alpha")
    assert seen == [("alpha", 7)]
    assert lg.append([(1, b"two")], epoch=1) == (2, 2)
    assert store.spaces_on_disk() == ["alpha"]
    assert store.get(SpaceId("alpha")) is lg
    store.close()


@pytest.mark.parametrize("where", ["payload", "header", "sequence"])
def test_wal_corruption_in_the_middle_of_the_active_segment_is_refused(
    tmp_path: Path, where: str
) -> None:
    lg = open_log(tmp_path)
    fill(lg, 10)
    path = active_path(lg)
    lg.close()
    off = len(b"".join(expected(s) for s in range(1, 5)))
    delta = {"payload": HEADER_SIZE + 1, "header": 22, "sequence": 4}[where]
    flip(path, off + delta)
    before = path.read_bytes()
    with pytest.raises(WalCorruption) as exc:
        open_log(tmp_path)
    assert exc.value.path == str(path)
    assert exc.value.offset == off
    assert path.read_bytes() == before  # nothing was cut


# ---- epochs ---------------------------------------------------------------------------------


def test_wal_epoch_history_records_increases_only(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    fill(lg, 3, epoch=1)
    fill(lg, 2, epoch=1)
    fill(lg, 2, epoch=4)
    fill(lg, 1, epoch=9)
    assert lg.history == [(1, 1), (4, 6), (9, 8)]
    assert lg.last_epoch == 9
    with pytest.raises(SequenceError):
        lg.append([(1, b"old")], epoch=4)
    assert lg.last_sequence == 8
    lg.close()
    lg = open_log(tmp_path)
    assert lg.history == [(1, 1), (4, 6), (9, 8)]
    assert [e.epoch for e in lg.read_entries(1)] == [1, 1, 1, 1, 1, 4, 4, 9]
    lg.close()


def test_wal_begin_epoch_is_durable(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    fill(lg, 3, epoch=1)
    lg.begin_epoch(2)
    assert lg.history == [(1, 1), (2, 4)]
    lg.begin_epoch(2)  # no change
    lg.begin_epoch(1)  # never goes back
    assert lg.history == [(1, 1), (2, 4)]
    lg.close()
    lg = open_log(tmp_path)
    assert lg.history == [(1, 1), (2, 4)]
    assert lg.last_epoch == 2
    with pytest.raises(SequenceError):
        lg.append([(1, b"stale primary")], epoch=1)
    fill(lg, 1, epoch=2)
    assert lg.history == [(1, 1), (2, 4)]
    lg.close()


def test_wal_truncate_after_cuts_the_epoch_history(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 10, epoch=1)
    fill(lg, 10, epoch=2)
    fill(lg, 10, epoch=3)
    assert lg.history == [(1, 1), (2, 11), (3, 21)]
    lg.truncate_after(15)
    assert lg.history == [(1, 1), (2, 11)]
    assert lg.last_epoch == 2
    lg.close()
    lg = open_log(tmp_path, segment_bytes=600)
    assert lg.history == [(1, 1), (2, 11)]
    fill(lg, 1, epoch=5)
    assert lg.history == [(1, 1), (2, 11), (5, 16)]
    lg.close()


def test_wal_deposed_primary_truncates_to_the_fork_point(tmp_path: Path) -> None:
    from engram_sidecar.log.epochs import fork_point

    old = SpaceLog(tmp_path / "old" / SPACE, space=SPACE, clock_ns=_clock)
    new = SpaceLog(tmp_path / "new" / SPACE, space=SPACE, clock_ns=_clock)
    fill(old, 10, epoch=1)
    new.append_stored(old.read(1).data)
    fill(old, 5, epoch=1)  # never shipped: lost at failover
    new.begin_epoch(2)
    fill(new, 7, epoch=2)
    fp = fork_point(
        local=old.history, local_last=old.last_sequence, leader=new.history, leader_last=17
    )
    assert fp == 10
    assert old.truncate_after(fp) == 5
    old.append_stored(new.read(11).data)
    assert read_all(old) == read_all(new)
    assert old.history == new.history == [(1, 1), (2, 11)]
    old.close()
    new.close()


# ---- the replica path -----------------------------------------------------------------------


@pytest.mark.parametrize("per_append", [1, 300, 2000])
def test_wal_runs_of_any_size_rotate_and_index_as_entry_by_entry(
    tmp_path: Path, per_append: int
) -> None:
    # An append (or a batch a replica applies) is written in as few chunks as its segments
    # allow, its rotation points and sparse index found from the entries' sizes: the same
    # segments and index points as writing one entry at a time, on the primary and the replica.
    p = SpaceLog(tmp_path / "p" / SPACE, space=SPACE, segment_bytes=20_000)
    r = SpaceLog(tmp_path / "r" / SPACE, space=SPACE, segment_bytes=20_000)
    sizes = [(i * 37) % 300 for i in range(3000)]
    for i in range(0, len(sizes), per_append):
        p.append([(EntryType.MEMORY_UPDATE, b"v" * n) for n in sizes[i : i + per_append]], epoch=1)
    _ship(p, r, max_entries=per_append)
    one = SpaceLog(tmp_path / "one" / SPACE, space=SPACE, segment_bytes=20_000)
    for n in sizes:
        one.append([(EntryType.MEMORY_UPDATE, b"v" * n)], epoch=1)
    for lg in (p, r):
        assert [(s.first_sequence, s.last_sequence, s.size) for s in lg.segments] == [
            (s.first_sequence, s.last_sequence, s.size) for s in one.segments
        ]
        for seg in lg.segments:  # indexed as written
            assert seg.index == scan(seg.path, seg.first_sequence).index
    assert len(one.segments) > 5
    for lg in (p, r, one):
        lg.close()


def _ship(primary: SpaceLog, replica: SpaceLog, *, max_entries: int = 1000) -> None:
    seq = replica.next_sequence
    while seq <= primary.last_sequence:
        r = primary.read(seq, max_entries=max_entries)
        assert replica.append_stored(r.data) == (r.first_sequence, r.last_sequence)
        seq = r.last_sequence + 1


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_wal_append_stored_makes_byte_identical_segments(tmp_path: Path, batch: int) -> None:
    p = SpaceLog(tmp_path / "p" / SPACE, space=SPACE, segment_bytes=900)
    r = SpaceLog(tmp_path / "r" / SPACE, space=SPACE, segment_bytes=900)
    for i in range(30):
        p.append([(EntryType.MEMORY_UPDATE, b"u" * (i % 40))] * (1 + i % 3), epoch=1 + i // 10)
        if i % 4 == 0:
            _ship(p, r, max_entries=batch)
    _ship(p, r, max_entries=batch)
    assert r.last_sequence == p.last_sequence
    assert r.history == p.history
    pfiles = sorted(p.wal_dir.iterdir())
    rfiles = sorted(r.wal_dir.iterdir())
    assert [f.name for f in pfiles] == [f.name for f in rfiles]
    assert len(pfiles) > 2
    for a, b in zip(pfiles, rfiles, strict=True):
        assert a.read_bytes() == b.read_bytes()
    p.close()
    r.close()


def _entry(seq: int, epoch: int = 1, body: bytes = b"b") -> bytes:
    return encode_entry(sequence=seq, timestamp_ns=TS, entry_type=1, epoch=epoch, payload=body)


def _corrupt(buf: bytes, offset: int) -> bytes:
    b = bytearray(buf)
    b[offset] ^= 0x40
    return bytes(b)


_BAD_BATCHES: dict[str, tuple[bytes, type[WalError]]] = {
    "gap": (_entry(7, 2), SequenceError),
    "overlap": (_entry(5, 2) + _entry(6, 2), SequenceError),
    "jump-inside": (_entry(6, 2) + _entry(8, 2), SequenceError),
    "repeat-inside": (_entry(6, 2) + _entry(6, 2), SequenceError),
    "bad-payload-crc": (_entry(6, 2) + _corrupt(_entry(7, 2, b"xyz"), HEADER_SIZE), WalCorruption),
    "bad-header-crc": (_corrupt(_entry(6, 2), 14) + _entry(7, 2), WalCorruption),
    "torn": ((_entry(6, 2) + _entry(7, 2, b"long body"))[:-3], WalCorruption),
    "epoch-back": (_entry(6, 1), SequenceError),
    "epoch-back-inside": (_entry(6, 3) + _entry(7, 2), SequenceError),
    "empty": (b"", SequenceError),
}


@pytest.mark.parametrize("kind", sorted(_BAD_BATCHES))
def test_wal_append_stored_rejects_a_bad_batch_untouched(tmp_path: Path, kind: str) -> None:
    lg = open_log(tmp_path)
    lg.append_stored(b"".join(_entry(s, 1) for s in range(1, 4)))
    lg.append_stored(_entry(4, 2) + _entry(5, 2))
    path = active_path(lg)
    before = (path.read_bytes(), list(lg.history), lg.last_sequence)
    epochs_before = (lg.dir / "epochs.json").read_bytes()
    data, err = _BAD_BATCHES[kind]
    with pytest.raises(err):
        lg.append_stored(data)
    assert (path.read_bytes(), lg.history, lg.last_sequence) == before
    assert (lg.dir / "epochs.json").read_bytes() == epochs_before
    assert lg.append_stored(_entry(6, 2)) == (6, 6)
    lg.close()


# ---- space ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "space", ["ab", "", "Upper", "ABC", "a" * 65, "a/b", "../etc", "spa ce", "dot.ted", "é-space"]
)
def test_wal_store_rejects_invalid_space_ids(tmp_path: Path, space: str) -> None:
    store = WalStore(tmp_path / "data")
    with pytest.raises(InvalidSpaceId):
        store.open(space)
    with pytest.raises(ValueError):  # InvalidSpaceId is also a ValueError
        validate_space_id(space)
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("space", ["abc", "default", "a" * 64, "tenant_01-x", "0-9"])
def test_wal_store_accepts_valid_space_ids(tmp_path: Path, space: str) -> None:
    store = WalStore(tmp_path)
    lg = store.open(space)
    assert store.open(space) is lg
    assert lg.wal_dir == tmp_path / space / "wal"
    store.close()


# ---- disk failures --------------------------------------------------------------------------


def _same_file(fd: int, path: Path) -> bool:
    st, want = os.fstat(fd), path.stat()
    return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)


def test_wal_full_disk_leaves_no_partial_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path)
    fill(lg, 5)
    lg.sync()
    path = active_path(lg)
    size = path.stat().st_size
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: bytes) -> int:
        if not _same_file(fd, path):
            return real_write(fd, data)
        calls["n"] += 1
        if calls["n"] == 1:  # the first call gets part of the buffer onto the disk ...
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full

    monkeypatch.setattr("engram_sidecar.log.wal.os.write", full_disk)
    with pytest.raises(WalIOError) as exc:
        lg.append([(1, b"x" * 100), (1, b"y" * 100)], epoch=1)
    assert exc.value.retriable
    assert calls["n"] == 2
    assert path.stat().st_size == size
    assert lg.last_sequence == 5
    with pytest.raises(WalIOError):  # still full
        lg.append([(1, b"z")], epoch=1)
    assert path.stat().st_size == size
    lg.close()

    lg = open_log(tmp_path)
    assert lg.last_sequence == 5
    assert lg.recovery.truncated_bytes == 0
    assert not verify_space(tmp_path / SPACE).problems
    monkeypatch.undo()  # the disk frees up
    fill(lg, 2)
    assert lg.last_sequence == 7
    assert read_all(lg) == b"".join(expected(s) for s in range(1, 8))
    lg.close()
    assert not verify_space(tmp_path / SPACE).problems


def test_wal_full_disk_then_space_frees_without_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path)
    fill(lg, 3)

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr("engram_sidecar.log.wal.os.write", no_space)
        with pytest.raises(WalIOError):
            lg.append([(1, b"lost")], epoch=1)
    fill(lg, 1)
    assert lg.last_sequence == 4
    assert read_all(lg) == b"".join(expected(s) for s in range(1, 5))
    lg.close()


def _in_dir(fd: int, directory: Path) -> bool:
    return Path(os.readlink(f"/proc/self/fd/{fd}")).parent == directory


def test_wal_full_disk_in_the_next_segment_rolls_back_the_whole_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 4)
    before = {p.name: p.read_bytes() for p in lg.wal_dir.iterdir()}
    real_write = os.write
    calls = {"n": 0}

    def fail_second(fd: int, data: bytes) -> int:
        if not _in_dir(fd, lg.wal_dir):
            return real_write(fd, data)
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data)  # the part that fits the current segment
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the new segment's part

    with monkeypatch.context() as m:
        m.setattr("engram_sidecar.log.wal.os.write", fail_second)
        with pytest.raises(WalIOError):
            lg.append([(EntryType.EPISODE_STORE, payload_for(s)) for s in range(5, 15)], epoch=1)
    assert calls["n"] == 2
    assert lg.last_sequence == 4
    assert {p.name: p.read_bytes() for p in lg.wal_dir.iterdir()} == before
    fill(lg, 10)
    assert read_all(lg) == b"".join(expected(s) for s in range(1, 15))
    lg.close()
    assert not verify_space(tmp_path / SPACE).problems


def test_wal_failed_rotation_keeps_the_log_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path, segment_bytes=600)
    fill(lg, 6)
    real_open = os.open

    def no_new_files(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, flags, mode)

    with monkeypatch.context() as m:
        m.setattr("engram_sidecar.log.wal.os.open", no_new_files)
        with pytest.raises(WalIOError):
            fill(lg, 10)
    n = lg.last_sequence
    fill(lg, 10)
    assert lg.last_sequence == n + 10
    assert len(lg.segments) > 1
    assert read_all(lg) == b"".join(expected(s) for s in range(1, n + 11))
    lg.close()


def test_wal_fsync_failure_poisons_the_log_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path)
    fill(lg, 3)
    lg.sync()
    assert lg.durable_sequence == 3
    fill(lg, 1)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as m:
        m.setattr("engram_sidecar.log.wal.os.fsync", eio)
        with pytest.raises(WalIOError):
            lg.sync()
    assert lg.durable_sequence == 3
    with pytest.raises(WalClosed):
        lg.append([(1, b"after")], epoch=1)
    with pytest.raises(WalClosed):
        lg.sync()
    with pytest.raises(WalClosed):
        lg.append_stored(expected(5))
    with pytest.raises(WalClosed):
        lg.truncate_after(1)
    lg.close()
    lg = open_log(tmp_path)
    assert lg.last_sequence == 4
    fill(lg, 1)
    assert lg.sync() == 5
    lg.close()


def test_wal_closed_log_refuses_appends_and_reads(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    fill(lg, 1)
    lg.close()
    lg.close()  # idempotent
    with pytest.raises(WalClosed):
        lg.append([(1, b"x")], epoch=1)
    with pytest.raises(WalClosed):
        lg.read(1)


def test_wal_durable_sequence_follows_sync(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    assert lg.durable_sequence == 0
    fill(lg, 4)
    assert lg.durable_sequence == 0
    assert lg.sync() == 4
    assert lg.durable_sequence == 4
    lg.truncate_after(2)
    assert lg.durable_sequence == 2
    lg.close()
    lg = open_log(tmp_path)
    assert lg.durable_sequence == 2
    lg.close()
