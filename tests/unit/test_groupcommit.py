"""Group commit: concurrent appends share fsyncs; the three fsync policies; durable_sequence."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engram_contract.formats.entry import EntryType, encode_entry
from engram_contract.ids import SpaceId
from engram_sidecar.errors import WalClosed, WalIOError
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.wal import SpaceLog

SPACE = SpaceId("gc-space")
REC = (EntryType.EPISODE_STORE, b"m" * 100)


def open_log(root: Path, *, segment_bytes: int = 64 * 1024 * 1024) -> SpaceLog:
    return SpaceLog(root / SPACE, space=SPACE, segment_bytes=segment_bytes)


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond()` until true; fail (not hang) after `timeout` seconds."""

    async def poll() -> None:
        while not cond():  # noqa: ASYNC110 - the state belongs to the log; there is no event
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_groupcommit_concurrent_appenders_share_fsyncs(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="always")
    writers, per_writer = 64, 10
    got: list[tuple[int, int]] = []

    async def writer() -> None:
        for _ in range(per_writer):
            first, last = await gc.append([REC], epoch=1)
            assert lg.durable_sequence >= last  # acknowledged only once durable
            got.append((first, last))

    await asyncio.gather(*(writer() for _ in range(writers)))
    appends = writers * per_writer
    seqs = sorted(f for f, last in got if f == last)
    assert len(seqs) == appends
    assert seqs == list(range(1, appends + 1))  # distinct and contiguous
    assert lg.durable_sequence == lg.last_sequence == appends
    assert 1 <= gc.fsyncs <= appends // 8, gc.fsyncs
    await gc.stop()
    lg.close()


async def test_groupcommit_concurrent_batches_stay_contiguous(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=4096)  # rotations in the middle of the load
    gc = GroupCommit(lg)
    got: list[tuple[int, int]] = []

    async def writer(w: int) -> None:
        for i in range(5):
            got.append(await gc.append([REC] * (1 + (w + i) % 4), epoch=1))

    await asyncio.gather(*(writer(w) for w in range(16)))
    got.sort()
    assert got[0][0] == 1
    for (_, a_last), (b_first, _) in itertools.pairwise(got):
        assert b_first == a_last + 1
    assert got[-1][1] == lg.last_sequence == lg.durable_sequence
    assert len(lg.segments) > 1
    lg.close()


async def test_groupcommit_always_makes_each_append_durable(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="always")
    assert await gc.append([REC], epoch=1) == (1, 1)
    assert lg.durable_sequence == 1
    assert gc.fsyncs == 1
    assert await gc.append([REC, REC], epoch=1) == (2, 3)
    assert lg.durable_sequence == 3
    assert gc.fsyncs == 2
    lg.close()


async def test_groupcommit_settle_waits_as_the_policy_says(tmp_path: Path) -> None:
    # What a replica does with a batch: append the primary's bytes, then settle.
    data = b"".join(
        encode_entry(sequence=s, timestamp_ns=s, entry_type=1, epoch=1, payload=b"r")
        for s in (1, 2, 3)
    )
    lg = open_log(tmp_path)
    gc = GroupCommit(lg)
    assert gc.waits
    assert lg.append_stored(data) == (1, 3)
    assert gc.promised_sequence == 0  # written, not durable: nothing promised yet
    await gc.settle(3)
    assert lg.durable_sequence == gc.promised_sequence == 3
    lg.close()
    lg = open_log(tmp_path / "none")
    gc = GroupCommit(lg, policy="none")
    assert not gc.waits
    assert lg.append_stored(data) == (1, 3)
    await gc.settle(3)
    assert gc.fsyncs == 0
    assert gc.promised_sequence == 3  # held as far as `none` promises
    lg.close()


async def test_groupcommit_none_policy_never_fsyncs_on_append(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="none")
    gc.start()  # no ticker for this policy
    for i in range(20):
        assert await gc.append([REC], epoch=1) == (i + 1, i + 1)
    assert gc.fsyncs == 0
    assert lg.durable_sequence == 0
    assert lg.last_sequence == 20
    assert lg.sync() == 20
    assert lg.durable_sequence == 20
    await gc.stop()
    lg.close()


async def test_groupcommit_none_policy_still_syncs_at_rotation(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=1000)
    gc = GroupCommit(lg, policy="none")
    for _ in range(20):
        await gc.append([REC], epoch=1)
    assert len(lg.segments) > 1
    sealed_last = lg.segments[-2].last_sequence
    # Paid off the loop, in the background, soon after the rotation.
    await _until(lambda: sealed_last <= lg.durable_sequence)
    assert lg.durable_sequence <= lg.last_sequence
    assert not lg.owes_rotation_sync
    lg.close()


async def test_groupcommit_interval_policy_syncs_in_the_background(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="interval", interval=0.01)
    gc.start()
    for _ in range(5):
        await gc.append([REC], epoch=1)
    await _until(lambda: lg.durable_sequence == 5)
    assert gc.fsyncs >= 1
    n = gc.fsyncs
    await asyncio.sleep(0.05)  # idle: nothing new to sync
    assert gc.fsyncs == n
    await gc.stop()
    lg.close()


async def test_groupcommit_interval_policy_returns_before_durable(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg, policy="interval", interval=3600)
    gc.start()
    assert await gc.append([REC], epoch=1) == (1, 1)
    assert lg.durable_sequence == 0  # the tick hasn't come
    await gc.wait_durable(1)  # anyone who needs it can still wait for it
    assert lg.durable_sequence == 1
    await gc.stop()
    lg.close()


async def test_groupcommit_wait_durable_on_a_durable_sequence_costs_no_fsync(
    tmp_path: Path,
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg)
    await gc.append([REC] * 3, epoch=1)
    n = gc.fsyncs
    await gc.wait_durable(2)
    await gc.wait_durable(3)
    await gc.wait_durable(0)
    assert gc.fsyncs == n
    lg.close()


async def test_groupcommit_durable_sequence_survives_reopen(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg)
    await gc.append([REC] * 4, epoch=1)
    await gc.stop()
    lg.close()
    lg = open_log(tmp_path)
    assert lg.durable_sequence == 4
    gc = GroupCommit(lg)
    assert await gc.append([REC], epoch=1) == (5, 5)
    lg.close()


async def test_groupcommit_fsync_failure_fails_every_waiter_and_poisons_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lg = open_log(tmp_path)
    gc = GroupCommit(lg)
    await gc.append([REC], epoch=1)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as m:
        m.setattr("engram_sidecar.log.wal.os.fsync", eio)
        results = await asyncio.gather(
            *(gc.append([REC], epoch=1) for _ in range(8)), return_exceptions=True
        )
    assert all(isinstance(r, WalIOError) for r in results), results
    assert lg.durable_sequence == 1
    with pytest.raises(WalClosed):
        await gc.append([REC], epoch=1)
    await gc.stop()
    lg.close()
    lg = open_log(tmp_path)
    gc = GroupCommit(lg)
    first, _ = await gc.append([REC], epoch=1)
    assert first == lg.last_sequence >= 2  # unacknowledged entries may or may not be there
    lg.close()
