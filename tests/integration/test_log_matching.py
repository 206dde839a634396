"""Log matching through real processes (issue 11, findings 1, 4 and 7).

The test plays the control plane (`Cluster.assign` grants write leases like the real one), and
builds the exact histories that broke the sequence-only replica: a deposed primary holding an
unreplicated epoch-1 tail is reached by the new primary's stream *before* it hears of its new
assignment, at the same sequences the new primary wrote at epoch 2.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from tests.faultproxy import FaultProxy
from tests.integration.cluster import HOST, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FLAGS = {
    "heartbeat_interval": "0.1",
    "ack_timeout": "1.5",
    "io_timeout": "1",
    "connect_timeout": "1",
    "backoff_steps": "0.05,0.1,0.2",
}


def _payloads(tag: str, n: int) -> list[dict[str, object]]:
    return [{"tag": tag, "i": i} for i in range(n)]


async def _divergent_tail(cluster: Cluster, space: str) -> tuple[FaultProxy, FaultProxy]:
    """n0 leads at epoch 1 and holds 50 entries everywhere plus 20 (51..70) nobody else has."""
    for n in ("n0", "n1", "n2"):
        cluster.add_node(n, **FLAGS)
    await cluster.start()
    p1 = FaultProxy(HOST, cluster["n1"].replication_port, seed=1)
    p2 = FaultProxy(HOST, cluster["n2"].replication_port, seed=2)
    await p1.start()
    await p2.start()
    addrs = {"n1": f"{HOST}:{p1.port}", "n2": f"{HOST}:{p2.port}"}
    await cluster.assign(space, "n0", ["n1", "n2"], addresses=addrs, ack_policy="async")
    r = await cluster.write_ndjson("n0", space, _payloads("common", 50))
    assert r.status == 200, r
    await cluster.wait_replicated(space, "n0", timeout=15)
    p1.blackhole(True)
    p2.blackhole(True)
    r = await cluster.write_ndjson("n0", space, _payloads("old-tail", 20))
    assert r.status == 200, r  # async: acknowledged by n0 alone, at epoch 1
    return p1, p2


async def test_deposed_primary_never_acks_the_new_primarys_entries_by_sequence(
    cluster: Cluster,
) -> None:
    space = "lm1"
    p1, p2 = await _divergent_tail(cluster, space)
    try:
        cluster["n0"].send(signal.SIGSTOP)
        # Promote n1 at epoch 2 under quorum; n0 (still stopped) doesn't hear of it yet.
        await cluster.assign(space, "n1", ["n2", "n0"], epoch=2, ack_policy="quorum", to=["n1"])
        cluster["n2"].send(signal.SIGSTOP)  # so only n0 could ack n1's writes
        cluster["n0"].send(signal.SIGCONT)
        r = await cluster.write_ndjson("n1", space, _payloads("new", 5))
        # n0 holds sequences 51..70 of epoch 1, not n1's 51..55 of epoch 2: it must not ack
        # them (before the fix it did, and the write was acknowledged on a divergent log).
        assert r.status == 503 and r.body["error"] == "not_acknowledged", r
        view = await cluster.space_view("n1", space)
        assert view["replicas"]["n0"]["acked_sequence"] <= 50, view
        n0 = await cluster.space_view("n0", space)
        assert n0["accepted_epoch"] == 2 and n0["fenced"], n0  # the stream's epoch fenced it

        # Now n0 learns its assignment: its tail is cut and n1's entries follow.
        await cluster.assign(space, "n1", ["n2", "n0"], epoch=2, ack_policy="quorum", to=["n0"])
        r = await cluster.write_ndjson("n1", space, _payloads("after", 5))
        assert r.status == 200, r
        cluster["n2"].send(signal.SIGCONT)
        await cluster.assign(space, "n1", ["n2", "n0"], epoch=2, ack_policy="quorum", to=["n2"])
        await cluster.wait_replicated(space, "n1", timeout=20)
    finally:
        for n in ("n0", "n2"):
            cluster[n].send(signal.SIGCONT)
        await p1.stop()
        await p2.stop()
    n0 = await cluster.space_view("n0", space)
    assert n0["dropped_entries"] == 20, n0
    cluster.assert_wal_identical(space, "n1", ["n0", "n2"])
    payloads = [e.payload for e in cluster["n0"].wal_entries(space)]
    assert not any(b"old-tail" in p for p in payloads)
    assert sum(b'"new"' in p for p in payloads) == 5  # written, not acknowledged, and kept


async def test_replica_accepts_frames_only_from_its_assignments_primary(cluster: Cluster) -> None:
    """A node that is not the assignment's primary (n2 here, with a stale view of its own) can't
    get entries into a replica's log, whatever epoch it claims as long as it is not newer."""
    space = "lm2"
    for n in ("n0", "n1", "n2"):
        cluster.add_node(n, **FLAGS)
    await cluster.start()
    await cluster.assign(space, "n0", ["n1"], ack_policy="async", to=["n0", "n1"])
    # n2 believes it leads the same space at the same epoch, with n1 as its replica.
    await cluster.assign(space, "n2", ["n1"], ack_policy="async", to=["n2"])
    r = await cluster.write_ndjson("n2", space, _payloads("impostor", 3))
    assert r.status == 200, r  # async: n2 acknowledges its own log; n1 must not take it
    r = await cluster.write_ndjson("n0", space, _payloads("real", 3))
    assert r.status == 200, r
    await cluster.wait_until(
        lambda: _replica_has(cluster, "n1", space, 3),
        timeout=10,
        what="n1 to hold n0's 3 entries",
    )
    await asyncio.sleep(0.5)  # n2's stream keeps trying meanwhile
    payloads = [e.payload for e in cluster["n1"].wal_entries(space)]
    assert len(payloads) == 3 and all(b"real" in p for p in payloads), payloads
    assert "is not the primary at epoch 1" in cluster["n2"].log_text()


async def _replica_has(cluster: Cluster, node: str, space: str, n: int) -> bool:
    view = await cluster.space_view(node, space)
    return int(view["applied_sequence"]) >= n


async def test_replica_with_an_unwritten_epoch_follows_a_newer_primary(cluster: Cluster) -> None:
    """Finding 7: n0 is promoted at epoch 2 and deposed before its first write; its history
    says epoch 2 begins at 11. The primary of epoch 3 ships epoch-1 entries 11..15 that n0 lacks;
    n0 must take them (it used to refuse them forever: "epoch 1 after epoch 2")."""
    space = "lm3"
    for n in ("n0", "n1", "n2"):
        cluster.add_node(n, **FLAGS)
    await cluster.start()
    p0 = FaultProxy(HOST, cluster["n0"].replication_port, seed=3)
    await p0.start()
    try:
        await cluster.assign(
            space, "n1", ["n0", "n2"], addresses={"n0": f"{HOST}:{p0.port}"}, ack_policy="async"
        )
        assert (await cluster.write_ndjson("n1", space, _payloads("a", 10))).status == 200
        await cluster.wait_replicated(space, "n1", timeout=15)
        p0.blackhole(True)
        assert (await cluster.write_ndjson("n1", space, _payloads("b", 5))).status == 200
        # n0 (10 entries) is promoted at epoch 2, then deposed before writing anything.
        await cluster.assign(space, "n0", ["n2"], epoch=2, ack_policy="async", to=["n0"])
        await cluster.assign(space, "n1", ["n0", "n2"], epoch=3, ack_policy="async")
        p0.blackhole(False)
        await p0.cut()
        await cluster.wait_replicated(space, "n1", timeout=20)
    finally:
        await p0.stop()
    cluster.assert_wal_identical(space, "n1", ["n0", "n2"])


async def test_primary_cut_off_from_the_control_plane_stops_acking_quorum_writes(
    cluster: Cluster,
) -> None:
    """Finding 2: n0 still reaches n1 (whose acks used to renew its write lease) but not the
    control plane nor n2. Within its lease it may ack; after it, never, whatever n1 says."""
    space = "lm4"
    for n in ("n0", "n1", "n2"):
        cluster.add_node(n, **FLAGS)
    await cluster.start()
    async with FaultProxy(HOST, cluster["n2"].replication_port, seed=4) as p2:
        await cluster.assign(
            space, "n0", ["n1", "n2"], addresses={"n2": f"{HOST}:{p2.port}"}, ack_policy="quorum"
        )
        assert (await cluster.write_ndjson("n0", space, _payloads("before", 5))).status == 200
        p2.blackhole(True)
        cluster.lease_paused.add("n0")
        cut_at = asyncio.get_running_loop().time()
        acked_late = []
        loop = asyncio.get_running_loop()
        while loop.time() - cut_at < 4.0:
            r = await cluster.write_ndjson("n0", space, _payloads("during", 1), timeout=5)
            # 1.5 s write lease from the last grant (sent at most 0.2 s before the cut).
            if r.status == 200 and loop.time() - cut_at > 1.5 + 0.25:
                acked_late.append((round(loop.time() - cut_at, 2), r.body))
            await asyncio.sleep(0.05)
        assert not acked_late, acked_late
        r = await cluster.write_ndjson("n0", space, _payloads("after", 1))
        assert r.status == 503 and "no write lease" in r.body["message"], r
