"""The event-loop lag probe (engram_sidecar.looplag) on virtual time, its metric on a real Node,
and the startup heap frozen out of full collections (engram_sidecar.heap)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from prometheus_client import CollectorRegistry

from engram_sidecar import heap
from engram_sidecar.config import SidecarConfig
from engram_sidecar.looplag import LoopLagProbe
from engram_sidecar.node import Node


async def test_the_probe_observes_how_much_later_than_asked_the_loop_woke() -> None:
    now = [10.0]
    stalls = iter([0.0, 0.25, 1.5])
    seen: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds + next(stalls)  # the loop woke this much late

    probe = LoopLagProbe(seen.append, interval=0.1, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        await probe.sample()
    assert [round(x, 9) for x in seen] == [0.0, 0.25, 1.5]


async def test_a_node_exports_its_loop_lag_while_it_runs(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x" * 32)
    reg = CollectorRegistry()
    node = Node(
        SidecarConfig(node="n0", data_dir=tmp_path / "d", replication_port=0, secret_file=secret),
        registry=reg,
    )
    node.loop_lag.interval = 0.001
    exported = node.loop_lag.observe
    three = asyncio.Event()
    count = 0

    def observe(lag: float) -> None:
        nonlocal count
        exported(lag)
        count += 1
        if count >= 3:
            three.set()

    node.loop_lag.observe = observe
    await node.start()
    try:
        await asyncio.wait_for(three.wait(), 10)  # the node's own probe task, every 1 ms here
        name = "engram_replication_event_loop_lag_seconds_count"
        assert (reg.get_sample_value(name) or 0) >= 3
    finally:
        await node.stop()
    assert node.loop_lag._task is None


def test_freezing_the_startup_heap_keeps_it_out_of_later_collections() -> None:
    try:
        frozen = heap.freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 1000
        before = len(gc.get_objects(generation=2))
        gc.collect()
        assert len(gc.get_objects(generation=2)) < frozen, (before, frozen)
    finally:
        gc.unfreeze()
