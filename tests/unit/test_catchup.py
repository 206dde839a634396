"""Catch-up path choice, progress, throttle, and snapshot install/recovery on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram_contract.ids import SpaceId
from engram_sidecar.errors import SequenceError
from engram_sidecar.log import snapshot
from engram_sidecar.log.wal import SpaceLog
from engram_sidecar.replication.catchup import TokenBucket, choose_path
from engram_sidecar.space.replicas import CatchUpProgress


@pytest.mark.parametrize(
    ("nxt", "first", "last", "path"),
    [
        (5001, 1, 10_000, "incremental"),  # 5,000 behind, all retained
        (1, 1, 10_000, "incremental"),  # exactly the threshold
        (1, 1, 10_001, "snapshot"),  # one over the threshold
        (401, 5776, 8400, "snapshot"),  # needs entries already released
        (8401, 5776, 8400, "incremental"),  # caught up
        (1, 1, 0, "incremental"),  # empty log, new replica
    ],
)
def test_catchup_choose_path(nxt: int, first: int, last: int, path: str) -> None:
    c = choose_path(replica_next=nxt, primary_first=first, primary_last=last, threshold=10_000)
    assert c.path == path, c.reason


def test_catchup_progress_rate_and_eta_on_virtual_time() -> None:
    t = [100.0]
    p = CatchUpProgress("snapshot", "far behind", 1000, 11_000, total_bytes=10, clock=lambda: t[0])
    assert p.total_entries == 10_000 and p.eta_seconds() is None
    t[0] += 2.0
    p.done_sequence = 5000
    assert p.rate() == 2000.0
    assert p.eta_seconds() == 3.0
    assert p.view()["entries_done"] == 4000


def test_catchup_token_bucket_caps_and_refills() -> None:
    t = [0.0]
    b = TokenBucket(rate=1000.0, burst=500.0, clock=lambda: t[0])
    assert b.try_take(500)
    assert not b.try_take(100)
    assert b.wait_time(100) == pytest.approx(0.1)
    t[0] += 0.1
    assert b.try_take(100)
    # A chunk bigger than the burst still goes once the bucket is full, or it never would.
    t[0] += 10
    assert b.try_take(2000)


def _entries(log: SpaceLog, n: int) -> None:
    log.append([(1, b"p" * 50)] * n, epoch=1)


def test_snapshot_build_install_and_recover(tmp_path: Path) -> None:
    space = SpaceId("snap")
    primary = SpaceLog(tmp_path / "p" / "snap", space=space, segment_bytes=4096)
    _entries(primary, 300)
    replica_dir = tmp_path / "r" / "snap"
    live = SpaceLog(replica_dir, space=space, segment_bytes=4096)
    _entries(live, 10)
    live.close()
    b = snapshot.SnapshotBuilder(
        replica_dir,
        space=space,
        first=1,
        last=300,
        epoch=1,
        history=primary.history,
        segment_bytes=4096,
    )
    seq = 1
    while seq <= 300:  # a read stays inside one segment
        r = primary.read(seq, max_entries=300, max_bytes=1 << 20)
        b.append(r.data)
        seq = r.last_sequence + 1
    b.finish()
    # Crash after the marker, before the swap: recovery finishes the install.
    assert snapshot.recover(replica_dir) == "finished installing a complete snapshot"
    got = SpaceLog(replica_dir, space=space, segment_bytes=4096)
    assert (got.first_sequence, got.last_sequence) == (1, 300)
    assert sorted(p.read_bytes() for p in (replica_dir / "wal").iterdir()) == sorted(
        p.read_bytes() for p in (tmp_path / "p" / "snap" / "wal").iterdir()
    )


def test_snapshot_partial_is_discarded_never_served(tmp_path: Path) -> None:
    space = SpaceId("snap")
    replica_dir = tmp_path / "snap"
    live = SpaceLog(replica_dir, space=space)
    _entries(live, 5)
    live.close()
    b = snapshot.SnapshotBuilder(
        replica_dir, space=space, first=1, last=100, epoch=1, history=[(1, 1)], segment_bytes=4096
    )
    src = SpaceLog(tmp_path / "src", space=space)
    _entries(src, 100)
    b.append(src.read(1, max_entries=50).data)
    with pytest.raises(SequenceError, match=r"expected 1\.\.100"):
        b.finish()
    assert snapshot.recover(replica_dir) == "discarded a partial snapshot"
    again = SpaceLog(replica_dir, space=space)
    assert again.last_sequence == 5  # the live log, untouched


def test_snapshot_new_log_can_start_past_one(tmp_path: Path) -> None:
    log = SpaceLog(tmp_path / "s", space=SpaceId("snap"), first_sequence=5776)
    assert (log.first_sequence, log.next_sequence) == (5776, 5776)
