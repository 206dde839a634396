"""How late the event loop runs a timer: the loop-stall probe behind
`engram_replication_event_loop_lag_seconds` (docs/metrics.md).

Everything the sidecar does shares one event loop: HTTP writes, replication frames, and the
control traffic that keeps write leases alive (`POST /v1/lease`, the Kubernetes agent's Lease
renewals). A callback that holds the loop for 200 ms delays all of them by 200 ms, and a lease
renewal delayed past the lease lapses it (503 `no write lease`). The probe asks to wake every
`interval` seconds and records how much later than asked it ran: on an idle loop that is the
timer's resolution, under a stall it is the stall.

Clock and sleep are injected, so the arithmetic is testable without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Final

# Ten samples a second: a stall of 100 ms or more is always seen, and the probe costs one timer
# callback per 100 ms.
INTERVAL: Final = 0.1


class LoopLagProbe:
    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.observe = observe
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sample(self) -> float:
        """Sleep one interval; observe and return how much later than asked the loop woke."""
        asked = self.clock() + self.interval
        await self.sleep(self.interval)
        lag = max(0.0, self.clock() - asked)
        self.observe(lag)
        return lag

    async def run(self) -> None:
        while True:
            await self.sample()
