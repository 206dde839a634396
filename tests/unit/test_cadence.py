"""kube/cadence.py: a steady space is not ticked again until something it decides on changes
(or the idle bound passes); anything else ticks at every node refresh."""

from __future__ import annotations

from typing import Any

from engram_contract.ids import NodeName
from engram_operator.kube.cadence import Inputs, LastTick, space_views, tick_due

NODES = (("n0", "Alive", False), ("n1", "Alive", False), ("n2", "Alive", False))
VIEW = {"role": "primary", "epoch": 1, "last_sequence": 10}
BASE = Inputs(version="7", nodes=NODES, views=(("n0", VIEW),))


def test_a_steady_space_is_skipped_while_nothing_moves() -> None:
    last = LastTick(inputs=BASE, at=100.0, steady=True)
    same = Inputs(version="7", nodes=NODES, views=(("n0", dict(VIEW)),))  # equal, not identical
    assert not tick_due(last, same, at=100.25)
    assert not tick_due(last, same, at=129.9)
    assert tick_due(last, same, at=130.0)  # the idle bound


def test_any_change_ticks_at_once() -> None:
    last = LastTick(inputs=BASE, at=100.0, steady=True)
    dead = (("n0", "Suspect", False), *NODES[1:])
    drained = (("n0", "Alive", True), *NODES[1:])
    wrote = (("n0", {**VIEW, "last_sequence": 11}),)
    for changed in (
        Inputs(version="8", nodes=NODES, views=BASE.views),  # spec edit or member report
        Inputs(version="7", nodes=dead, views=BASE.views),  # a node stops renewing
        Inputs(version="7", nodes=drained, views=BASE.views),  # draining or fenced
        Inputs(version="7", nodes=NODES, views=wrote),  # a write
        Inputs(version="7", nodes=(*NODES, ("n3", "Alive", False)), views=BASE.views),
    ):
        assert tick_due(last, changed, at=100.25), changed


def test_a_space_that_is_not_steady_ticks_every_refresh() -> None:
    assert tick_due(None, BASE, at=0.0)
    assert tick_due(LastTick(inputs=BASE, at=100.0, steady=False), BASE, at=100.25)


def test_space_views_are_each_nodes_view_of_the_space() -> None:
    status: dict[NodeName, dict[str, Any]] = {
        NodeName("n1"): {"spaces": {"a": {"role": "replica"}, "b": {"role": "primary"}}},
        NodeName("n0"): {"spaces": {"a": {"role": "primary"}}},
        NodeName("n2"): {},
    }
    assert space_views(status, "a") == (("n0", {"role": "primary"}), ("n1", {"role": "replica"}))
    assert space_views(status, "c") == ()


def test_a_tick_that_waited_past_a_fresh_views_staleness_waits_for_the_next_refresh() -> None:
    from engram_operator.kube.cadence import waited_too_long

    # Woken 0.1 s after a good read, started 1.5 s later: late (the view went stale in line).
    assert waited_too_long(woke_at=10.1, read_at_wake=10.0, read_now=10.0, now=11.6, stale=1.0)
    # A newer read arrived while it waited: it runs on that one.
    assert not waited_too_long(woke_at=10.1, read_at_wake=10.0, read_now=11.3, now=11.6, stale=1.0)
    # Started in time.
    assert not waited_too_long(woke_at=10.1, read_at_wake=10.0, read_now=10.0, now=10.5, stale=1.0)
    # The reads were already failing when it woke (API down): it runs, and holds.
    assert not waited_too_long(woke_at=12.0, read_at_wake=10.0, read_now=10.0, now=13.0, stale=1.0)
    assert not waited_too_long(woke_at=1.0, read_at_wake=None, read_now=None, now=5.0, stale=1.0)
