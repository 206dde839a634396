"""One ticker for every space daemon: after each node refresh it looks at every space in one
pass and wakes only the daemons whose tick is due (kube/cadence.py).

Waking a thousand daemons four times a second, each to find it has nothing to do, cost the
operator most of a core at 1,000 spaces; one loop over them costs a fraction of that. The daemons
stay (kopf starts and stops them with their objects and with peering), but each sleeps on its
own event until the ticker or its stop sets it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engram_operator.kube.cadence import Inputs, LastTick, tick_due


@dataclass(eq=False)
class Slot:
    """One space's place in the ticker: what its tick decides on, and its wake-up."""

    inputs: Callable[[], Inputs]
    event: asyncio.Event = field(default_factory=asyncio.Event)
    last: LastTick | None = None
    # Woken and not done yet (queued for a tick slot, or ticking): not looked at again.
    busy: bool = False
    woken_inputs: Inputs | None = None
    woken_at: float = 0.0

    def done(self, last: LastTick | None) -> None:
        """The daemon's tick ended (`last`), or it gave the turn back (None: still due)."""
        if last is not None:
            self.last = last
        self.busy = False


class Ticker:
    def __init__(
        self,
        *,
        on_skip: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots: dict[str, Slot] = {}
        self.on_skip = on_skip
        self.clock = clock

    def add(self, space: str, inputs: Callable[[], Inputs]) -> Slot:
        slot = Slot(inputs=inputs)
        self.slots[space] = slot
        return slot

    def remove(self, space: str, slot: Slot) -> None:
        if self.slots.get(space) is slot:
            del self.slots[space]

    def refreshed(self) -> None:
        """After a node refresh: wake the daemons whose tick is due."""
        at = self.clock()
        skipped = 0
        for slot in list(self.slots.values()):
            if slot.busy:
                continue
            inputs = slot.inputs()
            if tick_due(slot.last, inputs, at=at):
                slot.busy, slot.woken_inputs, slot.woken_at = True, inputs, at
                slot.event.set()
            else:
                skipped += 1
        if skipped:
            self.on_skip(skipped)
