"""kube/ticker.py: after a node refresh, one pass wakes only the spaces whose tick is due, and
never a space whose last wake-up is still being served."""

from __future__ import annotations

from engram_operator.kube.cadence import Inputs, LastTick
from engram_operator.kube.ticker import Ticker

NODES = (("n0", "Alive", False),)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_ticker_wakes_due_spaces_once_and_counts_the_rest_skipped() -> None:
    clock, skipped = Clock(), []
    ticker = Ticker(on_skip=skipped.append, clock=clock)
    versions = {"a": "1", "b": "1"}
    slots = {
        s: ticker.add(s, lambda s=s: Inputs(version=versions[s], nodes=NODES, views=()))
        for s in versions
    }
    ticker.refreshed()  # never ticked: both due
    assert all(sl.event.is_set() and sl.busy for sl in slots.values())
    assert slots["a"].woken_inputs == Inputs(version="1", nodes=NODES, views=())
    ticker.refreshed()  # both still busy: not woken twice, not counted
    assert skipped == []
    for sl in slots.values():  # both ticked, steady
        sl.event.clear()
        sl.done(LastTick(inputs=sl.woken_inputs or sl.inputs(), at=clock.now, steady=True))
    clock.now += 0.25
    versions["b"] = "2"  # b's object changed
    ticker.refreshed()
    assert not slots["a"].event.is_set() and slots["b"].event.is_set()
    assert skipped == [1]
    # A late tick gives its turn back: still due at the next refresh.
    slots["b"].event.clear()
    slots["b"].done(None)
    ticker.refreshed()
    assert slots["b"].event.is_set()
    ticker.remove("a", slots["a"])
    assert list(ticker.slots) == ["b"]
