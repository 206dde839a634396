"""The test-only power-loss model (engram_sidecar.log.durable_marks) that the chaos runs use:
it must never cut what an fsync covered (or the checker would blame the system for the test's
own loss), and must cut what none did."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engram_contract.formats.entry import EntryType
from engram_contract.ids import SpaceId
from engram_sidecar.log import durable_marks
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.wal import SpaceLog

SPACE = SpaceId("marks")
REC = (EntryType.EPISODE_STORE, b"p" * 100)


@pytest.fixture
def marks_on() -> Iterator[None]:
    durable_marks.enable("2")  # each fsync also starts 2 ms late
    try:
        yield
    finally:
        durable_marks.enabled, durable_marks.delay = False, 0.0


@pytest.mark.parametrize("value", ["-1", "1001", "soon", "nan"])
def test_the_hook_refuses_a_value_that_is_not_milliseconds(value: str) -> None:
    with pytest.raises(ValueError, match="ENGRAM_TEST_DURABLE_MARKS"):
        durable_marks.enable(value)
    assert not durable_marks.enabled


async def test_power_loss_keeps_every_fsynced_entry_and_cuts_the_rest(
    tmp_path: Path, marks_on: None
) -> None:
    lg = SpaceLog(tmp_path / SPACE, space=SPACE, segment_bytes=4096)
    gc = GroupCommit(lg, policy="always")
    for _ in range(60):  # past several rotations (164 bytes an entry, 4 KiB segments)
        await gc.append([REC], epoch=1)
    durable = lg.durable_sequence
    assert durable == 60
    lg.append([REC] * 40, epoch=1)  # written, never fsynced: across a rotation too
    await gc.stop()
    # The process "dies" here: its files stay as they are, fds and all.
    wal = lg.wal_dir
    segments_before = sorted(p.name for p in wal.glob("*.wal"))
    changed, lost = durable_marks.lose_unsynced(wal)
    assert changed >= 2 and lost == 40 * 164  # a truncated segment and a deleted one at least
    assert sorted(p.name for p in wal.glob("*.wal")) != segments_before
    again = SpaceLog(tmp_path / SPACE, space=SPACE, segment_bytes=4096)
    assert again.last_sequence == durable  # exactly what the fsyncs covered
    again.close()


def test_marks_of_another_file_or_none_cut_nothing(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    wal.mkdir()
    seg = wal / f"{1:020d}.wal"
    seg.write_bytes(b"x" * 1000)
    assert durable_marks.lose_unsynced(wal) == (0, 0)  # no marks at all
    durable_marks.note(wal, [(seg.name, os.stat(seg).st_ino + 1, 10)])  # another inode
    assert durable_marks.lose_unsynced(wal) == (0, 0)
    assert seg.stat().st_size == 1000


def test_a_mark_never_goes_down_for_the_same_file(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    wal.mkdir()
    seg = wal / f"{1:020d}.wal"
    seg.write_bytes(b"x" * 1000)
    ino = seg.stat().st_ino
    durable_marks.note(wal, [(seg.name, ino, 800)])
    durable_marks.note(wal, [(seg.name, ino, 500)])  # an older fsync finishing late
    assert durable_marks.lose_unsynced(wal) == (1, 200)
    assert seg.stat().st_size == 800


async def test_marks_are_off_unless_enabled(tmp_path: Path) -> None:
    lg = SpaceLog(tmp_path / SPACE, space=SPACE)
    gc = GroupCommit(lg, policy="always")
    await gc.append([REC], epoch=1)
    await gc.stop()
    assert not (lg.wal_dir / durable_marks.FILE).exists()
    lg.close()
