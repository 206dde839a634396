"""`engram-replication up --demo`: a workload, a killed primary, the failover, the rejoin.

`Workload` writes to every space's primary (following it when it moves); `run_demo` waits for the
cluster, shows live lag, SIGKILLs the node that leads the most spaces, waits for every space to
have a primary again, restarts the node and waits for it to catch up. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from engram_contract.client import SidecarError
from engram_contract.ids import NodeName, SpaceId
from engram_operator.local.loop import ControlLoop
from engram_operator.local.supervisor import Processes


def table(loop: ControlLoop) -> str:
    """Every space: its primary, epoch, last sequence, and each replica's progress."""
    lines = [
        f"{'SPACE':<10} {'PRIMARY':<8} {'EPOCH':>5} {'LAST SEQ':>9}  "
        "REPLICAS (acked / lag entries / lag s / state)"
    ]
    for sid, rec in loop.spaces.items():
        p = rec.placement
        if p is None:
            lines.append(f"{sid:<10} (not placed) {rec.last_sentence}")
            continue
        v = loop.status.get(p.primary, {}).get("spaces", {}).get(sid)
        if v is None:
            lines.append(f"{sid:<10} {p.primary:<8} {p.epoch:>5} {'?':>9}  primary not answering")
            continue
        reps = []
        for name, r in sorted(v.get("replicas", {}).items()):
            reps.append(
                f"{name}: {r['acked_sequence']} / {r['lag_entries']} / "
                f"{r['lag_seconds']:.2f} / {r['state']}"
            )
        lines.append(
            f"{sid:<10} {p.primary:<8} {p.epoch:>5} {v['last_sequence']:>9}  "
            + ("; ".join(reps) or "-")
        )
    return "\n".join(lines)


class Workload:
    """Writers that follow each space's primary and retry elsewhere on 421/503/errors."""

    def __init__(self, loop: ControlLoop, batch: int = 20, rate_per_space: float = 200.0) -> None:
        self.loop = loop
        self.batch = batch
        self.interval = batch / rate_per_space
        self.acked = 0
        self.errors = 0
        self.max_gap = 0.0
        self.last_ok: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(s)) for s in self.loop.spaces]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _writer(self, sid: SpaceId) -> None:
        i = 0
        while True:
            await asyncio.sleep(self.interval)
            rec = self.loop.spaces[sid]
            if rec.placement is None:
                continue
            node = self.loop.nodes[rec.placement.primary]
            payloads = [{"demo": i + k, "text": "an episode"} for k in range(self.batch)]
            t = time.monotonic()
            try:
                await self.loop.sidecars.append(node.http, sid, payloads, timeout=2.0)
                ok = True
            except SidecarError:
                ok = False
            if ok:
                i += self.batch
                self.acked += self.batch
                prev = self.last_ok.get(sid)
                if prev is not None:
                    self.max_gap = max(self.max_gap, t - prev)
                self.last_ok[sid] = time.monotonic()
            else:
                self.errors += 1


async def _wait_for(cond: Callable[[], bool], timeout: float, stop: asyncio.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if cond():
            return True
        await asyncio.sleep(0.1)
    return cond()


async def run_demo(
    loop: ControlLoop, procs: Processes, say: Callable[[str], None], stop: asyncio.Event
) -> int:
    def all_ready() -> bool:
        for sid, rec in loop.spaces.items():
            p = rec.placement
            v = loop.status.get(p.primary, {}).get("spaces", {}).get(sid) if p else None
            if v is None or v.get("write_lease") is not True:
                return False
        return True

    if not await _wait_for(all_ready, 20.0, stop):
        say("demo: the cluster did not become ready within 20 s; see the node logs")
        return 1
    work = Workload(loop)
    work.start()
    say("demo: writing to every space; live lag per replica:")
    for _ in range(4):
        await asyncio.sleep(1.0)
        say(table(loop))
    leaders: dict[NodeName, int] = {}
    for rec in loop.spaces.values():
        if rec.placement is not None:
            leaders[rec.placement.primary] = leaders.get(rec.placement.primary, 0) + 1
    victim = max(sorted(leaders), key=lambda n: leaders[n])
    say(f"demo: SIGKILL {victim}, primary of {leaders[victim]} space(s); writers keep going")
    killed_at = time.monotonic()
    procs.kill(victim)

    def failed_over() -> bool:
        return all(
            r.placement is not None and r.placement.primary != victim for r in loop.spaces.values()
        )

    ok = await _wait_for(failed_over, 15.0, stop)
    say(
        f"demo: every space has a primary again {time.monotonic() - killed_at:.1f} s after the kill"
        if ok
        else "demo: failover did not complete in 15 s"
    )
    await asyncio.sleep(2.0)
    say(table(loop))
    say(f"demo: restarting {victim}; it rejoins as a replica and catches up")
    procs.start(victim)
    restarted = time.monotonic()

    def caught_up() -> bool:
        for sid, rec in loop.spaces.items():
            p = rec.placement
            v = loop.status.get(p.primary, {}).get("spaces", {}).get(sid) if p else None
            r = (v or {}).get("replicas", {}).get(victim)
            if r is None or r["lag_entries"] > 100:
                return False
        return True

    for _ in range(12):
        if await _wait_for(caught_up, 2.0, stop):
            break
        say(table(loop))
    say(table(loop))
    if caught_up():
        say(f"demo: {victim} caught up {time.monotonic() - restarted:.1f} s after its restart")
    await work.stop()
    say(
        f"demo: {work.acked} entries acknowledged; longest write gap {work.max_gap:.2f} s; "
        f"{work.errors} refused or failed requests (retried)"
    )
    return 0 if ok else 1
