"""Acknowledged writes lost by an async failover, against the decision record's count.

ackPolicy async acknowledges a write once the primary's own WAL has it (design §5): a primary
crash loses what it had not shipped yet, and the promotion's decision record says how much
(`entriesPossiblyLost` = the most data known to exist − the winner's applied sequence, where
"known" is the old primary's *last report* to the control plane; election.py).

The replica streams are slowed (a FaultProxy delays primary → replica traffic and the primary
keeps at most 2 batches in flight), a writer keeps the primary busy, and the primary is
SIGKILLed. Then, exactly:

- every acknowledged entry up to the winner's sequence W survives, byte for byte, and the new
  primary starts its epoch at W + 1;
- the acknowledged entries missing on the new primary are exactly those above W;
- if the control plane heard the old primary's last sequence R *after* its last acknowledged
  write, the count missing equals `entriesPossiblyLost` (= R − W);
- if writes were acknowledged after that last report, the record cannot know them: the count
  missing is `entriesPossiblyLost` plus those writes, i.e. the record under-counts the loss.

Uses the proxied local cluster of test_partition.py. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_partition import NODE_FLAGS, LocalHarness, harnesses

from engram_operator.model import SpaceSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SPACE = "orders"
PER_REQUEST = 25
DELAY = 0.2  # seconds added to primary → replica frames; < the 2 s lease, so all land before
# the promotion: what the winner has at the decision is all it will ever get from the old one.
FLAGS = [*NODE_FLAGS, "--max-inflight-batches", "2"]


@pytest.fixture
async def make_local(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LocalHarness]]]:
    async with harnesses(tmp_path) as make:
        yield make


@dataclass
class Writer:
    """Sequential writer following the control loop's placement; pausable between requests."""

    h: LocalHarness
    acked: list[tuple[int, int, int, list[dict[str, Any]]]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    parked: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    acked_more: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.gate.set()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        b = 0
        while not self.stop.is_set():
            if not self.gate.is_set():
                self.parked.set()
                await self.gate.wait()
                self.parked.clear()
            node = self.h.placement(SPACE).primary
            payloads = [{"b": b, "i": i} for i in range(PER_REQUEST)]
            a = await self.h.write(node, SPACE, payloads, timeout=2.0)
            if a.ok:
                body = a.body
                self.acked.append(
                    (body["epoch"], body["first_sequence"], body["last_sequence"], payloads)
                )
                self.acked_more.set()
            b += 1
            await asyncio.sleep(0.005)

    async def pause(self) -> None:
        """Return once no request is in flight and none will start until `resume`."""
        self.gate.clear()
        await asyncio.wait_for(self.parked.wait(), 10.0)

    def resume(self) -> None:
        self.gate.set()

    async def finish(self) -> None:
        self.stop.set()
        self.gate.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10.0)

    def by_sequence(self, epoch: int) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for e, first, last, payloads in self.acked:
            if e == epoch:
                out.update(zip(range(first, last + 1), payloads, strict=True))
        return out

    def acks(self) -> int:
        return sum(last - first + 1 for _, first, last, _ in self.acked)


async def _backlogged(
    make_local: Callable[..., Awaitable[LocalHarness]],
) -> tuple[LocalHarness, Writer, str]:
    """A cluster whose async primary is well ahead of both replicas, with the writer running."""
    h = await make_local(spaces={SPACE: SpaceSpec(replicas=2, ack_policy="async")}, flags=FLAGS)
    old = h.placement(SPACE).primary
    for r in h.placement(SPACE).replicas:
        h.proxies[r].set_delay(DELAY, "up")
    w = Writer(h)
    w.start()

    def behind() -> bool:
        reps = h.view(old, SPACE).get("replicas", {})
        lag = min((r.get("lag_entries", 0) for r in reps.values()), default=0)
        return w.acks() >= 1500 and lag >= 500

    await h.until(behind, 30.0, "a replica backlog of 500+ entries")
    return h, w, old


async def _fail_over(h: LocalHarness, w: Writer, old: str) -> dict[str, Any]:
    await h.until(lambda: h.placement(SPACE).primary != old, 15.0, "a promotion")
    new = h.placement(SPACE).primary
    await h.until(lambda: bool(w.by_sequence(2)), 15.0, f"a write acknowledged by {new}")
    await w.finish()
    record = h.decisions(SPACE)[-1]
    assert record["winner"] == new and record["oldPrimary"] == old, record
    return record


async def _missing(h: LocalHarness, w: Writer, record: dict[str, Any]) -> tuple[int, list[int]]:
    """(W, acknowledged epoch-1 sequences missing on the new primary), after the shared checks."""
    new, winner_seq = record["winner"], record["winnerSequence"]
    # The new primary's own log ends its epoch 1 exactly at the winner's reported sequence.
    assert await h.epochs(new, SPACE) == [[1, 1], [2, winner_seq + 1]]
    have = await h.entries(new, SPACE)
    acked1 = w.by_sequence(1)
    # Acknowledged ranges of epoch 1 tile 1..max with no gap (the writer is sequential).
    assert sorted(acked1) == list(range(1, max(acked1) + 1))
    missing = []
    for seq, payload in sorted(acked1.items()):
        if have.get(seq) == (1, payload):
            continue
        assert seq > winner_seq, f"acknowledged entry {seq} <= W={winner_seq} lost: {have.get(seq)}"
        missing.append(seq)
    # Everything above W is gone: the new primary's entries there are its own, at epoch 2.
    assert all(have[s][0] == 2 for s in have if s > winner_seq)
    return winner_seq, missing


async def test_async_loss_equals_the_record_when_the_last_report_is_current(
    make_local: Callable[..., Awaitable[LocalHarness]],
) -> None:
    h, w, old = await _backlogged(make_local)
    # Between two requests: the next heartbeat reports the primary's true last sequence R, and
    # every entry up to R is acknowledged. Then SIGKILL, and the writer carries on at once.
    await w.pause()
    await h.tick()
    reported = h.view(old, SPACE)["last_sequence"]
    assert reported == max(w.by_sequence(1)), (reported, max(w.by_sequence(1)))
    h.pr.kill(old, signal.SIGKILL)
    w.resume()
    record = await _fail_over(h, w, old)

    winner_seq, missing = await _missing(h, w, record)
    assert record["oldPrimaryLastSequence"] == reported
    assert record["entriesPossiblyLost"] == reported - winner_seq > 0, record
    assert missing == list(range(winner_seq + 1, reported + 1))
    assert len(missing) == record["entriesPossiblyLost"]
    print(f"lost {len(missing)} acknowledged entries; record: {record['summary']}")


async def test_async_loss_beyond_the_last_report_is_not_in_the_record(
    make_local: Callable[..., Awaitable[LocalHarness]],
) -> None:
    h, w, old = await _backlogged(make_local)
    # The control loop hears the primary's last sequence R, then writes go on being
    # acknowledged until the kill: the record can only count up to R.
    await h.tick()
    reported = h.view(old, SPACE)["last_sequence"]

    async def acked_after_report() -> None:
        while max(w.by_sequence(1)) <= reported:
            w.acked_more.clear()
            await w.acked_more.wait()

    await asyncio.wait_for(acked_after_report(), 10.0)
    h.pr.kill(old, signal.SIGKILL)
    record = await _fail_over(h, w, old)

    winner_seq, missing = await _missing(h, w, record)
    beyond = [s for s in w.by_sequence(1) if s > reported]
    assert record["oldPrimaryLastSequence"] == reported
    assert record["entriesPossiblyLost"] == reported - winner_seq > 0, record
    assert beyond, "the kill was meant to follow an acknowledgement after the last report"
    # Exactly: what the record counts, plus what was acknowledged after the last report.
    assert missing == list(range(winner_seq + 1, max(w.by_sequence(1)) + 1))
    assert len(missing) == record["entriesPossiblyLost"] + len(beyond)
    print(
        f"lost {len(missing)} acknowledged entries; the record counts "
        f"{record['entriesPossiblyLost']} ({len(beyond)} acknowledged after the last report)"
    )
