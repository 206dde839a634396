"""Node.write acknowledges only what is still true when its waits end (issue 11, finding 4).

A write waits for its fsync and for replica acks; meanwhile the node may be demoted, fenced or
lose its lease. Each must turn the answer into "not acknowledged". The fsync is held open by an
injected hook, so the race is deterministic.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from engram_contract.assignment import Assignment, Member
from engram_contract.ids import NodeName
from engram_sidecar.config import SidecarConfig
from engram_sidecar.grants import Grant
from engram_sidecar.log.fsync_engine import ThreadFsyncer
from engram_sidecar.node import Node
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.membership import NotWritable


def _assignment(primary: str, replicas: list[str], epoch: int) -> Assignment:
    def m(n: str) -> Member:
        return Member(NodeName(n), f"127.0.0.1:{1000 + int(n[1])}", f"127.0.0.1:{2000 + int(n[1])}")

    return Assignment(epoch, m(primary), tuple(m(r) for r in replicas), "async")


async def _node(tmp_path: Path) -> tuple[Node, Space, threading.Event]:
    secret = tmp_path / "secret"
    secret.write_text("x" * 32)
    cfg = SidecarConfig(
        node="n0",
        data_dir=tmp_path / "data",
        fsync="always",
        replication_port=0,
        secret_file=secret,
    )
    node = Node(cfg)
    await node.start()
    _, sp = node.assign("space-s", _assignment("n0", [], 1), grant=Grant(source="cp", sent_ns=1))
    gate = threading.Event()
    real: Callable[[int], None] = os.fsync

    def slow_fsync(fd: int) -> None:
        gate.wait(5.0)
        real(fd)

    sp.writer.commit.engine = ThreadFsyncer(slow_fsync)
    return node, sp, gate


@pytest.mark.parametrize("change", ["demoted", "fenced", "lease lost"])
async def test_write_is_not_acknowledged_if_the_node_changed_during_its_fsync(
    tmp_path: Path, change: str
) -> None:
    node, sp, gate = await _node(tmp_path)
    try:
        assert sp.lease_valid()
        write = asyncio.create_task(node.write(sp, [(1, b"{}")]))
        await asyncio.sleep(0.05)  # the write is appended and waits for its fsync
        assert not write.done()
        if change == "demoted":
            node.assign("space-s", _assignment("n1", ["n0"], 2))
        elif change == "fenced":
            sp.note_epoch(2)
        else:
            sp.membership.lease_until = float("-inf")
        gate.set()
        with pytest.raises(NotWritable) as err:
            await asyncio.wait_for(write, 5.0)
        assert err.value.code == "not_acknowledged", err.value.reason
    finally:
        gate.set()
        await node.stop()


async def test_write_is_acknowledged_when_nothing_changed(tmp_path: Path) -> None:
    node, sp, gate = await _node(tmp_path)
    try:
        gate.set()
        first, last, epoch = await asyncio.wait_for(node.write(sp, [(1, b"{}")]), 5.0)
        assert (first, last, epoch) == (1, 1, 1)
    finally:
        await node.stop()
