"""Tail mode on one node: for each space, the tail of Engram's WAL while this node leads it, and
the Engram-format mirror while it is a replica (`engram_data_root`, docs/engram.md).

One task per space switches between the two as the space's role changes, so the two never write
at once. A space whose tail stopped on an error stays stopped (its view and metric say why) until
the sidecar restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from engram_contract.ids import SpaceId
from engram_sidecar.errors import EngramError
from engram_sidecar.metrics import Metrics
from engram_sidecar.space.hosted import Space
from engram_sidecar.tail.mirror import Mirror
from engram_sidecar.tail.tailer import SpaceTail, TailStopped, run_step
from engram_sidecar.tail.watch import Watch, WatchMode

log = logging.getLogger(__name__)

SCAN_EVERY: Final = 0.1  # seconds between looks for spaces newly hosted here
SAFETY_WAKE: Final = 1.0  # the longest a tail sleeps on inotify without a look of its own


class TailService:
    def __init__(
        self,
        *,
        root: Path,
        spaces: Callable[[], Iterable[Space]],
        metrics: Metrics,
        watch: WatchMode,
        poll_interval: float,
    ) -> None:
        self.root = root
        self.spaces = spaces
        self.metrics = metrics
        self.watch_mode: WatchMode = watch
        self.poll_interval = poll_interval
        self._agents: dict[SpaceId, _Agent] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start a task per hosted space. A space led here opens the Engram file its cursor
        names now, before the node serves `/readyz`: held open, the file stays readable to
        its end even if Engram, starting next to it, compacts and deletes it."""
        self._scan()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [a.task for a in self._agents.values() if a.task is not None]
        if self._task is not None:
            tasks.append(self._task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for a in self._agents.values():
            a.close()

    def tails(self, space: SpaceId) -> bool:
        """Whether this node feeds `space` from Engram's WAL (it leads it, in tail mode)."""
        a = self._agents.get(space)
        return a is not None and a.sp.role == "primary"

    def view(self, space: SpaceId) -> dict[str, Any]:
        a = self._agents.get(space)
        return a.view() if a is not None else {"mode": "starting"}

    def _scan(self) -> None:
        for sp in list(self.spaces()):
            if sp.id not in self._agents:
                agent = _Agent(sp, self)
                self._agents[sp.id] = agent
                if sp.role == "primary":
                    agent.open_tail()
                agent.task = asyncio.get_running_loop().create_task(agent.run())

    async def _run(self) -> None:
        while True:
            self._scan()
            await asyncio.sleep(SCAN_EVERY)


class _Agent:
    def __init__(self, sp: Space, svc: TailService) -> None:
        self.sp = sp
        self.svc = svc
        self.watch = Watch(
            svc.root / sp.id / "wal", mode=svc.watch_mode, poll_interval=svc.poll_interval
        )
        self.tail: SpaceTail | None = None
        self.mirror: Mirror | None = None
        self.task: asyncio.Task[None] | None = None

    def view(self) -> dict[str, Any]:
        if self.tail is not None:
            return {"mode": "tail", **self.tail.view()}
        if self.mirror is not None:
            return {"mode": "mirror", **self.mirror.view()}
        return {"mode": "idle", "watch": self.watch.mode}

    def close(self) -> None:
        if self.tail is not None:
            self.tail.close()
        self.watch.close()

    def open_tail(self) -> SpaceTail:
        if self.tail is None:
            self.tail = SpaceTail(
                self.sp, engram_root=self.svc.root, metrics=self.svc.metrics, watch=self.watch
            )
            self.svc.metrics.tail_stopped.labels(self.sp.id).set(0)
            try:
                self.tail.reconcile()
            except TailStopped as err:
                self.tail.stop(err)
            except (EngramError, OSError) as err:
                self.tail.cursor = None  # the first step tries again
                log.warning("space %s: tail: %s", self.sp.id, err)
        return self.tail

    async def run(self) -> None:
        while True:
            role = self.sp.role
            progressed = False
            if role == "primary":
                self.mirror = None
                self.tail = self.open_tail()
                progressed = await run_step(self.tail)
                if self.tail.state == "waiting":
                    await asyncio.sleep(self.svc.poll_interval)  # for a write lease
                elif not progressed:
                    await self.watch.wait(SAFETY_WAKE)
                continue
            if self.tail is not None:
                # Deposed or moved: a later lead starts from the cursor again (it may be cut),
                # and an error of this lead's tail is no longer one to act on here.
                self.tail.close()
                self.tail = None
                self.svc.metrics.tail_stopped.labels(self.sp.id).set(0)
            if role == "replica":
                if self.mirror is None:
                    self.mirror = Mirror(
                        self.sp, engram_root=self.svc.root, metrics=self.svc.metrics
                    )
                try:
                    progressed = await self.mirror.step()
                    self.mirror.error = None
                except (EngramError, OSError) as err:
                    self.mirror.error = str(err)
                    self.mirror.state = None
                    log.warning("space %s: Engram mirror: %s", self.sp.id, err)
            else:
                self.mirror = None
            if not progressed:
                await asyncio.sleep(self.svc.poll_interval)
