"""A hosted space's decisions: write lease, fencing, ack-policy waits, batch sealing, and its one
write path (the primary's `write`, the replica's `apply`), which checks every entry once."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from engram_contract.assignment import Assignment, Member
from engram_contract.formats.batch import Batch
from engram_contract.formats.frame import FrameDecoder
from engram_contract.ids import NodeName, SpaceId
from engram_sidecar.log import assignment_store, truncations
from engram_sidecar.log import wal as wal_module
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.wal import FsyncPolicy, SpaceLog
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.membership import NotWritable

S = 1_000_000_000


def _assignment(
    primary: str, replicas: list[str], *, epoch: int = 1, policy: str = "quorum"
) -> Assignment:
    def m(n: str) -> Member:
        return Member(NodeName(n), f"127.0.0.1:{1000 + int(n[1])}", f"127.0.0.1:{2000 + int(n[1])}")

    return Assignment(epoch, m(primary), tuple(m(r) for r in replicas), policy)  # type: ignore[arg-type]


def _space(
    tmp_path: Path,
    node: str = "n0",
    *,
    fsync: FsyncPolicy = "none",
    hook: Callable[[int], None] | None = None,
) -> tuple[Space, list[float]]:
    wal = SpaceLog(tmp_path / "s", space=SpaceId("orders"))
    now = [100.0]  # the node's monotonic clock, seconds
    sp = Space(
        space=SpaceId("orders"),
        node=NodeName(node),
        wal=wal,
        commit=GroupCommit(wal, policy=fsync, fsync=hook),
        batch_max_entries=100,
        batch_max_delay=0.01,
        clock=lambda: now[0],
    )
    sp.membership.lease_seconds = 1.5
    return sp, now


def test_space_lease_needs_a_control_plane_grant(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1", "n2"]))
    assert not sp.lease_valid()  # an assignment alone (e.g. reloaded from disk) grants nothing
    sp.membership.grant_lease(now[0])
    assert sp.lease_valid()
    now[0] += 1.6
    assert not sp.lease_valid()


def test_space_replica_acks_never_renew_the_lease(tmp_path: Path) -> None:
    # Issue 11 finding 2: a primary cut off from the control plane but still reaching a
    # replica kept its lease on that replica's acks, and acked quorum writes on the wrong side
    # of a partition.
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1", "n2"]))
    sp.log.append([(1, b"{}")], epoch=1)
    sp.membership.grant_lease(now[0])
    now[0] += 2.0
    sp.on_ack(NodeName("n1"), 1)
    sp.on_ack(NodeName("n2"), 1)
    assert not sp.lease_valid()
    with pytest.raises(NotWritable, match="no write lease") as err:
        sp.membership.check_writable()
    assert err.value.code == "unavailable"


def test_space_lease_from_an_old_assignment_ends_with_a_new_one(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.membership.grant_lease(now[0])
    sp.apply_assignment(_assignment("n0", ["n1"], epoch=3))
    assert not sp.lease_valid()  # a grant vouched for epoch 1, not for epoch 3


def test_space_higher_epoch_fences_and_demotion_clears_it(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.membership.grant_lease(now[0])
    sp.note_epoch(2)
    with pytest.raises(NotWritable, match="fenced"):
        sp.membership.check_writable()
    sp.apply_assignment(_assignment("n1", ["n0"], epoch=2))
    assert sp.role == "replica"
    assert sp.fenced_reason is None
    with pytest.raises(NotWritable) as err:
        sp.membership.check_writable()
    assert err.value.status == 421
    assert err.value.primary == "127.0.0.1:2001"


def test_space_replica_vouches_only_for_matched_entries(tmp_path: Path) -> None:
    sp, _ = _space(tmp_path, node="n1")
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.log.append([(1, b"{}")] * 5, epoch=1)
    sp.matched_upto = 5
    assert sp.matched_sequence == 5
    sp.apply_assignment(_assignment("n2", ["n1"], epoch=2))
    # A new primary: nothing here is vouched for until one of its batches matches it.
    assert sp.matched_sequence == 0
    sp.matched_upto = 4
    assert sp.cut(2, 2) == 3  # a divergent tail cut: nothing past the cut is vouched for
    assert sp.matched_sequence == 2
    assert sp.dropped_entries == 3
    # Recorded durably, so a restarted node still reports what the failover cost.
    assert [(t["epoch"], t["after"], t["dropped"]) for t in sp.truncations] == [(2, 2, 3)]
    assert [(t["epoch"], t["dropped"]) for t in truncations.load(sp.path)] == [(2, 3)]


async def test_space_quorum_timeout_is_not_acknowledged(tmp_path: Path) -> None:
    sp, _ = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1", "n2"]))
    sp.log.append([(1, b"{}")], epoch=1)
    with pytest.raises(NotWritable, match="NOT acknowledged") as err:
        await sp.wait_replicated(1, timeout=0.05)
    assert err.value.code == "not_acknowledged"


async def test_space_quorum_released_by_one_replica_ack(tmp_path: Path) -> None:
    sp, _ = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1", "n2"]))
    sp.log.append([(1, b"{}")], epoch=1)
    sp.on_ack(NodeName("n2"), 1)
    await sp.wait_replicated(1, timeout=0.05)  # primary + n2 is a majority of 3


async def test_space_seal_reports_batch_sizes(tmp_path: Path) -> None:
    sp, _ = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"], policy="async"))
    seen: list[int] = []
    sp.ring.on_batch = seen.append
    sp.log.append([(1, b"x")] * 250, epoch=1)
    sp.ring.on_append()  # nothing in flight: sealed at once, in batches of at most 100
    assert seen == [100, 100, 50]
    frame, last = sp.ring.batch_at(101) or (b"", 0)
    assert last == 200 and frame


def test_space_lease_is_the_shorter_of_the_grant_and_its_own(tmp_path: Path) -> None:
    # The control plane's wait before a promotion is its own lease plus the delay bound: a node
    # configured with a longer write_lease_seconds must not outlast it.
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.membership.grant_lease(now[0], 0.5)
    assert sp.lease_valid(now[0] + 0.49) and not sp.lease_valid(now[0] + 0.5)
    sp.membership.lease_until = float("-inf")
    sp.membership.grant_lease(now[0], 60.0)  # never longer than the node's own 1.5 s
    assert not sp.lease_valid(now[0] + 1.5)


# ---- the one write path ----------------------------------------------------------------------


def _leading(sp: Space, now: list[float], policy: str = "async") -> None:
    sp.apply_assignment(_assignment("n0", ["n1"], policy=policy))
    sp.membership.grant_lease(now[0])


def _frames(sp: Space) -> list[tuple[int, int, bytes]]:
    return list(sp.ring._ring)


async def test_space_write_seals_the_bytes_it_appended_as_the_wal_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The primary seals batches from what it just appended: no read back, no second CRC check.
    # The frames are the very ones a read of the WAL would give: same batch cuts, same bytes.
    sp, now = _space(tmp_path)
    _leading(sp, now)
    sp.ring.inflight = lambda: True  # a stream is busy: batches fill up to 100 or the timer
    reads: list[int] = []
    real_read = sp.log.read
    monkeypatch.setattr(
        sp.log, "read", lambda first, **kw: reads.append(first) or real_read(first, **kw)
    )
    for n in (1, 30, 99, 250, 7, 1, 1, 64):
        await sp.write([(1, b'{"n":%d}' % i) for i in range(n)], ack_timeout=1.0)
    sp.ring.seal()
    assert reads == []
    frames = _frames(sp)
    assert frames[0][0] == 1 and frames[-1][1] == sp.log.last_sequence == 453
    for first, last, frame in frames:
        assert last - first + 1 <= 100
        monkeypatch.undo()
        assert (frame, last) == sp.ring.encode_from(first, upto=last)


async def test_space_seal_cuts_large_entries_as_a_wal_read_does(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    _leading(sp, now)
    sp.ring.inflight = lambda: True
    big = b"x" * (300 * 1024)
    await sp.write([(1, big)] * 7 + [(1, b"{}")] * 3 + [(1, b"y" * (2 << 20))], ack_timeout=1.0)
    sp.ring.seal()
    frames = _frames(sp)
    assert [(f, last) for f, last, _ in frames] == [(1, 3), (4, 6), (7, 10), (11, 11)]
    for first, last, frame in frames:
        assert (frame, last) == sp.ring.encode_from(first, upto=last)


async def test_space_seal_reads_back_what_a_truncation_may_have_changed(tmp_path: Path) -> None:
    # Bytes kept from an append are trusted only while the log's generation is the one they
    # were written at; otherwise the ring encodes from the WAL, as for any older range.
    sp, now = _space(tmp_path)
    _leading(sp, now)
    sp.ring.inflight = lambda: True
    await sp.write([(1, b"{}")] * 10, ack_timeout=1.0)  # kept for sealing, not sealed yet
    sp.log.truncate_after(4)  # behind the ring's back: 5..10 are rewritten below
    sp.log.append([(1, b'{"other":1}')] * 6, epoch=1)
    sp.ring.seal()
    frames = _frames(sp)
    assert [(f, last) for f, last, _ in frames] == [(1, 10)]
    assert (frames[0][2], 10) == sp.ring.encode_from(1, upto=10)
    await sp.write([(1, b'{"after":1}')] * 3, ack_timeout=1.0)  # kept afresh, sealed from memory
    sp.ring.seal()
    first, last, frame = _frames(sp)[-1]
    assert (first, last) == (11, 13)
    assert (frame, last) == sp.ring.encode_from(11, upto=13)


async def test_space_ships_before_its_fsync_but_acks_only_after_it(tmp_path: Path) -> None:
    # Entries ship as written, so the replicas' fsyncs run beside the primary's; a write is
    # acknowledged only once the primary's own fsync covers it, even when every replica needed
    # already acked it (a power loss could take it from this log, and `resume` is what keeps a
    # restarted primary from writing other entries at those sequences).
    gate = threading.Event()

    def held(fd: int) -> None:
        gate.wait(5.0)
        os.fsync(fd)

    sp, now = _space(tmp_path, fsync="always", hook=held)
    _leading(sp, now, policy="quorum")
    write = asyncio.create_task(sp.write([(1, b"{}")] * 3, ack_timeout=5.0))
    await asyncio.sleep(0.05)  # appended, waiting for its fsync
    assert sp.log.last_sequence == 3 and sp.log.durable_sequence == 0
    assert sp.sealed_upto == 3  # shipped before it is durable
    got = sp.ring.batch_at(1)
    assert got is not None and got[1] == 3
    sp.on_ack(NodeName("n1"), 3)  # the replica holds it: still not acknowledged
    await asyncio.sleep(0.05)
    assert not write.done()
    gate.set()
    assert await asyncio.wait_for(write, 5.0) == (1, 3, 1)
    assert sp.log.durable_sequence == 3
    await sp.writer.commit.stop()


def test_space_resume_fences_a_restarted_primary_until_a_newer_epoch(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1", "n2"], epoch=4))
    sp.resume()
    assert sp.accepted_epoch == 5 and sp.fenced_reason is not None
    assert "restarted" in sp.fenced_reason
    sp.membership.grant_lease(now[0])
    with pytest.raises(NotWritable, match="restarted"):
        sp.membership.check_writable()
    # Durably: a second restart before the control plane answers still finds epoch 5 accepted.
    again, _ = _space(tmp_path)
    saved = assignment_store.load(sp.path / "assignment.json")
    assert saved is not None and saved[0].epoch == 4 and saved[1] == 5
    again.membership.accepted_epoch = saved[1]
    again.apply_assignment(saved[0])
    again.resume()
    assert again.accepted_epoch == 5  # already above its epoch: not raised again
    # The control plane re-asserts it at a newer epoch: it writes again.
    sp.apply_assignment(_assignment("n0", ["n1", "n2"], epoch=6))
    sp.membership.grant_lease(now[0])
    assert sp.fenced_reason is None
    sp.membership.check_writable()
    # A replica never fences itself for restarting: it acknowledged only what it fsynced.
    rep, _ = _space(tmp_path / "r", node="n1")
    rep.apply_assignment(_assignment("n0", ["n1", "n2"], epoch=4))
    rep.resume()
    assert rep.accepted_epoch == 4 and rep.fenced_reason is None


def _batch_of(sp: Space, first: int, last: int) -> Batch:
    (frame,) = FrameDecoder().feed(sp.ring.encode_from(first, upto=last)[0])
    return Batch.from_frame(frame)


async def test_space_apply_takes_the_entries_as_the_frame_decoder_checked_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, now = _space(tmp_path / "p")
    _leading(primary, now)
    await primary.write([(1, b'{"k":%d}' % i) for i in range(20)], ack_timeout=1.0)
    replica, _ = _space(tmp_path / "r", node="n1")
    replica.apply_assignment(_assignment("n0", ["n1"]))
    batch = _batch_of(primary, 1, 20)
    assert batch.checked is not None and batch.checked.count == 20

    def walked(*args: object, **kwargs: object) -> None:
        raise AssertionError("the log parsed and checked the entries a second time")

    monkeypatch.setattr(wal_module, "check_run", walked)
    applied, written = replica.apply(batch.entries, batch.checked, int(batch.last_seq))
    assert applied == 20 and written.last == 20
    await replica.settle(written)
    assert replica.matched_sequence == 20
    assert replica.log.read(1, max_entries=100).data == primary.log.read(1, max_entries=100).data
    monkeypatch.undo()
    # A caller without a checked run gets the log's own checks.
    with pytest.raises(wal_module.WalCorruption):
        replica.apply(bytes(64), None, 21)


def test_space_records_a_snapshots_discard_as_it_adopts_the_new_log(tmp_path: Path) -> None:
    # Chaos seed 105: a space view taken after the new log was adopted but before the discard
    # was recorded showed a replica matching its primary and no cut, and the control plane
    # measured the failover's loss as 0 (159 acknowledged async writes were gone). The record
    # now lands in the same call that adopts the log.
    sp, _ = _space(tmp_path, node="n1")
    sp.discard_on_install = (100, 7, 3)
    new = SpaceLog(tmp_path / "new", space=SpaceId("orders"))
    old = sp.replace_log(new, GroupCommit(new, policy="none"))
    assert [(t["epoch"], t["after"], t["dropped"]) for t in sp.truncations] == [(3, 100, 7)]
    assert sp.dropped_entries == 7 and sp.discard_on_install is None
    sp.note_install_discard()  # once only
    assert sp.dropped_entries == 7
    assert old is not None


def test_space_a_snapshot_that_discards_a_divergent_tail_records_it(tmp_path: Path) -> None:
    # A deposed primary brought back by a snapshot loses its tail wholesale, not by a cut: the
    # failover's measured loss (decision records' entriesLost) must count it all the same.
    sp, _ = _space(tmp_path, node="n1")
    sp.note_discarded(100, 0, 3)
    assert sp.truncations == []
    sp.note_discarded(100, 7, 3)
    assert [(t["epoch"], t["after"], t["dropped"]) for t in truncations.load(sp.path)] == [
        (3, 100, 7)
    ]
    assert sp.dropped_entries == 7
