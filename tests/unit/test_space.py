"""A hosted space's decisions: write lease, fencing, ack-policy waits, batch sealing."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram_contract.assignment import Assignment, Member
from engram_contract.ids import NodeName, SpaceId
from engram_sidecar.groupcommit import GroupCommit
from engram_sidecar.space import NotWritable, Space
from engram_sidecar.wal import SpaceLog

S = 1_000_000_000


def _assignment(
    primary: str, replicas: list[str], *, epoch: int = 1, policy: str = "quorum"
) -> Assignment:
    def m(n: str) -> Member:
        return Member(NodeName(n), f"127.0.0.1:{1000 + int(n[1])}", f"127.0.0.1:{2000 + int(n[1])}")

    return Assignment(epoch, m(primary), tuple(m(r) for r in replicas), policy)  # type: ignore[arg-type]


def _space(tmp_path: Path, node: str = "n0") -> tuple[Space, list[float]]:
    wal = SpaceLog(tmp_path / "s", space=SpaceId("orders"))
    now = [100.0]  # the node's monotonic clock, seconds
    sp = Space(
        space=SpaceId("orders"),
        node=NodeName(node),
        wal=wal,
        commit=GroupCommit(wal, policy="none"),
        batch_max_entries=100,
        batch_max_delay=0.01,
        clock=lambda: now[0],
    )
    sp.lease_seconds = 1.5
    return sp, now


def test_space_lease_needs_a_control_plane_grant(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1", "n2"]))
    assert not sp.lease_valid()  # an assignment alone (e.g. reloaded from disk) grants nothing
    sp.grant_lease(now[0])
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
    sp.grant_lease(now[0])
    now[0] += 2.0
    sp.on_ack(NodeName("n1"), 1)
    sp.on_ack(NodeName("n2"), 1)
    assert not sp.lease_valid()
    with pytest.raises(NotWritable, match="no write lease") as err:
        sp.check_writable()
    assert err.value.code == "unavailable"


def test_space_lease_from_an_old_assignment_ends_with_a_new_one(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.grant_lease(now[0])
    sp.apply_assignment(_assignment("n0", ["n1"], epoch=3))
    assert not sp.lease_valid()  # a grant vouched for epoch 1, not for epoch 3


def test_space_higher_epoch_fences_and_demotion_clears_it(tmp_path: Path) -> None:
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.grant_lease(now[0])
    sp.note_epoch(2)
    with pytest.raises(NotWritable, match="fenced"):
        sp.check_writable()
    sp.apply_assignment(_assignment("n1", ["n0"], epoch=2))
    assert sp.role == "replica"
    assert sp.fenced_reason is None
    with pytest.raises(NotWritable) as err:
        sp.check_writable()
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
    sp.on_truncated(2)
    assert sp.matched_sequence == 2


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
    sp.on_batch = seen.append
    sp.log.append([(1, b"x")] * 250, epoch=1)
    sp.on_append()  # nothing in flight: sealed at once, in batches of at most 100
    assert seen == [100, 100, 50]
    frame, last = sp.batch_at(101) or (b"", 0)
    assert last == 200 and frame


def test_space_lease_is_the_shorter_of_the_grant_and_its_own(tmp_path: Path) -> None:
    # The control plane's wait before a promotion is its own lease plus the delay bound: a node
    # configured with a longer write_lease_seconds must not outlast it.
    sp, now = _space(tmp_path)
    sp.apply_assignment(_assignment("n0", ["n1"]))
    sp.grant_lease(now[0], 0.5)
    assert sp.lease_valid(now[0] + 0.49) and not sp.lease_valid(now[0] + 0.5)
    sp.lease_until = float("-inf")
    sp.grant_lease(now[0], 60.0)  # never longer than the node's own 1.5 s
    assert not sp.lease_valid(now[0] + 1.5)
