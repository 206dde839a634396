"""Failover through the local control plane: real sidecar processes, the real control loop.

The loop (`engram_operator.local.loop.ControlLoop`) runs in the test's event loop and ticks on a
bounded schedule; faults come from signals. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from tests.integration.cluster import free_port

from engram_contract.ids import NodeName, SpaceId
from engram_operator.local.loop import ControlLoop
from engram_operator.local.store import ClusterFiles
from engram_operator.local.supervisor import LocalNode, Processes
from engram_operator.model import SpaceSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Local:
    loop: ControlLoop
    procs: Processes
    sentences: list[str]

    async def ticks(self, n: int) -> None:
        for _ in range(n):
            self.loop.poll_requests()
            await self.loop.tick()
            await asyncio.sleep(0.05)

    async def until(self, cond: object, timeout: float) -> float:
        """Tick until `cond()` holds; returns the seconds it took. Fails after `timeout`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            await self.ticks(1)
            if cond():  # type: ignore[operator]
                return time.monotonic() - t0
        raise AssertionError(f"condition not met within {timeout} s; said: {self.sentences[-5:]}")


@pytest.fixture
async def local(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Local]:
    policy = getattr(request, "param", "quorum")
    files = ClusterFiles(tmp_path)
    token = files.ensure_secret()
    nodes = [
        LocalNode(NodeName(f"node-{i}"), free_port(), free_port(), tmp_path / f"node-{i}")
        for i in range(3)
    ]
    spaces = {SpaceId(s): SpaceSpec(replicas=2, ack_policy=policy) for s in ("orders", "notes")}
    procs = Processes(
        files,
        nodes,
        ["--lag-monitor-interval", "0.5", "--heartbeat-interval", "0.1", "--ack-timeout", "2"],
    )
    sentences: list[str] = []
    loop = ControlLoop(files=files, nodes=nodes, spaces=spaces, token=token, say=sentences.append)
    for n in nodes:
        procs.start(n.name)
    lc = Local(loop, procs, sentences)
    try:
        await lc.until(
            lambda: all(
                r.placement is not None
                and (loop.status.get(r.placement.primary, {}).get("spaces", {}).get(sid) or {}).get(
                    "write_lease"
                )
                is True
                for sid, r in loop.spaces.items()
            ),
            30.0,
        )
        yield lc
    finally:
        await loop.close()
        procs.stop_all()
        if any("Traceback" in (tmp_path / f"{n.name}.log").read_text() for n in nodes):
            for n in nodes:
                print((tmp_path / f"{n.name}.log").read_text()[-3000:])


async def _write(s: aiohttp.ClientSession, lc: Local, sid: str, i: int) -> int | None:
    rec = lc.loop.spaces[SpaceId(sid)]
    assert rec.placement is not None
    node = lc.loop.nodes[rec.placement.primary]
    body = {"entries": [{"type": "episode", "payload": {"i": i}}]}
    try:
        async with s.post(
            f"http://{node.http}/v1/spaces/{sid}/entries",
            json=body,
            timeout=aiohttp.ClientTimeout(total=3.0),
        ) as resp:
            if resp.status == 200:
                return int((await resp.json())["last_sequence"])
    except (aiohttp.ClientError, TimeoutError):
        pass
    return None


async def _entries(s: aiohttp.ClientSession, http: str, sid: str) -> dict[int, object]:
    out: dict[int, object] = {}
    start = 1
    for _ in range(100):
        async with s.get(f"http://{http}/v1/spaces/{sid}/entries?from={start}&limit=1000") as r:
            doc = await r.json()
        for e in doc["entries"]:
            out[e["sequence"]] = e["payload"]
        if not doc["entries"]:
            return out
        start = doc["entries"][-1]["sequence"] + 1
    return out


async def test_failover_sigkill_primary_promotes_and_keeps_every_quorum_ack(local: Local) -> None:
    lc = local
    rec = lc.loop.spaces[SpaceId("orders")]
    assert rec.placement is not None
    old = rec.placement.primary
    acked: dict[int, int] = {}  # sequence -> i
    stop = asyncio.Event()

    async def writer() -> None:
        async with aiohttp.ClientSession() as s:
            i = 0
            while not stop.is_set():
                seq = await _write(s, lc, "orders", i)
                if seq is not None:
                    acked[seq] = i
                i += 1
                await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    await lc.until(lambda: len(acked) > 50, 20.0)
    lc.procs.kill(old)
    killed = time.monotonic()
    await lc.until(lambda: rec.placement is not None and rec.placement.primary != old, 15.0)
    promoted_in = time.monotonic() - killed
    n_before = len(acked)
    await lc.until(lambda: len(acked) > n_before + 20, 15.0)
    stop.set()
    await asyncio.wait_for(task, 10.0)
    assert rec.placement is not None
    new = rec.placement.primary
    assert rec.placement.epoch == 2
    assert any(
        s.startswith(f"promoted {new} to primary of space orders at epoch 2 ({old} dead")
        for s in lc.sentences
    ), lc.sentences
    assert rec.decisions and rec.decisions[-1]["winner"] == new
    assert promoted_in < 5.0, f"promotion took {promoted_in:.1f} s (budget 5 s)"
    async with aiohttp.ClientSession() as s:
        have = await _entries(s, lc.loop.nodes[new].http, "orders")
    missing = [q for q, i in acked.items() if have.get(q) != {"i": i}]
    assert not missing, f"quorum-acknowledged entries lost or changed: {missing[:10]}"
    state = json.loads(lc.loop.files.state.read_text())
    assert state["spaces"]["orders"]["placement"]["primary"] == new


async def test_failover_sigstopped_primary_is_fenced_and_rejoins(local: Local) -> None:
    lc = local
    rec = lc.loop.spaces[SpaceId("notes")]
    assert rec.placement is not None
    old = rec.placement.primary
    old_node = lc.loop.nodes[old]
    async with aiohttp.ClientSession() as s:
        assert await _write(s, lc, "notes", 0) is not None
        lc.procs.kill(old, signal.SIGSTOP)
        await lc.until(lambda: rec.placement is not None and rec.placement.primary != old, 15.0)
        lc.procs.kill(old, signal.SIGCONT)
        # The deposed primary must refuse writes from the moment it runs again.
        body = {"entries": [{"payload": {"late": True}}]}
        async with s.post(
            f"http://{old_node.http}/v1/spaces/notes/entries",
            json=body,
            timeout=aiohttp.ClientTimeout(total=5.0),
        ) as resp:
            assert resp.status in (421, 503), await resp.text()
        for i in range(1, 20):
            await _write(s, lc, "notes", i)

        def rejoined() -> bool:
            v = lc.loop.status.get(old, {}).get("spaces", {}).get("notes") or {}
            return v.get("role") == "replica" and v.get("epoch") == rec.placement.epoch  # type: ignore[union-attr]

        await lc.until(rejoined, 20.0)
        assert rec.placement is not None
        new_http = lc.loop.nodes[rec.placement.primary].http
        want = await _entries(s, new_http, "notes")

        async def same() -> bool:
            return await _entries(s, old_node.http, "notes") == want

        for _ in range(100):
            if await same():
                break
            await lc.ticks(1)
        assert await same(), "the deposed primary did not converge on the new primary's log"


async def test_switchover_hands_over_with_zero_loss(local: Local) -> None:
    lc = local
    rec = lc.loop.spaces[SpaceId("orders")]
    assert rec.placement is not None
    target = rec.placement.replicas[0]
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            assert await _write(s, lc, "orders", i) is not None
        lc.loop.files.requests.mkdir(exist_ok=True)
        (lc.loop.files.requests / "switchover-orders.json").write_text(
            json.dumps({"space": "orders", "to": target})
        )
        await lc.until(lambda: rec.placement is not None and rec.placement.primary == target, 20.0)
        assert any(f"switched space orders over to {target}" in x for x in lc.sentences)
        have = await _entries(s, lc.loop.nodes[target].http, "orders")
        assert [have[q] for q in range(1, 31)] == [{"i": i} for i in range(30)]
        await lc.until(
            lambda: (
                (lc.loop.status.get(target, {}).get("spaces", {}).get("orders") or {}).get(
                    "write_lease"
                )
                is True
            ),
            10.0,
        )
        assert await _write(s, lc, "orders", 99) == 31
