"""Lag by age reads what the log keeps in memory, not the log: `SpaceLog.timestamp_of`."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram_contract.formats.entry import encode_entry
from engram_contract.ids import SpaceId
from engram_sidecar.log.wal import SpaceLog
from engram_sidecar.space import lag


def _log(path: Path, clock: list[int]) -> SpaceLog:
    return SpaceLog(path, space=SpaceId("lagmem"), clock_ns=lambda: clock[0])


def test_timestamp_of_recent_entries_needs_no_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000]
    lg = _log(tmp_path, clock)
    lg.append([(1, b"a"), (1, b"b")], epoch=1)  # 1..2 at 1000
    clock[0] = 2_000
    lg.append([(1, b"c")], epoch=1)  # 3 at 2000
    # A replica's batch: its entries' own timestamps (5000 and 6000).
    stored = b"".join(
        encode_entry(sequence=s, timestamp_ns=t, entry_type=1, epoch=1, payload=b"x")
        for s, t in ((4, 5_000), (5, 6_000))
    )
    lg.append_stored(stored)

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("lag read the log")

    monkeypatch.setattr(lg, "read", no_read)
    assert [lag.timestamp_of(lg, s) for s in range(0, 7)] == [
        None,
        1_000,
        1_000,
        2_000,
        5_000,
        5_000,  # a batch's run: its first entry's time, never later than the entry's own
        None,
    ]
    lg.truncate_after(3)
    assert lg.timestamp_of(4) is None
    clock[0] = 9_000
    lg.append([(1, b"d")], epoch=1)
    assert lg.timestamp_of(4) == 9_000
    assert lg.timestamp_of(3) == 2_000
    monkeypatch.undo()
    lg.close()


def test_timestamp_of_entries_from_before_opening_are_read(tmp_path: Path) -> None:
    clock = [7_000]
    lg = _log(tmp_path, clock)
    lg.append([(1, b"a"), (1, b"b")], epoch=1)
    lg.close()
    again = _log(tmp_path, clock)
    assert again.timestamp_of(2) == 7_000  # from the entry's header on disk
    clock[0] = 8_000
    again.append([(1, b"c")], epoch=1)
    assert (again.timestamp_of(1), again.timestamp_of(3)) == (7_000, 8_000)
    again.close()
