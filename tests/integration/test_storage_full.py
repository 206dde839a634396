"""A real full disk (ENOSPC on a small tmpfs) under the WAL and its metadata files.

Each failure must be a `StorageError` of kind DiskFull naming the file, with nothing half
written: not a bare OSError (which the replication code reads as a lost peer), not a corrupt
epochs.json or assignment.json, not a partial entry. Once space is freed, everything works again,
and the log reopens cleanly. Skipped where a tmpfs can't be mounted (the harness is shared with
test_api_errors).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from tests.integration.test_api_errors import fill, small_disk  # noqa: F401 - fixture

from engram_contract.assignment import Assignment, Member
from engram_contract.formats.entry import EntryType
from engram_contract.ids import NodeName, SpaceId
from engram_sidecar.errors import StorageError
from engram_sidecar.log import assignment_store as assignment_file
from engram_sidecar.log import epochs
from engram_sidecar.log.storage_health import StorageHealth
from engram_sidecar.log.verify import verify_space
from engram_sidecar.log.wal import SpaceLog

pytestmark = pytest.mark.integration

SPACE = SpaceId("full-disk")
REC = (EntryType.EPISODE_STORE, b"f" * 200)


def _assignment(epoch: int) -> Assignment:
    return Assignment(epoch, Member(NodeName("n0"), "127.0.0.1:7000"), ())


@pytest.mark.timeout(60)
def test_full_disk_surfaces_as_disk_full_and_keeps_every_file_whole(
    small_disk: Path,  # noqa: F811 - the fixture imported above
) -> None:
    space_dir = small_disk / SPACE
    lg = SpaceLog(space_dir, space=SPACE, segment_bytes=64 * 1024)
    lg.append([REC] * 20, epoch=1)
    lg.sync()
    assignment_file.save(space_dir / "assignment.json", _assignment(1), 1)
    filler = small_disk / "filler"
    filler.mkdir()
    fill(filler)
    health = StorageHealth(clock=lambda: 0.0)

    # Appends go on until the last page is used, then fail whole.
    failed: StorageError | None = None
    for _ in range(10_000):  # bounded: far more entries than the disk holds
        before = lg.last_sequence
        try:
            lg.append([REC], epoch=1)
        except StorageError as err:
            failed = err
            assert lg.last_sequence == before
            break
    assert failed is not None, "the disk never filled up"
    assert (failed.kind, failed.errno) == ("DiskFull", errno.ENOSPC)
    assert failed.path.endswith(".wal") and str(SPACE) in str(failed)
    assert health.record(failed) and health.state == "DiskFull"
    last = lg.last_sequence

    # A new epoch needs epochs.json rewritten: refused before any entry, old file intact.
    with pytest.raises(StorageError) as got:
        lg.append([REC], epoch=2)
    assert got.value.kind == "DiskFull" and got.value.path.endswith("epochs.tmp")
    assert epochs.load(space_dir / "epochs.json") == [(1, 1)]
    with pytest.raises(StorageError) as got:
        assignment_file.save(space_dir / "assignment.json", _assignment(2), 2)
    assert got.value.kind == "DiskFull"
    assert assignment_file.load(space_dir / "assignment.json") == (_assignment(1), 1)
    assert not list(space_dir.glob("*.tmp"))  # failed temp files are not left filling the disk

    shutil.rmtree(filler)
    assert lg.append([REC], epoch=2) == (last + 1, last + 1)
    assignment_file.save(space_dir / "assignment.json", _assignment(2), 2)
    assert health.clear() and health.healthy
    lg.close()
    lg = SpaceLog(space_dir, space=SPACE, segment_bytes=64 * 1024)
    assert lg.last_sequence == lg.durable_sequence == last + 1
    assert lg.history == [(1, 1), (2, last + 1)]
    lg.close()
    problems = verify_space(space_dir).problems
    assert not problems, problems
