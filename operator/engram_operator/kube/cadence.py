"""When a space's daemon ticks: after every node refresh while anything about it may change,
and only now and then once it is steady and nothing it decides on moved (pure).

A tick rebuilds the space's observation and runs the whole reconcile core. At 4 refreshes a
second that is cheap for tens of spaces and not for a thousand: the operator spent its CPU
ticking steady spaces to the same answer, and the ticks that had something to write (placements,
at start) timed out behind them. So a tick is skipped when all of these hold:

* the last tick ended steady (the core said "steady", nothing failed, nothing left to write);
* the object's resourceVersion is the one that tick saw (no spec change, no sidecar report);
* every node's verdict and draining flag are what they were (cluster-wide, so a node going
  Suspect or Dead, or fenced, wakes every space at once: a failover is never delayed by this);
* every node's view of this space is the one that tick saw (its heartbeat answer: roles,
  epochs, sequences, replica lag);
* and the last tick was less than `idle_every` seconds ago (a safety net: anything left out
  above still gets looked at within that bound).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from engram_contract.ids import NodeName

# A steady space whose inputs don't move is still ticked this often: a safety net for anything
# its tick reads that `Inputs` leaves out (none is known). At 1,000 spaces a 5 s net alone kept
# 200 ticks a second going.
IDLE_EVERY: Final = 30.0


@dataclass(frozen=True, slots=True)
class Inputs:
    """What one space's tick decides on, in a form cheap to build and compare each refresh."""

    version: str | None  # the MemorySpace's resourceVersion
    nodes: tuple[tuple[str, str, bool], ...]  # (node, verdict state, draining), all nodes
    views: tuple[tuple[str, Mapping[str, Any]], ...]  # (node, its view of this space)


@dataclass(frozen=True, slots=True)
class LastTick:
    inputs: Inputs
    at: float
    steady: bool


def tick_due(
    last: LastTick | None, now: Inputs, *, at: float, idle_every: float = IDLE_EVERY
) -> bool:
    """Must the space tick at this refresh? (See the module.)"""
    if last is None or not last.steady:
        return True
    if at - last.at >= idle_every:
        return True
    return last.inputs != now


def waited_too_long(
    *, woke_at: float, read_at_wake: float | None, read_now: float | None, now: float, stale: float
) -> bool:
    """Did a tick wait so long for its slot that the view it was woken for went stale?

    The node view is judged against the time of its last good read (stale past `stale`, and
    then every verdict is Unknown and the space holds). A tick queued behind hundreds of others
    can start past that bound although the reads are fine: it would then write a "holding"
    status, which wakes it again, and so on. Such a tick waits for the next refresh instead. A
    read that was already stale when the tick woke (the API is down) is not waiting: the tick
    runs and holds, as it must."""
    if read_at_wake is None or woke_at - read_at_wake > stale:
        return False
    newest = read_now if read_now is not None else read_at_wake
    return now - newest > stale


def space_views(
    status: Mapping[NodeName, Mapping[str, Any]], space: str
) -> tuple[tuple[str, Any], ...]:
    """Each node's view of `space` from its last heartbeat answer (`NodeMonitor.status`)."""
    out = []
    for node in sorted(status):
        view = (status[node].get("spaces") or {}).get(space)
        if view is not None:
            out.append((node, view))
    return tuple(out)
