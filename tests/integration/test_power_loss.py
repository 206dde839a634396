"""A primary that loses its page cache must not write again at its old epoch.

Entries ship before they are durable (design-notes "Entries ship before they are durable"), so a
replica can hold entries that a power loss then takes from the primary's disk. Were the
restarted primary to lead again at the same epoch, it would write other entries at those same
(epoch, sequence) pairs, and log matching would take the replicas' stale copies for them: the
logs would differ with nothing to tell. The sidecar's `Space.resume` makes a restarted primary
accept the next epoch itself and refuse writes until the control plane re-asserts it at a newer
one; the new epoch's entries then cut the replicas' stale tail.

The test plays the power loss on real processes: SIGKILL the primary, cut its WAL files back
by a few entries as a lost page cache would (the replicas keep them), restart it. Automatic
failover is off, so the same node must lead again; without `resume` it would lead at its old
epoch and the final logs would differ, which is what the checker looks for. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from tests.integration.test_partition import LocalHarness, harnesses

from engram_contract.formats.entry import Entry
from engram_contract.ids import NodeName
from engram_operator.model import SpaceSpec
from engram_sidecar.log.verify import Problem, dump

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SPACE = "orders"
LOST = 5  # entries the "power loss" takes from the primary's disk after the replicas got them


@pytest.fixture
async def make_local(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LocalHarness]]]:
    async with harnesses(tmp_path) as make:
        yield make


def lose_tail(space_dir: Path, keep_upto: int) -> int:
    """Cut the WAL under `space_dir` right after entry `keep_upto`, as a lost page cache would:
    that segment shortened at the entry's end, later segments gone. Returns the entries cut."""
    cut_at: tuple[str, int] | None = None
    after = 0
    for path, offset, item in dump(space_dir):
        assert not isinstance(item, Problem), f"{path}: {item}"
        assert isinstance(item, Entry)
        if item.sequence == keep_upto + 1:
            cut_at = (path, offset)
        if item.sequence > keep_upto:
            after += 1
    assert cut_at is not None, f"no entry {keep_upto + 1} in {space_dir}"
    path, offset = cut_at
    os.truncate(path, offset)
    for later in sorted(Path(path).parent.glob("*.wal")):
        if later.name > Path(path).name:
            later.unlink()
    return after


async def test_restarted_primary_that_lost_its_tail_leads_only_at_a_newer_epoch(
    make_local: Callable[..., Awaitable[LocalHarness]],
) -> None:
    spec = SpaceSpec(replicas=2, ack_policy="quorum", failover_automatic=False)
    h = await make_local(spaces={SPACE: spec}, proxied=False)
    before = h.placement(SPACE)
    primary = before.primary

    acked: dict[int, object] = {}  # sequence -> payload, every write the cluster acknowledged
    for i in range(20):
        answer = await h.write(primary, SPACE, [{"before": i}])
        assert answer.ok, answer
        acked[answer.body["last_sequence"]] = {"before": i}
    await h.until(lambda: h.caught_up(SPACE), 15.0, "the replicas hold every entry")
    last = max(acked)

    # The power loss: the last LOST entries were on both replicas but never reached the
    # primary's disk. (Here the cluster did acknowledge them, since their fsync did run; a real
    # power loss can only take entries not yet acknowledged, so the checker forgets them.)
    h.pr.kill(primary)  # waits for the process to end
    node = next(n for n in h.nodes if n.name == primary)
    assert node.proc is not None and node.proc.poll() is not None
    assert lose_tail(node.data_dir / SPACE, last - LOST) == LOST
    for s in range(last - LOST + 1, last + 1):
        del acked[s]
    h.pr.start(NodeName(primary))

    # Writes go to the restarted node until it takes them (it is the only one that may lead:
    # failover is off), ticking the control loop in between.
    epochs = set()
    deadline = time.monotonic() + 30.0
    i = 0
    while i < 10:
        answer = await h.write(primary, SPACE, [{"after": i}], timeout=2.0)
        if answer.ok:
            epochs.add(answer.body["epoch"])
            acked[answer.body["last_sequence"]] = {"after": i}
            i += 1
            continue
        assert time.monotonic() < deadline, f"no write taken in 30 s: {answer}; {h.sentences[-3:]}"
        await h.tick()
        await asyncio.sleep(0.05)
    await h.until(lambda: h.caught_up(SPACE), 15.0, "the replicas hold every new entry")

    logs = {n.name: await h.entries(n.name, SPACE) for n in h.nodes}
    reference = logs[primary]
    for name, entries in logs.items():
        assert entries == reference, f"{name}'s log differs from the primary's"
    for seq, payload in acked.items():
        assert reference[seq][1] == payload, f"acknowledged entry {seq} lost or changed"
    # It leads at a newer epoch, whose entries fill the positions the power loss emptied.
    after = h.placement(SPACE)
    assert after.epoch > before.epoch and epochs == {after.epoch}
    assert any(
        f"primary {primary} restarted and takes writes only at a newer epoch" in s
        for s in h.sentences
    ), h.sentences[-5:]
    assert {reference[s][0] for s in range(last - LOST + 1, last + 1)} == {after.epoch}
    for r in after.replicas:
        view = await h.space_view(r, SPACE)
        assert view.get("dropped_entries", 0) >= LOST, view
