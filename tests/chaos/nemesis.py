"""The nemesis: a seeded random schedule of faults, and the code that injects and heals them.

The schedule is a list of `FaultSpec`s drawn from `random.Random(seed)` alone, so a seed always
gives the same faults in the same order with the same parameters (`describe_schedule` prints
it). Targets are roles, resolved when the fault starts: "the primary of space X" or "node-i";
each fault's own choices at run time (which peers to cut, which node is skewed) come from
`random.Random(f"{seed}:{index}")`. Timing is real, so two runs of a seed differ in what the
writers and the control loop were doing when a fault struck; the timeline records what happened.

Fault kinds (the table in docs/reliability.md counts them):

- `kill`: SIGKILL a node (often a primary); restarted after the hold.
- `power-cut`: SIGKILL a node, then cut its WAL back to what its fsyncs covered, as a power
  loss would (the test-only `ENGRAM_TEST_DURABLE_MARKS`, `engram_sidecar.log.durable_marks`);
  restarted after the hold. A SIGKILL alone keeps the page cache.
- `pause`: SIGSTOP a node; SIGCONT after the hold.
- `partition`: cut a node from all or some other nodes, both ways (sometimes from the control
  plane too); healed by closing the cut connections and clearing the proxies.
- `partition-one-way`: drop what a node sends to, or receives from, all or some others.
- `cp-cut`: cut the control plane ↔ one node (often a primary) only, both ways.
- `slow`: delay 1–4 directed links by 20–300 ms (+ jitter), in the background.
- `clock-skew`: restart a node with its wall clock 1–30 s ahead or behind (the test-only
  `ENGRAM_TEST_WALL_CLOCK_OFFSET_S`); it stays skewed in the background, across restarts, until
  a restart without the offset ends it.
- `disk-full`: fill the tmpfs that holds one node's data until ENOSPC; delete the filler after
  the hold.
- `restart-catchup`: SIGKILL a node, let a backlog build, restart it, SIGKILL it again while it
  catches up, restart it.
- `split` (model `multi` only): split the control plane and the nodes into two sides at random
  and cut every link between them, e.g. {primary, one replica} | {control plane, other
  replica}, or the control plane alone against every node.

Two fault models (`MODELS`):

- `single`: at most one fault that *impairs* a node (kills, pauses, cuts it off, fills its disk,
  restarts it) at any moment: the "any single-node failure" of design §5 that every ack policy
  promises to survive. Slow links and skewed clocks are not impairments (a correct system is
  slow, not wrong, under them) and overlap everything.
- `multi`: up to two impairing faults at once, and `split`s: several nodes cut off together. Only
  `quorum` promises to lose nothing here (a majority partition never loses a majority-held
  entry); `one` and `async` losses are reported, not failed on. Split brain (two primaries
  acknowledging) and divergent logs are failures in both models.

Each impairing fault holds a slot of a semaphore (`max_impaired` slots) for its whole duration,
and process faults also lock their node; so does the restart that ends a clock skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tests.chaos.harness import ChaosCluster
from tests.chaos.links import CP

KINDS: Final = (
    "kill",
    "power-cut",
    "pause",
    "partition",
    "partition-one-way",
    "cp-cut",
    "slow",
    "clock-skew",
    "disk-full",
    "restart-catchup",
    "split",
)
MODELS: Final = {"single": 1, "multi": 2}  # model -> impairing faults at once
WEIGHTS: Final = {
    "kill": 16,
    "power-cut": 10,
    "pause": 13,
    "partition": 15,
    "partition-one-way": 10,
    "cp-cut": 10,
    "slow": 18,
    "clock-skew": 6,
    "disk-full": 6,
    "restart-catchup": 6,
    "split": 12,
}
BACKGROUND: Final = frozenset({"slow"})
PROCESS: Final = frozenset(
    {"kill", "power-cut", "pause", "clock-skew", "disk-full", "restart-catchup"}
)
HEAL_TIMEOUT: Final = 30.0  # one fault's heal (restart included)


@dataclass(frozen=True)
class FaultSpec:
    index: int
    kind: str
    target: tuple[str, str]  # ("primary", space) or ("node", name)
    hold: float
    gap: float  # pause before the fault starts

    def describe(self) -> str:
        who = f"primary of {self.target[1]}" if self.target[0] == "primary" else self.target[1]
        return f"#{self.index} {self.kind} on {who}, hold {self.hold:.2f}s after {self.gap:.2f}s"


def make_schedule(
    seed: int, count: int, nodes: Sequence[str], spaces: Sequence[str], kinds: Sequence[str]
) -> list[FaultSpec]:
    """`count` faults from the seed alone (see the module docstring)."""
    rng = random.Random(seed)
    allowed = [k for k in KINDS if k in kinds]
    weights = [WEIGHTS[k] for k in allowed]
    out = []
    for i in range(count):
        kind = rng.choices(allowed, weights)[0]
        if rng.random() < 0.5:
            target = ("primary", rng.choice(list(spaces)))
        else:
            target = ("node", rng.choice(list(nodes)))
        long = rng.random() < 0.35  # long enough for the control plane to fail over
        hold = rng.uniform(2.5, 5.0) if long else rng.uniform(0.3, 1.5)
        if kind in ("slow", "clock-skew"):
            hold = rng.uniform(4.0, 15.0)
        out.append(FaultSpec(i, kind, target, round(hold, 3), round(rng.uniform(0.1, 0.6), 3)))
    return out


def describe_schedule(schedule: Sequence[FaultSpec]) -> str:
    return "\n".join(s.describe() for s in schedule)


@dataclass
class FaultRecord:
    spec: FaultSpec
    victim: str = ""
    detail: str = ""
    started: float = 0.0
    ended: float | None = None
    skipped: str = ""


@dataclass
class Nemesis:
    cluster: ChaosCluster
    schedule: list[FaultSpec]
    seed: int
    max_impaired: int = 1
    records: list[FaultRecord] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None
    _node_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def counts(self) -> Counter[str]:
        return Counter(r.spec.kind for r in self.records if not r.skipped)

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_impaired)
        return self._slots

    def lock(self, node: str) -> asyncio.Lock:
        return self._node_locks.setdefault(node, asyncio.Lock())

    def _note(self, rec: FaultRecord, text: str) -> None:
        self.cluster.note("nemesis", f"#{rec.spec.index} {rec.spec.kind} {rec.victim}: {text}")

    def _victim(self, spec: FaultSpec) -> str:
        if spec.target[0] == "primary":
            p = self.cluster.primary(spec.target[1])
            if p is not None:
                return p
            return sorted(self.cluster.nodes)[0]
        return spec.target[1]

    async def run(self, deadline: float) -> None:
        """Inject every fault of the schedule in order (bounded by `deadline`, monotonic): each
        starts once its gap has passed and an impairment slot is free."""
        running: set[asyncio.Task[None]] = set()
        for spec in self.schedule:
            if time.monotonic() > deadline:
                self.cluster.note("nemesis", f"time is up: {len(self.records)} faults injected")
                break
            await asyncio.sleep(spec.gap)
            rec = FaultRecord(spec)
            if spec.kind in BACKGROUND:
                rec.started = self.cluster.now()
                self.records.append(rec)
                self.background.append(asyncio.create_task(self._guarded(rec)))
                continue
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self.slots.acquire(), max(0.0, remaining))
            except TimeoutError:
                break
            rec.started = self.cluster.now()
            self.records.append(rec)
            task = asyncio.create_task(self._guarded(rec, release=True))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running, timeout=HEAL_TIMEOUT * 4)

    async def _guarded(self, rec: FaultRecord, *, release: bool = False) -> None:
        """Run one fault; bounded, and never fatal to the run (a harness failure is reported)."""
        budget = rec.spec.hold + 4 * HEAL_TIMEOUT
        try:
            await asyncio.wait_for(self._inject(rec), budget)
        except TimeoutError:
            self.cluster.problems.append(f"fault {rec.spec.describe()} took > {budget:.0f} s")
        except Exception as err:
            self.cluster.problems.append(f"fault {rec.spec.describe()} raised {err!r}")
        finally:
            rec.ended = self.cluster.now()
            if release:
                self.slots.release()

    async def _inject(self, rec: FaultRecord) -> None:
        spec = rec.spec
        c = self.cluster
        links = c.links
        assert links is not None
        rng = random.Random(f"{self.seed}:{spec.index}")
        victim = self._victim(spec)
        if spec.kind == "disk-full":
            if c.disk_victim is None:
                rec.skipped = f"no tmpfs ({c.tmpfs_skip_reason})"
                return
            victim = c.disk_victim
        rec.victim = victim
        others = [n for n in c.nodes if n != victim]
        kind = spec.kind

        if kind == "slow":
            pairs = [(a, b) for a in [CP, *c.nodes] for b in c.nodes if a != b]
            chosen = rng.sample(pairs, k=min(len(pairs), rng.randint(1, 4)))
            delay, jitter = rng.uniform(0.02, 0.3), rng.uniform(0.0, 0.1)
            rec.detail = f"{', '.join(f'{a}->{b}' for a, b in chosen)} +{delay * 1000:.0f} ms"
            for a, b in chosen:
                links.slow(a, b, delay, jitter)
            self._note(rec, f"slow links {rec.detail}")
            await self._hold(spec.hold)
            await links.heal(chosen, drops=False)
            self._note(rec, "links at full speed again")
            return

        if kind in ("partition", "partition-one-way", "cp-cut", "split"):
            await self._partition(rec, victim, others, rng)
            return
        async with self.lock(victim):
            if kind == "kill":
                await c.kill(victim)
                self._note(rec, "SIGKILL")
                await self._hold(spec.hold)
                await self._restart(rec, victim)
            elif kind == "power-cut":
                # SIGKILL, then what a power loss takes too: every WAL byte no fsync covered
                # yet. Entries ship before they are durable, so the replicas may hold some of
                # them (design-notes "Entries ship before they are durable").
                await c.kill(victim)
                changed, lost = c.lose_unsynced(victim)
                rec.detail = f"{lost} unsynced bytes lost from {changed} segment(s)"
                self._note(rec, f"power cut: SIGKILL, {rec.detail}")
                await self._hold(spec.hold)
                await self._restart(rec, victim)
            elif kind == "pause":
                c.signal(victim, signal.SIGSTOP)
                self._note(rec, "SIGSTOP")
                try:
                    await self._hold(spec.hold)
                finally:
                    c.signal(victim, signal.SIGCONT)
                self._note(rec, "SIGCONT")
            elif kind == "clock-skew":
                await self._clock_skew(rec, victim, rng)
            elif kind == "disk-full":
                written = await asyncio.to_thread(c.fill_disk)  # the loop keeps serving
                rec.detail = f"{written} bytes of filler"
                self._note(rec, f"disk full ({rec.detail})")
                try:
                    await self._hold(spec.hold)
                finally:
                    c.free_disk()
                self._note(rec, "disk freed")
            elif kind == "restart-catchup":
                await self._restart_during_catchup(rec, victim, rng)
            else:
                raise AssertionError(f"unknown fault kind {kind}")

    async def _hold(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _restart(self, rec: FaultRecord, victim: str) -> None:
        c = self.cluster
        skew = c.nodes[victim].skew
        if await c.start_node(victim, skew=skew):
            self._note(rec, f"restarted (clock skew {skew:+.1f} s)" if skew else "restarted")
        else:
            self._note(rec, "restart FAILED (see problems)")

    async def _partition(
        self, rec: FaultRecord, victim: str, others: list[str], rng: random.Random
    ) -> None:
        c = self.cluster
        links = c.links
        assert links is not None
        kind = rec.spec.kind
        direction = "both"
        if kind == "split":
            # Two sides: the victim's, and the control plane's with the nodes not chosen to join
            # the victim (possibly none: the control plane alone against every node).
            side = {victim, *rng.sample(others, k=rng.randint(0, len(others)))}
            rest = [CP, *(n for n in c.nodes if n not in side)]
            cuts = [(a, b) for a in sorted(side) for b in rest]
            rec.detail = f"{{{', '.join(sorted(side))}}} | {{{', '.join(rest)}}}"
        else:
            if kind == "cp-cut":
                peers: list[str] = [CP]
            else:
                if rng.random() < 0.5 or len(others) == 1:
                    peers = list(others)
                else:
                    peers = rng.sample(others, k=rng.randint(1, len(others) - 1))
                if rng.random() < 0.5:
                    peers.append(CP)
                if kind == "partition-one-way":
                    direction = rng.choice(["in", "out"])
            cuts = [(victim, p) for p in peers]
            arrow = {"both": "<-/->", "in": "<-/-", "out": "-/->"}[direction]
            rec.detail = f"{victim} {arrow} {', '.join(sorted(peers))}"
        for a, b in cuts:
            if direction in ("both", "out"):
                links.drop(a, b)
            if direction in ("both", "in"):
                links.drop(b, a)
        self._note(rec, f"partition {rec.detail}")
        try:
            await self._hold(rec.spec.hold)
        finally:
            await links.heal(cuts, delays=False)
        self._note(rec, "partition healed")

    async def _clock_skew(self, rec: FaultRecord, victim: str, rng: random.Random) -> None:
        c = self.cluster
        offset = round(rng.choice([-1, 1]) * rng.uniform(1.0, 30.0), 3)
        rec.detail = f"{offset:+.3f} s"
        await c.kill(victim)
        c.nodes[victim].skew = offset
        self._note(rec, f"SIGKILL, restart with the wall clock {offset:+.3f} s off")
        await self._restart(rec, victim)
        self.background.append(asyncio.create_task(self._unskew_later(rec, victim)))

    async def _unskew_later(self, rec: FaultRecord, victim: str) -> None:
        c = self.cluster
        await self._hold(rec.spec.hold)
        if self._stop.is_set():
            return  # the final heal leaves the clock as it is
        async with self.slots, self.lock(victim):
            if self._stop.is_set():
                return
            c.nodes[victim].skew = 0.0
            await c.terminate(victim)
            self._note(rec, "SIGTERM, restart with the right wall clock")
            await self._restart(rec, victim)

    async def _restart_during_catchup(
        self, rec: FaultRecord, victim: str, rng: random.Random
    ) -> None:
        c = self.cluster
        await c.kill(victim)
        self._note(rec, "SIGKILL (a backlog builds up)")
        await self._hold(max(2.0, rec.spec.hold))
        await self._restart(rec, victim)
        seen = await self._catching_up(victim, timeout=4.0)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        await c.kill(victim)
        rec.detail = f"killed again {'while catching up' if seen else 'after restart'}: {seen}"
        self._note(rec, f"SIGKILL again ({rec.detail})")
        await self._hold(rng.uniform(0.2, 1.5))
        await self._restart(rec, victim)

    async def _catching_up(self, victim: str, timeout: float) -> str:
        """Wait (bounded) until a primary reports `victim` behind it; says what it saw."""
        c = self.cluster
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for sid in c.spaces:
                p = c.placement(sid)
                if p is None or victim not in p.replicas:
                    continue
                v = await c.view(p.primary, sid)
                rep: dict[str, Any] = (v or {}).get("replicas", {}).get(victim, {})
                if rep.get("catch_up"):
                    return f"{sid} catch-up {rep['catch_up'].get('phase', '?')}"
                if rep.get("connected") and rep.get("lag_entries", 0) > 0:
                    return f"{sid} {rep.get('lag_entries')} entries behind"
            await asyncio.sleep(0.05)
        return ""

    async def heal_everything(self) -> None:
        """End every fault: stop the schedule, SIGCONT, free the disk, clear every link, start
        every node that is down. Bounded."""
        c = self.cluster
        self._stop.set()
        if self.background:
            await asyncio.wait(self.background, timeout=HEAL_TIMEOUT)
            for t in self.background:
                t.cancel()
        for name in c.nodes:
            c.signal(name, signal.SIGCONT)
        c.free_disk()
        if c.links is not None:
            await c.links.heal()
        results = await asyncio.gather(
            *(c.start_node(n, skew=c.nodes[n].skew) for n in c.nodes if not c.running(n))
        )
        c.note("nemesis", f"healed everything ({sum(results)} nodes restarted)")
