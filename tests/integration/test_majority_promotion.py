"""Promotion that a minority can't undo (issue 11, items 2 and 3), with the real control loop.

A failover is a fence round then an election among the members that answered (design §4;
`reconcile.FenceAndElect`). Under `ackPolicy: quorum`, nobody is promoted unless a majority of the
members took the new epoch, and the winner is the best of them by (epoch of its last entry,
sequence). The control loop also waits out the old primary's write lease (granted by the control
plane only, measured from when it arrives) before anyone else leads.

Every node's replication listener sits behind a FaultProxy (test_partition.LocalHarness), and so
does its HTTP API *as the control loop sees it*: blackholing that proxy cuts the control plane
off from the node while the test, and the other nodes, still reach it directly.

- The control plane reaches only one of three members: no promotion, the tick's sentence says
  why ("only 1 of 3 members reachable; quorum needs 2"), the old primary stops acknowledging once
  its lease runs out, and when the links heal it leads again at the recorded epoch with nothing
  lost.
- The primary is cut off from the control plane and from one replica but still reaches the
  other, whose acks let it acknowledge `quorum` writes until its lease runs out. The promotion
  waits that out, fences the two replicas, and elects the one holding those writes: every write
  ever acknowledged survives, and no two nodes accept writes in the same probe round.
- Two of three nodes are SIGSTOPped, the primary among them: no promotion while only one
  answers; one resumes, and a majority promotes the better of the two; the old primary, resumed
  last, acknowledges nothing and rejoins as a replica.

These need the sidecar side of issue 11 (fence on any member answering `last_epoch`, write leases
only from the control plane). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.faultproxy import FaultProxy
from tests.integration.cluster import HOST, free_port
from tests.integration.test_partition import (
    REQUEST_TIMEOUT,
    Answer,
    LocalHarness,
    ProxiedNode,
    accepted,
)

from engram_contract.ids import NodeName, SpaceId
from engram_operator.local.loop import ControlLoop
from engram_operator.local.store import ClusterFiles
from engram_operator.local.supervisor import Processes
from engram_operator.model import SpaceSpec
from engram_operator.reconcile import DEFAULT_SETTINGS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SPACE = "orders"
QUORUM = {SPACE: SpaceSpec(replicas=2, ack_policy="quorum")}
LEASE_WAIT = DEFAULT_SETTINGS.lease_wait


@dataclass
class CutNode(ProxiedNode):
    """A node whose HTTP API the control loop reaches through a proxy (`control_http`)."""

    control_http: str = ""

    @property
    def http(self) -> str:
        return self.control_http or f"{HOST}:{self.http_port}"


@dataclass
class CutHarness(LocalHarness):
    """LocalHarness, plus a proxy between the control loop and each node's HTTP API."""

    cp_proxies: dict[str, FaultProxy] = field(default_factory=dict)

    async def start(self, count: int = 3) -> None:
        files = ClusterFiles(self.root)
        token = files.ensure_secret()
        nodes = [
            CutNode(NodeName(f"node-{i}"), free_port(), free_port(), self.root / f"node-{i}")
            for i in range(count)
        ]
        self.nodes = list(nodes)
        for i, n in enumerate(nodes):
            proxy = FaultProxy(HOST, n.replication_port, seed=i)
            await proxy.start()
            self.proxies[n.name] = proxy
            n.advertised = f"{HOST}:{proxy.port}"
            cp = FaultProxy(HOST, n.http_port, seed=100 + i, framed=False)
            await cp.start()
            self.cp_proxies[n.name] = cp
            n.control_http = f"{HOST}:{cp.port}"
        self.procs = Processes(files, list(nodes), list(self.flags))
        self.loop = ControlLoop(
            files=files,
            nodes=list(nodes),
            spaces={SpaceId(s): spec for s, spec in self.spaces.items()},
            token=token,
            say=self.sentences.append,
        )
        self.session = aiohttp.ClientSession()
        for n in nodes:
            self.procs.start(n.name)
        await self.until(self.steady, 30.0, "every space placed, leased and streaming")

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            for p in self.cp_proxies.values():
                await p.stop()

    def http(self, node: str) -> str:
        """The test talks to nodes directly, never through the control loop's proxies."""
        n = self.lp.nodes[NodeName(node)]
        return f"{HOST}:{n.http_port}"

    def cut_control(self, node: str, on: bool = True) -> None:
        self.cp_proxies[node].blackhole(on)

    def sentence(self) -> str:
        return self.lp.spaces[SpaceId(SPACE)].last_sentence


@pytest.fixture
async def make_cut(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[CutHarness]]]:
    made: list[CutHarness] = []

    async def make(**kw: Any) -> CutHarness:
        h = CutHarness(root=tmp_path / f"cluster-{len(made)}", **kw)
        made.append(h)
        await h.start()
        return h

    try:
        yield make
    finally:
        for h in made:
            try:
                await h.close()
            finally:
                h.kill_all()


@dataclass
class Acked:
    """Every write acknowledged, by (epoch, sequence), with its payload."""

    entries: dict[tuple[int, int], Any] = field(default_factory=dict)
    by_node: dict[str, int] = field(default_factory=dict)

    def note(self, node: str, answer: Answer, payloads: list[Any]) -> None:
        if not answer.ok:
            return
        body = answer.body
        first, last, epoch = body["first_sequence"], body["last_sequence"], body["epoch"]
        for seq, p in zip(range(first, last + 1), payloads, strict=True):
            self.entries[(epoch, seq)] = p
        self.by_node[node] = self.by_node.get(node, 0) + len(payloads)


async def converged(h: LocalHarness) -> dict[int, tuple[int, Any]]:
    """Wait until every member holds the primary's log; returns it (sequence -> entry)."""
    await h.until(lambda: h.caught_up(SPACE), 30.0, "every member caught up")
    p = h.placement(SPACE)
    want = await h.entries(p.primary, SPACE)
    for m in p.replicas:
        assert await h.entries(m, SPACE) == want, f"{m} differs from the primary {p.primary}"
    return want


def assert_all_survive(acked: Acked, log: dict[int, tuple[int, Any]]) -> None:
    missing = {k: v for k, v in acked.entries.items() if log.get(k[1]) != (k[0], v)}
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {list(missing)[:5]}"


# ---- tests ------------------------------------------------------------------------------------


async def test_quorum_control_plane_reaching_one_member_promotes_nobody(
    make_cut: Callable[..., Awaitable[CutHarness]],
) -> None:
    h = await make_cut(spaces=QUORUM)
    before = h.placement(SPACE)
    old, cut_replica = before.primary, before.replicas[0]
    acked = Acked()
    for i in range(10):
        payload = [{"i": i}]
        acked.note(old, await h.write(old, SPACE, payload), payload)
    assert len(acked.entries) == 10
    await h.until(lambda: h.caught_up(SPACE), 15.0, "replicas caught up")

    # The control plane loses the primary and one replica; they still reach each other.
    h.cut_control(old)
    h.cut_control(cut_replica)
    cut_at = time.monotonic()
    refused_after_lease = False
    n = 0
    while time.monotonic() - cut_at < 3 * LEASE_WAIT + 2.0:
        await h.tick()
        assert h.placement(SPACE).primary == old, f"promoted by a minority: {h.sentences[-5:]}"
        got = await h.probe(SPACE, f"m{n}", timeout=1.0)
        assert set(accepted(got)) <= {old}, f"round {n}: a non-primary accepted a write: {got}"
        for node, a in got.items():
            acked.note(node, a, [{"probe": f"m{n}", "node": node}])
        if time.monotonic() - cut_at > LEASE_WAIT + 0.5:
            # No grant reached it for longer than its write lease: it must have stopped.
            refused_after_lease = refused_after_lease or not got[old].ok
            assert not got[old].ok, f"round {n}: {old} still acknowledges: {got[old]}"
        n += 1
        await asyncio.sleep(0.05)
    assert refused_after_lease
    assert "only 1 of 3 members reachable; quorum needs 2" in h.sentence(), h.sentence()
    assert not [s for s in h.sentences if s.startswith("promoted")], h.sentences
    pending = h.lp.spaces[SpaceId(SPACE)].pending_epoch
    assert pending is not None and pending > before.epoch
    record = h.decisions(SPACE)[-1]
    assert record["winner"] is None and record["newEpoch"] == pending, record

    # Healed: the primary leads again, at the epoch the fenced replica took (nobody was ever
    # assigned at it), and every acknowledged write is still there.
    h.cut_control(old, False)
    h.cut_control(cut_replica, False)

    def leads_again() -> bool:
        # At the new epoch and unfenced: a grant at the old epoch can arrive first, and the
        # replica that took the new epoch then fences it until the new assignment lands.
        v = h.view(old, SPACE)
        return (
            v.get("role") == "primary"
            and v.get("write_lease") is True
            and v.get("epoch") == pending
            and not v.get("fenced")
        )

    await h.until(leads_again, 20.0, f"{old} leading again")
    assert h.placement(SPACE).primary == old
    assert h.placement(SPACE).epoch == pending
    after = [{"after": True}]
    assert (await h.write(old, SPACE, after)).ok
    assert_all_survive(acked, await converged(h))


async def test_quorum_writes_acknowledged_through_one_replica_survive_the_promotion(
    make_cut: Callable[..., Awaitable[CutHarness]],
) -> None:
    h = await make_cut(spaces=QUORUM)
    before = h.placement(SPACE)
    old = before.primary
    near, far = before.replicas  # the primary keeps reaching `near`, loses `far`
    await h.until(lambda: h.caught_up(SPACE), 15.0, "replicas caught up")

    acked = Acked()
    stop = asyncio.Event()

    async def writer() -> None:
        b = 0
        while not stop.is_set():
            node = h.placement(SPACE).primary
            payload = [{"w": b}]
            acked.note(node, await h.write(node, SPACE, payload, timeout=2.0), payload)
            b += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.5)
    # far's listener is cut: the primary's stream to it (and far's acks) stop; near still acks.
    h.proxies[far].blackhole(True)
    h.cut_control(old)
    cut_at = time.monotonic()
    overlap: list[tuple[int, list[str]]] = []
    n = 0
    while h.placement(SPACE).primary == old:
        assert time.monotonic() - cut_at < 20.0, f"no promotion; said {h.sentences[-5:]}"
        await h.tick()
        got = await h.probe(SPACE, f"q{n}", timeout=1.0)
        if len(accepted(got)) > 1:
            overlap.append((n, accepted(got)))
        for node, a in got.items():
            acked.note(node, a, [{"probe": f"q{n}", "node": node}])
        n += 1
        await asyncio.sleep(0.05)
    promoted_at = time.monotonic()
    new = h.placement(SPACE).primary
    # The lease was waited out: nobody led within the write lease of the last grant.
    assert promoted_at - cut_at >= DEFAULT_SETTINGS.write_lease, promoted_at - cut_at
    record = h.decisions(SPACE)[-1]
    assert record["winner"] == new and record["fence"]["answered"] >= 2, record
    assert new == near, f"{new} won, but {near} holds the writes {old} acknowledged: {record}"
    old_acks = acked.by_node.get(old, 0)
    assert old_acks > 0, "the primary acknowledged nothing before the cut"

    # The new primary needs a replica's ack (quorum): let `far` hear it again. The old primary
    # stays cut off from the control plane, and still reaches the new primary and `near`.
    h.proxies[far].clear()
    for k in range(5):
        got = await h.probe(SPACE, f"after{k}", timeout=REQUEST_TIMEOUT)
        if len(accepted(got)) > 1:
            overlap.append((1000 + k, accepted(got)))
        assert old not in accepted(got), f"the deposed primary accepted a write: {got}"
        for node, a in got.items():
            acked.note(node, a, [{"probe": f"after{k}", "node": node}])
        await h.tick()
    stop.set()
    await asyncio.wait_for(task, 10.0)
    assert not overlap, f"rounds where two nodes accepted writes: {overlap}"
    assert acked.by_node.get(new, 0) > 0, "the new primary acknowledged nothing"

    h.cut_control(old, False)

    def rejoined() -> bool:
        return h.view(old, SPACE).get("role") == "replica"

    await h.until(rejoined, 20.0, f"{old} rejoining as a replica")
    assert_all_survive(acked, await converged(h))


async def test_quorum_two_stopped_nodes_block_promotion_until_one_returns(
    make_cut: Callable[..., Awaitable[CutHarness]],
) -> None:
    h = await make_cut(spaces=QUORUM)
    before = h.placement(SPACE)
    old, back, alive = before.primary, before.replicas[0], before.replicas[1]
    acked = Acked()
    for i in range(10):
        payload = [{"i": i}]
        acked.note(old, await h.write(old, SPACE, payload), payload)
    await h.until(lambda: h.caught_up(SPACE), 15.0, "replicas caught up")

    h.pr.kill(old, signal.SIGSTOP)
    h.pr.kill(back, signal.SIGSTOP)
    stale = asyncio.create_task(h.write(old, SPACE, [{"sent-while-stopped": True}], timeout=60.0))
    stopped_at = time.monotonic()
    while "quorum needs 2" not in h.sentence():
        assert time.monotonic() - stopped_at < 20.0, f"no quorum refusal: {h.sentences[-5:]}"
        await h.tick()
        assert h.placement(SPACE).primary == old, f"promoted by a minority: {h.sentences[-5:]}"
        assert not accepted(await h.probe(SPACE, "s", timeout=0.3, nodes=[alive]))
    for _ in range(4):  # and it stays that way
        await h.tick()
        assert h.placement(SPACE).primary == old

    h.pr.kill(back, signal.SIGCONT)
    await h.until(lambda: h.placement(SPACE).primary != old, 20.0, "a majority's promotion")
    new = h.placement(SPACE).primary
    assert new in (back, alive)
    record = h.decisions(SPACE)[-1]
    assert record["winner"] == new and record["fence"]["answered"] == 2, record

    h.pr.kill(old, signal.SIGCONT)
    late = await stale
    assert not late.ok, f"the deposed primary acknowledged a write after resuming: {late}"
    for k in range(6):
        got = await h.probe(SPACE, f"r{k}", timeout=REQUEST_TIMEOUT)
        assert old not in accepted(got), f"round {k}: the deposed primary accepted: {got}"
        assert len(accepted(got)) <= 1, got
        for node, a in got.items():
            acked.note(node, a, [{"probe": f"r{k}", "node": node}])
        await h.tick()

    def rejoined() -> bool:
        return h.view(old, SPACE).get("role") == "replica"

    await h.until(rejoined, 20.0, f"{old} rejoining as a replica")
    assert_all_survive(acked, await converged(h))
