"""Network faults between a primary and a replica (FaultProxy), and peers without the secret.

Layout of the proxy tests: n0 leads, n1 is reached only through a FaultProxy (the assignment's
address for n1 is the proxy's port) and n2 directly, so the primary keeps its write lease through
n2 while n1's link suffers. Faults go on, writes keep being acknowledged, the faults are cleared,
and n1 must end byte-identical to the primary with nothing lost and nothing doubled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from tests.faultproxy import FaultProxy
from tests.integration.cluster import (
    HOST,
    Cluster,
    WriteLog,
    check_payloads,
    payloads,
    write_batches,
    write_secret,
)

pytestmark = pytest.mark.integration

# Faster failure detection on the primary: a dropped frame stalls a stream until the read timeout.
PRIMARY_FLAGS: dict[str, object] = {"io_timeout": 1.0, "connect_timeout": 1.0}
CHECKSUM = "engram_replication_checksum_failures_total"


@dataclass(frozen=True)
class Fault:
    name: str
    apply: Callable[[FaultProxy], None]
    evidence: Callable[[Cluster, FaultProxy], Awaitable[bool]]
    recycles: bool  # the fault must force at least one reconnect


async def _replica_counted_corruption(c: Cluster, p: FaultProxy) -> bool:
    return p.stats["corrupted"] > 0 and await c.metric("n1", CHECKSUM) > 0


async def _primary_counted_corruption(c: Cluster, p: FaultProxy) -> bool:
    return p.stats["corrupted"] > 0 and await c.metric("n0", CHECKSUM, peer="n1") > 0


async def _stat(key: str, p: FaultProxy) -> bool:
    return p.stats[key] > 0


async def _gap_nacked(c: Cluster, p: FaultProxy) -> bool:
    nacks = await c.metric("n1", "engram_replication_nacks_total", direction="out", reason="GAP")
    return p.stats["reordered"] > 0 and nacks > 0


FAULTS = [
    Fault(
        "corrupt-up",
        lambda p: p.set_corrupt(0.05, "up"),
        _replica_counted_corruption,
        recycles=True,
    ),
    Fault(
        "corrupt-down",
        lambda p: p.set_corrupt(0.1, "down"),
        _primary_counted_corruption,
        recycles=True,
    ),
    Fault(
        "truncate",
        lambda p: p.set_truncate(0.05, "up"),
        lambda c, p: _stat("truncated", p),
        recycles=True,
    ),
    Fault(
        "duplicate",
        lambda p: p.set_duplicate(0.3, "both"),
        lambda c, p: _stat("duplicated", p),
        recycles=False,
    ),
    Fault(
        "reorder",
        lambda p: p.set_reorder(0.3, "up", max_hold=0.05),
        _gap_nacked,
        recycles=False,
    ),
    Fault(
        "drop",
        lambda p: p.set_drop(0.05, "both"),
        lambda c, p: _stat("dropped", p),
        recycles=False,  # a later batch's GAP NACK, or the read timeout, recovers it
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault_between_primary_and_replica_detected_and_healed(
    cluster: Cluster, fault: Fault
) -> None:
    cluster.add_node("n0", **PRIMARY_FLAGS)
    cluster.add_node("n1")
    cluster.add_node("n2")
    await cluster.start()
    space = "mike"
    async with FaultProxy(HOST, cluster["n1"].replication_port, seed=7) as proxy:
        await cluster.assign(space, "n0", ["n1", "n2"], addresses={"n1": f"{HOST}:{proxy.port}"})
        log = WriteLog()
        # Clean first: the path through the proxy works.
        await write_batches(cluster, "n0", space, [payloads(space, b, 100) for b in range(3)], log)
        await cluster.wait_replicated(space, "n0", timeout=15)

        fault.apply(proxy)
        for b in range(3, 43):
            await write_batches(cluster, "n0", space, [payloads(space, b, 100)], log)
            await asyncio.sleep(0.02)
        await cluster.wait_until(
            lambda: fault.evidence(cluster, proxy),
            timeout=20,
            what=f"evidence of {fault.name} (proxy stats {proxy.stats})",
            interval=0.1,
        )
        if fault.recycles:
            assert proxy.stats["connections"] >= 2, f"connection not recycled: {proxy.stats}"

        proxy.clear()
        # Writes after the faults are cleared flow normally too.
        for b in range(43, 46):
            await write_batches(cluster, "n0", space, [payloads(space, b, 100)], log)
        view = await cluster.wait_replicated(space, "n0", timeout=30)

    assert not log.refused, [str(r) for r in log.refused[:3]]
    last = 46 * 100
    log.check_tiles(last)
    assert view["last_sequence"] == last
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    cluster.assert_wal_valid("n1", space, last)
    check_payloads(cluster, "n1", space, log)
    if fault.name == "corrupt-up":
        assert "recycling the connection" in cluster["n1"].log_text()
    print(f"{fault.name}: proxy stats {proxy.stats}")


@pytest.mark.timeout(60)
async def test_corruption_with_compression_detected_and_healed(cluster: Cluster) -> None:
    """Same as corrupt-up, with zstd-compressed batches (the CRC covers the body as sent)."""
    cluster.add_node("n0", **PRIMARY_FLAGS)
    cluster.add_node("n1")
    cluster.add_node("n2")
    await cluster.start()
    space = "november"
    async with FaultProxy(HOST, cluster["n1"].replication_port, seed=11) as proxy:
        await cluster.assign(
            space,
            "n0",
            ["n1", "n2"],
            compression=True,
            addresses={"n1": f"{HOST}:{proxy.port}"},
        )
        log = WriteLog()
        proxy.set_corrupt(0.1, "up")
        for b in range(30):
            await write_batches(cluster, "n0", space, [payloads(space, b, 100, pad=200)], log)
            await asyncio.sleep(0.02)
        await cluster.wait_until(
            lambda: _replica_counted_corruption(cluster, proxy),
            timeout=20,
            what=f"a counted checksum failure (proxy stats {proxy.stats})",
        )
        proxy.clear()
        await cluster.wait_replicated(space, "n0", timeout=30)
    assert not log.refused, [str(r) for r in log.refused[:3]]
    log.check_tiles(3000)
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    check_payloads(cluster, "n1", space, log)


@pytest.mark.timeout(60)
async def test_blackhole_then_heal(cluster: Cluster) -> None:
    """A partition that keeps the sockets open: the primary's read timeout recycles the link."""
    cluster.add_node("n0", **PRIMARY_FLAGS)
    cluster.add_node("n1")
    cluster.add_node("n2")
    await cluster.start()
    space = "papa"
    async with FaultProxy(HOST, cluster["n1"].replication_port, seed=3) as proxy:
        await cluster.assign(space, "n0", ["n1", "n2"], addresses={"n1": f"{HOST}:{proxy.port}"})
        log = WriteLog()
        await write_batches(cluster, "n0", space, [payloads(space, 0, 100)], log)
        await cluster.wait_replicated(space, "n0", timeout=15)
        proxy.blackhole(True)
        for b in range(1, 21):
            await write_batches(cluster, "n0", space, [payloads(space, b, 100)], log)
            await asyncio.sleep(0.05)
        view = await cluster.space_view("n0", space)
        assert view["replicas"]["n1"]["acked_sequence"] < view["last_sequence"]

        async def reconnected() -> bool:
            return proxy.stats["connections"] >= 2

        await cluster.wait_until(reconnected, timeout=15, what="the link to be recycled")
        proxy.clear()
        await cluster.wait_replicated(space, "n0", timeout=30)
    assert not log.refused
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    cluster.assert_wal_valid("n1", space, 2100)


@pytest.mark.timeout(60)
async def test_new_replica_address_retires_the_old_link(cluster: Cluster) -> None:
    """Re-assigning a replica to another address (same epoch) moves its stream: the old link
    stops for good (no redials through the old path), the new one resumes from the acks."""
    await cluster.start_nodes(3)
    space = "yankee"
    async with FaultProxy(HOST, cluster["n1"].replication_port, seed=5) as proxy:
        await cluster.assign(space, "n0", ["n1", "n2"], addresses={"n1": f"{HOST}:{proxy.port}"})
        log = WriteLog()
        await write_batches(cluster, "n0", space, [payloads(space, b, 100) for b in range(3)], log)
        await cluster.wait_replicated(space, "n0", timeout=15)
        assert proxy.active_connections == 1
        proxy.refuse(True)  # an old link that kept redialling would show up as refusals
        await cluster.assign(space, "n0", ["n1", "n2"])  # n1 directly now

        async def old_link_gone() -> bool:
            return proxy.active_connections == 0

        await cluster.wait_until(old_link_gone, timeout=10, what="the old link to close")
        more = [payloads(space, b, 100) for b in range(3, 6)]
        await write_batches(cluster, "n0", space, more, log)
        await cluster.wait_replicated(space, "n0", timeout=15)
        await asyncio.sleep(1.0)  # several backoff periods of the fast test settings
        assert proxy.stats["refused"] == 0 and proxy.stats["connections"] == 1, proxy.stats
    assert not log.refused
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    cluster.assert_wal_valid("n1", space, 600)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_every_fault_at_once_over_seeds(cluster: Cluster, seed: int) -> None:
    """Corrupt, drop, duplicate, reorder and truncate together, both ways, with compression on
    for odd seeds; then clear and converge. Repeats the proxy tests over several fault patterns."""
    cluster.add_node("n0", **PRIMARY_FLAGS, segment_bytes=256 * 1024)
    cluster.add_node("n1", segment_bytes=256 * 1024)
    cluster.add_node("n2", segment_bytes=256 * 1024)
    await cluster.start()
    space = f"mix-{seed}"
    async with FaultProxy(HOST, cluster["n1"].replication_port, seed=seed) as proxy:
        await cluster.assign(
            space,
            "n0",
            ["n1", "n2"],
            compression=bool(seed % 2),
            addresses={"n1": f"{HOST}:{proxy.port}"},
        )
        proxy.set_corrupt(0.02)
        proxy.set_drop(0.02)
        proxy.set_duplicate(0.05)
        proxy.set_reorder(0.05, max_hold=0.05)
        proxy.set_truncate(0.01)
        proxy.set_delay(0.002, jitter=0.003)
        log = WriteLog()
        for b in range(150):
            await write_batches(cluster, "n0", space, [payloads(space, b, 100)], log)
            await asyncio.sleep(0.01)
        proxy.clear()
        view = await cluster.wait_replicated(space, "n0", timeout=60)
    assert not log.refused, [str(r) for r in log.refused[:3]]
    log.check_tiles(15_000)
    assert view["last_sequence"] == 15_000
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    cluster.assert_wal_valid("n1", space, 15_000)
    check_payloads(cluster, "n1", space, log)
    print(f"seed {seed}: proxy stats {proxy.stats}")


# ---- authentication -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_peer_without_the_secret_is_refused(cluster: Cluster) -> None:
    """A primary with another secret can't replicate: the replica counts it and applies nothing."""
    other = write_secret(cluster.root / "other-secret")
    # A long write lease: n0 has no majority (its only replica refuses it), and this test is
    # about the replica, not about n0 losing its lease.
    cluster.add_node("n0", secret_file=other, write_lease_seconds=60)
    cluster.add_node("n1")
    await cluster.start()
    space = "oscar"
    await cluster.assign(space, "n0", ["n1"])  # each node's own admin token
    before = await cluster.metric("n1", "engram_replication_auth_failures_total")
    log = WriteLog()
    await write_batches(cluster, "n0", space, [payloads(space, b, 50) for b in range(4)], log)
    assert not log.refused and len(log.acked) == 4

    async def refused() -> bool:
        return await cluster.metric("n1", "engram_replication_auth_failures_total") > before

    await cluster.wait_until(refused, timeout=15, what="n1 to count an auth failure")

    async def primary_sees_it() -> bool:
        view = await cluster.space_view("n0", space)
        rep = view["replicas"]["n1"]
        return not rep["connected"] and rep["acked_sequence"] == 0 and bool(rep["last_error"])

    await cluster.wait_until(primary_sees_it, timeout=10, what="n0 to report n1 unreachable")
    failed = await cluster.metric(
        "n0", "engram_replication_connections_total", peer="n1", outcome="auth_failed"
    )
    assert failed > 0
    await asyncio.sleep(0.5)  # a few more reconnect attempts
    view = await cluster.space_view("n1", space)
    assert view["last_sequence"] == 0, view
    assert cluster["n1"].wal_entries(space) == []
    applied = await cluster.metric("n1", "engram_replication_entries_applied_total")
    assert applied == 0


@pytest.mark.timeout(30)
async def test_garbage_on_the_replication_port_is_refused(cluster: Cluster) -> None:
    """Bytes that are not our protocol: refused, counted, and the node keeps serving."""
    await cluster.start_nodes(2)
    space = "quebec"
    await cluster.assign(space, "n0", ["n1"])
    before = await cluster.metric("n1", "engram_replication_auth_failures_total")
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64), bytes(range(256)) * 4):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, cluster["n1"].replication_port), 5
        )
        writer.write(junk)
        await writer.drain()
        # The node closes the connection (EOF), possibly after a NACK; never hangs.
        while await asyncio.wait_for(reader.read(4096), 5):
            pass
        writer.close()
    after = await cluster.metric("n1", "engram_replication_auth_failures_total")
    assert after >= before + 2
    log = WriteLog()
    await write_batches(cluster, "n0", space, [payloads(space, 0, 10)], log)
    assert not log.refused
    await cluster.wait_replicated(space, "n0", timeout=15)
    cluster.assert_wal_identical(space, "n0", ["n1"])
