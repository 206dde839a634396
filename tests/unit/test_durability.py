"""Durability holes (issue 11, item 5) and storage errors that must not be swallowed (item 7).

- opening a log fsyncs what a crashed process left in the page cache before calling it durable;
- the space's directories, a new segment, epochs.json, assignment.json and local mode's
  cluster.json are fsynced;
- an fsync that was running when the log was truncated can't mark anything durable afterwards,
  and `durable_sequence` never exceeds `last_sequence`;
- a failing disk raises `StorageError` (path, errno, kind), never a bare OSError;
- `StorageHealth` and the storage metrics turn those errors into a state.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from engram_contract.assignment import Assignment, Member
from engram_contract.errors import WalError
from engram_contract.formats.entry import EntryType, encode_entry
from engram_contract.ids import NodeName, SpaceId
from engram_operator.local.loop import ControlLoop
from engram_operator.local.store import ClusterFiles
from engram_sidecar.errors import SequenceError, StorageError, WalClosed, WalIOError, WalTruncated
from engram_sidecar.log import assignment_store as assignment_file
from engram_sidecar.log import epochs
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.segment import segment_name
from engram_sidecar.log.snapshot import SnapshotBuilder
from engram_sidecar.log.storage_health import StorageHealth, classify
from engram_sidecar.log.wal import SpaceLog, run_ticket
from engram_sidecar.metrics import Metrics

SPACE = SpaceId("durable")
REC = (EntryType.EPISODE_STORE, b"d" * 40)
TIMEOUT = 10.0  # every wait below is bounded by this


def open_log(root: Path, *, segment_bytes: int = 1 << 20) -> SpaceLog:
    return SpaceLog(root / SPACE, space=SPACE, segment_bytes=segment_bytes)


def entry(seq: int, epoch: int = 1) -> bytes:
    return encode_entry(
        sequence=seq, timestamp_ns=seq, entry_type=1, epoch=epoch, payload=f"e{seq}".encode()
    )


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path fsynced from now on (files and directories), in order; the fsyncs still run."""
    real = os.fsync
    seen: list[Path] = []

    def record(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


# ---- fsync on open ----------------------------------------------------------------------------


def test_open_fsyncs_entries_a_crashed_process_left_before_calling_them_durable(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    lg = open_log(tmp_path)
    seg = lg.segments[0].path
    lg.close()
    # A process that wrote three entries and was killed before its fsync: they sit in the page
    # cache, readable, and a power cut would still take them.
    epochs.store(tmp_path / SPACE / "epochs.json", [(1, 1)])
    with seg.open("ab") as f:
        f.write(entry(1) + entry(2) + entry(3))
    fsynced.clear()
    lg = open_log(tmp_path)
    assert lg.durable_sequence == 3
    assert seg.resolve() in fsynced
    lg.close()


def test_open_fsyncs_the_directories_that_name_a_new_space(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lg = open_log(data)
    for d in (data / SPACE / "wal", data / SPACE, data):
        assert d.resolve() in fsynced, d
    assert (data / SPACE / "wal" / segment_name(1)).exists()
    lg.close()


def test_open_refuses_a_log_it_cannot_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path)
    seg = lg.segments[0].path
    lg.close()
    epochs.store(tmp_path / SPACE / "epochs.json", [(1, 1)])
    with seg.open("ab") as f:
        f.write(entry(1))

    def eio(fd: int) -> None:
        raise _oserror(errno.EIO)

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(StorageError) as got:
        open_log(tmp_path)
    assert got.value.errno == errno.EIO
    assert got.value.path == str(seg)
    assert got.value.op == "fsync"
    assert got.value.kind == "StorageError"
    assert str(SPACE) in str(got.value) and "EIO" in str(got.value)


@pytest.mark.parametrize("how", ["inline", "ticket"])
def test_a_new_segment_is_named_durably_before_entries_in_it_count(
    tmp_path: Path, fsynced: list[Path], how: str
) -> None:
    lg = open_log(tmp_path, segment_bytes=300)
    lg.append([REC], epoch=1)  # records epoch 1 (epochs.json), fsynced as it must be
    lg.sync()
    fsynced.clear()
    while len(lg.segments) < 2:
        lg.append([REC], epoch=1)
    wal_dir = (tmp_path / SPACE / "wal").resolve()
    sealed, new = (s.path.resolve() for s in lg.segments)
    # The append that rotated paid no fsync (it runs on the event loop); the fsyncs are owed,
    # and until they are paid nothing in the new segment counts as durable.
    assert fsynced == [] and lg.owes_rotation_sync
    assert lg.durable_sequence < lg.segments[1].first_sequence
    if how == "inline":
        lg.sync()
    else:  # the group commit's way: a ticket carried out in a worker thread
        ticket = lg.sync_handle()
        assert not lg.owes_rotation_sync  # the ticket took it over
        run_ticket(ticket)
        assert lg.mark_durable(ticket)
    # The sealed segment, then the directory that names the new one, then the new one.
    assert fsynced.index(sealed) < fsynced.index(wal_dir) < fsynced.index(new)
    assert lg.durable_sequence == lg.last_sequence
    lg.close()


# ---- epochs.json, assignment.json, cluster.json ------------------------------------------------


def test_epochs_store_fsyncs_the_file_and_its_directory(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    epochs.store(tmp_path / "epochs.json", [(1, 1)])
    assert (tmp_path / "epochs.tmp").resolve() in fsynced  # the content, before the rename
    assert tmp_path.resolve() in fsynced  # the rename
    assert fsynced.index((tmp_path / "epochs.tmp").resolve()) < fsynced.index(tmp_path.resolve())


def test_epochs_store_writes_every_byte_when_the_disk_takes_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write

    def dribble(fd: int, data: bytes | memoryview) -> int:
        return real(fd, bytes(data[:5]))  # a nearly full disk: short writes

    path = tmp_path / "epochs.json"
    history = [(1, 1), (2, 11), (7, 40)]
    with monkeypatch.context() as m:
        m.setattr(os, "write", dribble)
        epochs.store(path, history)
    assert epochs.load(path) == history


def test_epochs_store_on_a_full_disk_raises_and_keeps_the_old_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "epochs.json"
    epochs.store(path, [(1, 1)])

    def full(fd: int, data: bytes | memoryview) -> int:
        raise _oserror(errno.ENOSPC)

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(StorageError) as got:
            epochs.store(path, [(1, 1), (2, 5)], space="tenant-a")
    err = got.value
    assert (err.kind, err.errno, err.op) == ("DiskFull", errno.ENOSPC, "write")
    assert err.path == str(tmp_path / "epochs.tmp")
    assert "tenant-a" in str(err) and "ENOSPC" in str(err)
    assert epochs.load(path) == [(1, 1)]
    assert not (tmp_path / "epochs.tmp").exists()  # the temp file doesn't keep the disk full


def _assignment(epoch: int) -> Assignment:
    return Assignment(epoch, Member(NodeName("n0"), "127.0.0.1:7000"), ())


def test_assignment_save_fsyncs_and_raises_a_storage_error_on_a_full_disk(
    tmp_path: Path, fsynced: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "assignment.json"
    assignment_file.save(path, _assignment(1), 1)
    assert (tmp_path / "assignment.tmp").resolve() in fsynced
    assert tmp_path.resolve() in fsynced

    def full(fd: int) -> None:
        raise _oserror(errno.ENOSPC)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as got:
        assignment_file.save(path, _assignment(2), 2, space="tenant-a")
    assert (got.value.kind, got.value.op) == ("DiskFull", "fsync")
    assert assignment_file.load(path) == (_assignment(1), 1)


def test_local_cluster_json_is_fsynced_then_renamed_then_its_directory_fsynced(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    loop = ControlLoop(files=ClusterFiles(tmp_path), nodes=[], spaces={}, token="t")
    loop.save()
    state = ClusterFiles(tmp_path).state
    tmp = state.with_suffix(".tmp").resolve()
    assert tmp in fsynced and tmp_path.resolve() in fsynced
    assert fsynced.index(tmp) < fsynced.index(tmp_path.resolve())
    assert json.loads(state.read_text()) == {"nodes": {}, "spaces": {}}


# ---- a truncation while an fsync runs ----------------------------------------------------------


class HeldFsync:
    """An fsync hook that blocks in its worker thread until released (bounded either way)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(TIMEOUT), "the test never released the fsync"
        os.fsync(fd)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT), "fsync never started"


@pytest.fixture
def held() -> Iterator[HeldFsync]:
    h = HeldFsync()
    yield h
    h.release.set()  # never leave a worker thread blocked


async def test_fsync_that_ran_across_a_truncation_marks_nothing_durable(
    tmp_path: Path, held: HeldFsync
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="always", fsync=held)
    writer = asyncio.ensure_future(gc.append([REC] * 10, epoch=1))
    await held.wait_entered()  # fsync of 1..10 is running in its thread
    assert lg.truncate_after(5) == 5  # a deposed primary cuts to the fork point meanwhile
    lg.append([REC] * 2, epoch=2)  # and takes the new primary's 6..7, not yet synced
    held.release.set()
    with pytest.raises(WalTruncated):
        await asyncio.wait_for(writer, TIMEOUT)
    assert lg.durable_sequence <= 5  # not 10: above the log's end; not 7: never synced
    assert lg.durable_sequence <= lg.last_sequence == 7
    await asyncio.wait_for(gc.wait_durable(7), TIMEOUT)  # a fresh fsync covers them
    assert lg.durable_sequence == 7
    lg.close()


async def test_fsync_across_a_truncation_never_covers_rewritten_sequences(
    tmp_path: Path, held: HeldFsync
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="always", fsync=held)
    writer = asyncio.ensure_future(gc.append([REC] * 10, epoch=1))
    await held.wait_entered()
    lg.truncate_after(5)
    lg.append([REC] * 10, epoch=2)  # 6..15: 6..10 reuse the cut sequences
    held.release.set()
    with pytest.raises(WalTruncated):
        await asyncio.wait_for(writer, TIMEOUT)
    assert lg.durable_sequence <= 5
    lg.close()


async def test_a_waiter_below_the_cut_is_still_acknowledged(
    tmp_path: Path, held: HeldFsync
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="always", fsync=held)
    lg.append([REC] * 10, epoch=1)
    waiter = asyncio.ensure_future(gc.wait_durable(3))
    await held.wait_entered()
    lg.truncate_after(5)
    held.release.set()
    await asyncio.wait_for(waiter, TIMEOUT)  # 3 survived the cut, and a later fsync covers it
    assert 3 <= lg.durable_sequence <= 5
    lg.close()


async def test_a_waiter_that_starts_late_names_the_generation_of_its_append(
    tmp_path: Path,
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="always")
    _, last = lg.append([REC] * 4, epoch=1)
    generation = lg.generation  # captured with the append, as a replica's ack task would
    lg.truncate_after(2)  # before the task got to run
    lg.append([REC] * 2, epoch=2)
    with pytest.raises(WalTruncated):
        await asyncio.wait_for(gc.wait_durable(last, generation=generation), TIMEOUT)
    await asyncio.wait_for(gc.wait_durable(2, generation=generation), TIMEOUT)  # below the cut
    assert lg.durable_sequence == 4
    lg.close()


async def test_interval_ticker_survives_a_truncation_during_its_fsync(
    tmp_path: Path, held: HeldFsync
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="interval", interval=0.001, fsync=held)
    gc.start()
    await gc.append([REC] * 10, epoch=1)
    await held.wait_entered()
    lg.truncate_after(5)
    lg.append([REC] * 10, epoch=2)
    held.release.set()

    async def until_durable() -> None:
        while lg.durable_sequence < 15:  # noqa: ASYNC110 - the ticker owns the state
            await asyncio.sleep(0.005)

    await asyncio.wait_for(until_durable(), TIMEOUT)
    await gc.stop()
    lg.close()


def test_stale_sync_ticket_is_refused_and_durable_never_passes_the_end(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    lg.append([REC] * 10, epoch=1)
    ticket = lg.sync_handle()
    os.fsync(ticket.fd)
    os.close(ticket.fd)
    assert ticket.generation == lg.generation and ticket.target == 10
    lg.truncate_after(4)
    assert lg.generation == ticket.generation + 1
    assert lg.mark_durable(ticket) is False
    assert lg.durable_sequence == 0
    assert lg.cut_since(ticket.generation) == 4
    assert lg.cut_since(lg.generation) is None
    fresh = lg.sync_handle()
    os.close(fresh.fd)
    assert lg.mark_durable(fresh) is True
    assert lg.durable_sequence == 4 == lg.last_sequence
    lg.close()
    assert lg.mark_durable(fresh) is False  # closed (or replaced by a snapshot): nothing to mark


def test_cut_since_assumes_the_worst_once_it_forgot(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    lg.append([REC] * 200, epoch=1)
    start = lg.generation
    for keep in range(199, 99, -1):  # 100 truncations, more than the log remembers
        lg.truncate_after(keep)
    assert lg.cut_since(start) == 0
    assert lg.cut_since(lg.generation - 1) == 100
    lg.close()


# ---- epoch_at, last_entry_epoch ---------------------------------------------------------------


def test_log_epoch_at_answers_from_the_history_even_for_released_entries(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=400)
    lg.append([REC] * 8, epoch=1)
    lg.append([REC] * 8, epoch=3)
    lg.append([REC] * 8, epoch=4)
    assert lg.history == [(1, 1), (3, 9), (4, 17)]
    assert lg.delete_before(12) > 0  # retention released the oldest segments
    assert lg.first_sequence > 1
    assert [lg.epoch_at(s) for s in (0, 1, 8, 9, 16, 17, 24)] == [0, 1, 1, 3, 3, 4, 4]
    assert lg.last_entry_epoch == 4 and lg.last_entry_id == (4, 24)
    with pytest.raises(SequenceError):
        lg.epoch_at(25)
    with pytest.raises(SequenceError):
        lg.epoch_at(-1)
    lg.close()


def test_log_last_entry_epoch_ignores_an_epoch_begun_without_entries(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    assert lg.last_entry_id == (0, 0)
    lg.append([REC] * 3, epoch=1)
    lg.begin_epoch(2)  # promoted, nothing written yet
    assert lg.last_epoch == 2  # appends below 2 are refused
    assert lg.last_entry_epoch == 1  # but the last entry was written at 1
    assert lg.last_entry_id == (1, 3)
    lg.close()


# ---- storage errors are typed, never bare OSErrors ---------------------------------------------


def test_storage_error_is_a_wal_error_and_not_an_oserror() -> None:
    err = StorageError("write to", "/d/x.wal", _oserror(errno.ENOSPC), space="s1")
    # Replication handlers read OSError as "the peer went away": a full disk must not look so.
    assert not isinstance(err, OSError)
    assert isinstance(err, WalIOError) and isinstance(err, WalError)
    assert err.retriable
    assert str(err) == "space s1: write to /d/x.wal failed: No space left on device [ENOSPC]"
    assert StorageError("fsync", "/d", _oserror(errno.EIO)).kind == "StorageError"
    assert StorageError("fsync", "/d", _oserror(errno.EDQUOT)).kind == "DiskFull"


def test_append_on_a_full_disk_raises_disk_full_and_leaves_the_log_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path)
    lg.append([REC] * 2, epoch=1)

    def full(fd: int, data: bytes | memoryview) -> int:
        raise _oserror(errno.ENOSPC)

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(StorageError) as got:
            lg.append([REC], epoch=1)
        assert (got.value.kind, got.value.path) == ("DiskFull", str(lg.segments[-1].path))
        # A new epoch's history can't be stored either: refused before any entry is written.
        with pytest.raises(StorageError) as got:
            lg.append([REC], epoch=2)
        assert got.value.path.endswith("epochs.tmp")
    assert lg.last_sequence == 2 and lg.history == [(1, 1)]
    assert lg.append([REC], epoch=2) == (3, 3)
    lg.close()


def test_rotation_that_cannot_create_a_segment_raises_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path, segment_bytes=300)
    lg.append([REC] * 2, epoch=1)
    real_open = os.open

    def no_inodes(path: str | Path, flags: int, *a: int, **kw: int) -> int:
        if flags & os.O_CREAT:
            raise _oserror(errno.ENOSPC)
        return real_open(path, flags, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_inodes)
        with pytest.raises(StorageError) as got:
            while True:
                lg.append([REC], epoch=1)
    assert got.value.kind == "DiskFull" and got.value.op == "create"
    assert got.value.path.endswith(".wal")
    n = lg.last_sequence
    assert lg.append([REC], epoch=1) == (n + 1, n + 1)  # still appends once the disk has room
    lg.close()


def test_truncation_that_fails_half_way_poisons_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path, segment_bytes=300)
    lg.append([REC] * 10, epoch=1)
    assert len(lg.segments) > 2

    def eio(self: Path, missing_ok: bool = False) -> None:
        raise _oserror(errno.EIO)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", eio)
        with pytest.raises(StorageError) as got:
            lg.truncate_after(2)
    assert got.value.kind == "StorageError" and got.value.errno == errno.EIO
    with pytest.raises(WalClosed):
        lg.append([REC], epoch=1)
    lg.close()
    lg = open_log(tmp_path, segment_bytes=300)  # recovery trusts what is on disk
    assert lg.last_sequence == 10
    lg.close()


def test_snapshot_marker_on_a_full_disk_raises_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space_dir = tmp_path / SPACE
    b = SnapshotBuilder(
        space_dir, space=SPACE, first=1, last=2, epoch=1, history=[(1, 1)], segment_bytes=1 << 20
    )
    b.append(entry(1) + entry(2))
    real_open = os.open

    def full(path: str | Path, flags: int, *a: int, **kw: int) -> int:
        if str(path).endswith("COMPLETE"):
            raise _oserror(errno.ENOSPC)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(StorageError) as got:
        b.finish()
    assert got.value.kind == "DiskFull" and got.value.path.endswith("COMPLETE")


# ---- StorageHealth and the metrics ------------------------------------------------------------


def _clock(values: list[float]) -> Callable[[], float]:
    return lambda: values[0]


def test_storage_health_records_transitions_once() -> None:
    now = [100.0]
    h = StorageHealth(clock=_clock(now))
    assert h.healthy and h.view()["state"] == "ok"
    full = StorageError("write to", "/d/a.wal", _oserror(errno.ENOSPC))
    assert h.record(full) is True  # log this one
    assert h.record(full) is False  # not every repeat
    assert (h.state, h.since, h.errors) == ("DiskFull", 100.0, 2)
    assert "No space left" in h.last_error
    now[0] = 105.0
    assert h.record(StorageError("fsync", "/d/a.wal", _oserror(errno.EIO))) is True
    assert (h.state, h.since) == ("StorageError", 105.0)
    assert h.record(SequenceError("gap")) is False  # not about the disk
    assert h.view()["state"] == "StorageError"
    assert h.clear() is True
    assert h.clear() is False
    assert h.healthy and h.since is None
    assert h.view() == {"state": "ok", "since": None, "last_error": h.last_error, "errors": 3}


def test_storage_classify() -> None:
    assert classify(_oserror(errno.ENOSPC)) == "DiskFull"
    assert classify(_oserror(errno.EROFS)) == "StorageError"
    assert classify(WalIOError("disk")) == "StorageError"
    assert classify(WalClosed("closed")) is None
    assert classify(ValueError("x")) is None


def test_storage_metrics_count_by_kind_and_are_forgotten_with_the_space() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.storage_ok("s1")
    assert reg.get_sample_value("engram_replication_storage_healthy", {"space": "s1"}) == 1
    m.storage_failed("s1", "DiskFull")
    m.storage_failed("s1", "DiskFull")
    labels = {"space": "s1", "kind": "DiskFull"}
    assert reg.get_sample_value("engram_replication_storage_errors_total", labels) == 2
    assert reg.get_sample_value("engram_replication_storage_healthy", {"space": "s1"}) == 0
    m.forget_storage("s1")
    assert reg.get_sample_value("engram_replication_storage_healthy", {"space": "s1"}) is None
    assert reg.get_sample_value("engram_replication_storage_errors_total", labels) is None
