"""Writes waiting for replica acks: ack policies `one` and `quorum` answer only once enough
replicas hold the write's last entry, or fail (`not_acknowledged`) when this node stops leading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from engram_sidecar.space.membership import NotWritable


@dataclass
class _Waiter:
    sequence: int
    needed: int
    future: asyncio.Future[None]


class AckWaiters:
    def __init__(self, holding: Callable[[int], int]) -> None:
        self._holding = holding  # how many replicas hold a sequence (acked it)
        self._waiters: list[_Waiter] = []

    async def wait(self, sequence: int, needed: int, timeout: float) -> bool:
        """Until `needed` replicas hold `sequence`: True, or False after `timeout` seconds.

        Raises NotWritable (`not_acknowledged`) if `fail` is called meanwhile.
        """
        if needed == 0 or self._holding(sequence) >= needed:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(sequence, needed, fut))
        try:
            async with asyncio.timeout(timeout):  # no Task per write, as wait_for would start
                await asyncio.shield(fut)
        except TimeoutError:
            return False
        finally:
            self._waiters = [w for w in self._waiters if w.future is not fut]
        return True

    def release(self) -> None:
        """A replica acked more: answer every write it completes."""
        for w in self._waiters:
            if not w.future.done() and self._holding(w.sequence) >= w.needed:
                w.future.set_result(None)

    def fail(self, reason: str) -> None:
        """This node stopped leading: no waiting write will be acknowledged."""
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(NotWritable(reason, code="not_acknowledged"))
