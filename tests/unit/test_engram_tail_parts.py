"""Tail mode's parts: the cursor (resume point, Engram's own sequence), the watch (inotify and
polling), the follower's file rules, and the settings."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from engram_contract.formats import engram_wal
from engram_sidecar.config import load_config
from engram_sidecar.errors import ConfigError
from engram_sidecar.tail import cursor as cursors
from engram_sidecar.tail.cursor import Cursor, CursorError
from engram_sidecar.tail.follower import Follower, looks_compacted, next_file, wal_files
from engram_sidecar.tail.watch import Watch, inotify_available

# ---- cursor ------------------------------------------------------------------------------------


def _ship(c: Cursor, seq: int, file: str, offset: int, *, size: int, eseq: int) -> None:
    c.note(sequence=seq, file=file, offset=offset, end=offset + size, engram_sequence=eseq)


def test_cursor_runs_map_our_sequence_to_engrams() -> None:
    c = Cursor()
    for i in range(5):  # file A: Engram 0..4 -> ours 1..5
        _ship(c, 1 + i, "wal-a.log", 100 * i, size=100, eseq=i)
    for i in range(3):  # Engram restarted: file B, Engram 0..2 -> ours 6..8
        _ship(c, 6 + i, "wal-b.log", 70 * i, size=70, eseq=i)
    _ship(c, 9, "wal-b.log", 210, size=70, eseq=7)  # a jump in Engram's sequence starts a run
    assert [(r.sequence, r.file, r.engram_sequence) for r in c.runs] == [
        (1, "wal-a.log", 0),
        (6, "wal-b.log", 0),
        (9, "wal-b.log", 7),
    ]
    assert c.engram_origin(4) == ("wal-a.log", 3)
    assert c.engram_origin(8) == ("wal-b.log", 2)
    assert c.engram_origin(9) == ("wal-b.log", 7)
    assert c.engram_origin(10) is None and c.engram_origin(0) is None
    assert (c.file, c.offset, c.sequence) == ("wal-b.log", 280, 9)
    c.drop_after(5)
    assert [r.sequence for r in c.runs] == [1] and c.sequence == 5


def test_cursor_store_load_round_trip(tmp_path: Path) -> None:
    c = Cursor(compacted=["wal-c.log"])
    _ship(c, 1, "wal-a.log", 0, size=80, eseq=0)
    cursors.store(tmp_path, c, space="s")
    back = cursors.load(tmp_path)
    assert back == c
    assert cursors.load(tmp_path / "none") is None
    (tmp_path / cursors.FILE).write_text("{not json")
    with pytest.raises(CursorError, match="unreadable"):
        cursors.load(tmp_path)
    (tmp_path / cursors.FILE).write_text('{"version": 9}')
    with pytest.raises(CursorError, match="version"):
        cursors.load(tmp_path)


# ---- follower rules ------------------------------------------------------------------------------


def test_file_order_and_next_file() -> None:
    names = ["wal-0000000000000002.log", "x", "wal-0000000000000001.log", "wal-1.log.tmp"]
    files = wal_files(names)
    assert files == ["wal-0000000000000001.log", "wal-0000000000000002.log"]
    assert next_file(files, "") == files[0]
    assert next_file(files, files[0]) == files[1]
    assert next_file(files, files[1]) is None


def test_looks_compacted() -> None:
    def e(seq: int, t: int) -> engram_wal.EngramEntry:
        return engram_wal.EngramEntry(seq, 1, t, b"", 0, 64)

    assert looks_compacted(e(0, 1))
    assert not looks_compacted(e(3, 1)) and not looks_compacted(e(0, 2))
    assert not looks_compacted(None)


def test_follower_reads_through_a_deleted_file(tmp_path: Path) -> None:
    (tmp_path / "wal-0000000000000001.log").write_bytes(
        engram_wal.encode(sequence=0, timestamp_ns=1, entry_type=1, payload=b"x")
    )
    f = Follower(tmp_path)
    assert f.open("wal-0000000000000001.log")
    os.unlink(tmp_path / "wal-0000000000000001.log")
    assert f.unlinked()
    r = f.read(0, max_entries=10)
    assert [e.payload for e in r.scan.entries] == [b"x"]
    f.close()
    assert not f.open("wal-0000000000000001.log")


# ---- watch: inotify and polling both wake the tail ------------------------------------------


async def _woken_within(w: Watch, path: Path, bound: float) -> float:
    async def write_soon() -> None:
        await asyncio.sleep(0.05)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, b"x")
        os.close(fd)

    await w.wait(0.01)  # arms inotify; clears anything pending
    task = asyncio.create_task(write_soon())
    t0 = time.monotonic()
    await w.wait(bound)
    took = time.monotonic() - t0
    await task
    return took


@pytest.mark.skipif(not inotify_available(), reason="inotify needs Linux")
async def test_inotify_wakes_on_a_write_and_sees_compaction_renames(tmp_path: Path) -> None:
    w = Watch(tmp_path, mode="inotify", poll_interval=60.0)
    took = await _woken_within(w, tmp_path / "wal-0000000000000001.log", 30.0)
    assert w.watching and w.mode == "inotify"
    assert took < 10.0  # woken by the write, not by the 30 s bound (the poll interval is 60 s)
    (tmp_path / "wal-0000000000000002.log.tmp").write_bytes(b"c")
    os.rename(tmp_path / "wal-0000000000000002.log.tmp", tmp_path / "wal-0000000000000002.log")
    await w.wait(5.0)
    for _ in range(100):
        if "wal-0000000000000002.log" in w.compaction_renames:
            break
        await w.wait(0.05)
    assert w.compaction_renames == {"wal-0000000000000002.log"}
    w.close()


async def test_polling_wakes_every_interval_and_notes_temp_files(tmp_path: Path) -> None:
    w = Watch(tmp_path, mode="poll", poll_interval=0.02)
    t0 = time.monotonic()
    await w.wait(30.0)
    assert time.monotonic() - t0 < 10.0 and not w.watching
    w.note_listing(["wal-0000000000000003.log.tmp", "wal-0000000000000004.log"])
    assert w.compaction_renames == {"wal-0000000000000003.log"}


# ---- settings ------------------------------------------------------------------------------


def test_engram_settings(tmp_path: Path) -> None:
    base = {"node": "n1", "data_dir": str(tmp_path / "d")}
    cfg = load_config(flags={**base, "engram_data_root": str(tmp_path / "e")}, env={})
    assert cfg.engram_data_root == tmp_path / "e" and cfg.engram_watch == "auto"
    with pytest.raises(ConfigError, match="engram_data_root"):
        load_config(flags={**base, "engram_data_root": str(tmp_path / "d")}, env={})
    with pytest.raises(ConfigError, match="engram_watch"):
        load_config(flags={**base, "engram_watch": "fanotify"}, env={})
    with pytest.raises(ConfigError, match="engram_poll_interval"):
        load_config(flags={**base, "engram_poll_interval": "0"}, env={})


def test_cursor_keeps_the_newest_runs() -> None:
    c = Cursor()
    for i in range(cursors.MAX_RUNS + 5):  # Engram's sequence jumps at every entry
        _ship(c, 1 + i, "wal-a.log", 10 * i, size=10, eseq=2 * i)
    assert len(c.runs) == cursors.MAX_RUNS
    assert c.engram_origin(cursors.MAX_RUNS + 5) == ("wal-a.log", 2 * (cursors.MAX_RUNS + 4))
    assert c.engram_origin(3) is None  # forgotten
