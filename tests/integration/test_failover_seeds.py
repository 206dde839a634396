"""Failover under the local control plane, repeated over seeds (slow).

Each seed picks which space's primary fails, the writers' batch sizes and pace, how long they
write before the fault, and the fault's phase relative to the control loop's tick. Per seed, on
one cluster of 3 nodes with two quorum spaces:

1. SIGKILL the chosen space's primary under writes: a replica is promoted at the next epoch, the
   decision is recorded, the writers carry on against the new primary, and no write acknowledged
   under quorum is lost or changed, in either space. The killed node restarts and rejoins.
2. SIGSTOP the (possibly different) chosen primary under writes: a replica is promoted; after
   SIGCONT the old primary never acknowledges a write, at most one node accepts writes for the
   space in any probe round, and the old primary rejoins as a replica with the new primary's log.

Uses the local cluster of test_partition.py (without proxies). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_partition import LocalHarness, accepted, harnesses

from engram_operator.local.loop import TIMING
from engram_operator.model import SpaceSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

SPACES = ("orders", "notes")


@pytest.fixture
async def make_local(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LocalHarness]]]:
    async with harnesses(tmp_path) as make:
        yield make


@dataclass
class Writers:
    """One sequential writer per space, following the control loop's placement."""

    h: LocalHarness
    rng: random.Random
    acked: list[tuple[str, int, int, int, list[dict[str, Any]]]] = field(default_factory=list)
    refused: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.stop.clear()
        for sid in SPACES:
            batch = self.rng.randint(1, 10)
            pause = self.rng.uniform(0.002, 0.02)
            self.tasks.append(asyncio.create_task(self._run(sid, batch, pause)))

    async def _run(self, sid: str, batch: int, pause: float) -> None:
        b = 0
        while not self.stop.is_set():
            node = self.h.placement(sid).primary
            payloads = [{"s": sid, "b": b, "i": i} for i in range(batch)]
            a = await self.h.write(node, sid, payloads, timeout=3.0)
            if a.ok:
                body = a.body
                self.acked.append(
                    (sid, body["epoch"], body["first_sequence"], body["last_sequence"], payloads)
                )
            else:
                self.refused += 1
            b += 1
            await asyncio.sleep(pause)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 15.0)
        self.tasks.clear()

    def count(self, sid: str, epoch: int | None = None) -> int:
        return sum(
            last - first + 1
            for s, e, first, last, _ in self.acked
            if s == sid and (epoch is None or e == epoch)
        )

    async def check_none_lost(self) -> None:
        """Every acknowledged entry is on its space's current primary, at its sequence."""
        for sid in SPACES:
            primary = self.h.placement(sid).primary
            have = await self.h.entries(primary, sid)
            for s, epoch, first, last, payloads in self.acked:
                if s != sid:
                    continue
                got = [have.get(q) for q in range(first, last + 1)]
                want = [(epoch, p) for p in payloads]
                assert got == want, (
                    f"{sid}: quorum-acknowledged entries {first}..{last} (epoch {epoch}) lost or "
                    f"changed on {primary}: {got[:2]}"
                )


async def _kill_primary(h: LocalHarness, w: Writers, rng: random.Random) -> None:
    sid = rng.choice(SPACES)
    before = {s: h.placement(s) for s in SPACES}
    old = before[sid].primary
    hit = [s for s in SPACES if before[s].primary == old]
    deadline = asyncio.get_running_loop().time() + rng.uniform(0.3, 1.5)
    await h.until(
        lambda: asyncio.get_running_loop().time() > deadline and w.count(sid) > 0,
        15.0,
        "writes before the kill",
    )
    await asyncio.sleep(rng.uniform(0.0, TIMING.check_interval))
    h.pr.kill(old, signal.SIGKILL)
    await h.until(
        lambda: all(h.placement(s).primary != old for s in hit), 15.0, f"promotions after {old}"
    )
    for s in SPACES:
        after = h.placement(s)
        if s in hit:
            assert after.epoch == before[s].epoch + 1 and after.primary in before[s].replicas
            record = h.decisions(s)[-1]
            assert record["winner"] == after.primary and record["oldPrimary"] == old, record
            assert any(
                x.startswith(f"promoted {after.primary} to primary of space {s} at epoch ")
                and f"({old} dead" in x
                for x in h.sentences
            ), h.sentences[-5:]
        else:
            assert after.primary == before[s].primary and after.epoch == before[s].epoch
    # Writes flow again on every space.
    counts = {s: w.count(s) for s in SPACES}
    await h.until(lambda: all(w.count(s) > counts[s] for s in SPACES), 15.0, "writes resuming")
    h.pr.start(old)

    def rejoined() -> bool:
        return all(
            h.view(old, s).get("role") == "replica"
            and h.view(old, s).get("epoch") == h.placement(s).epoch
            for s in SPACES
            if old in h.placement(s).members
        )

    await h.until(rejoined, 30.0, f"{old} rejoining after its restart")


async def _stop_primary(h: LocalHarness, w: Writers, rng: random.Random) -> None:
    sid = rng.choice(SPACES)
    before = h.placement(sid)
    old = before.primary
    await asyncio.sleep(rng.uniform(0.0, TIMING.check_interval))
    h.pr.kill(old, signal.SIGSTOP)
    try:
        await h.until(lambda: h.placement(sid).primary != old, 15.0, f"a promotion past {old}")
        new = h.placement(sid).primary
        await asyncio.sleep(rng.uniform(0.0, 0.5))
    finally:
        h.pr.kill(old, signal.SIGCONT)
    # From its first instant back, the old primary acknowledges nothing, and no round has two
    # nodes accepting writes for the space.
    for n in range(6):
        got = await h.probe(sid, f"r{n}", timeout=5.0)
        assert not got[old].ok, f"the deposed primary {old} acknowledged a write: {got[old]}"
        assert len(accepted(got)) <= 1, f"round {n}: {accepted(got)} accepted writes: {got}"
        await h.tick()
    record = h.decisions(sid)[-1]
    assert record["winner"] == new and record["oldPrimary"] == old, record

    def rejoined() -> bool:
        v = h.view(old, sid)
        return v.get("role") == "replica" and v.get("epoch") == h.placement(sid).epoch

    await h.until(rejoined, 30.0, f"{old} rejoining as a replica of {sid}")


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_failover_over_seeds(
    make_local: Callable[..., Awaitable[LocalHarness]], seed: int
) -> None:
    rng = random.Random(seed)
    spec = SpaceSpec(replicas=2, ack_policy="quorum")
    h = await make_local(spaces=dict.fromkeys(SPACES, spec), proxied=False)
    w = Writers(h, rng)
    w.start()
    try:
        await _kill_primary(h, w, rng)
        await _stop_primary(h, w, rng)
    finally:
        await w.finish()
    await w.check_none_lost()
    # Every member of every space converges on its primary's log.
    for sid in SPACES:
        await h.until(lambda s=sid: h.caught_up(s), 30.0, f"members of {sid} caught up")
        want = await h.entries(h.placement(sid).primary, sid)
        for m in h.placement(sid).members:
            assert await h.entries(m, sid) == want, f"{m}/{sid} differs from its primary"
    print(
        f"seed {seed}: {w.count('orders')} + {w.count('notes')} entries acknowledged, "
        f"{w.refused} writes refused; epochs {[h.placement(s).epoch for s in SPACES]}"
    )
