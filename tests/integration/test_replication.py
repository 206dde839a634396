"""Replication with real sidecar processes: volume, byte-identical WALs, replica crash and stall.

Every wait is bounded (harness deadlines, per-request timeouts, pytest-timeout markers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from tests.faultproxy import FaultProxy
from tests.integration.cluster import (
    Cluster,
    IntegrationError,
    WriteLog,
    check_payloads,
    payloads,
    write_batches,
)

pytestmark = pytest.mark.integration

WRITE_BOUND = 2.0  # an async write must come back well within this (a bound, not a benchmark)


# ---- volume: 3 nodes, 4 spaces, 100K entries ---------------------------------------------------

SPACES = {
    # space: (primary, replicas, ack policy) — every node leads at least one space
    "alpha": ("n0", ("n1", "n2"), "async"),
    "bravo": ("n1", ("n2", "n0"), "async"),
    "charlie": ("n2", ("n0", "n1"), "one"),
    "delta": ("n0", ("n2", "n1"), "quorum"),
}
TOTAL_ENTRIES = 100_000
BATCH = 500
WRITERS = 8


@pytest.mark.timeout(180)
async def test_100k_entries_four_spaces_replicas_byte_identical(cluster: Cluster) -> None:
    # Small segments, so rotation happens several times and must happen at the same entries.
    await cluster.start_nodes(3, segment_bytes=1024 * 1024)
    for space, (primary, replicas, policy) in SPACES.items():
        await cluster.assign(space, primary, replicas, ack_policy=policy)

    per_space = TOTAL_ENTRIES // len(SPACES)
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for b in range(per_space // BATCH):
        for space in SPACES:
            queue.put_nowait((space, b))
    logs = {space: WriteLog() for space in SPACES}

    async def writer() -> None:
        while True:
            try:
                space, b = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await write_batches(
                cluster, SPACES[space][0], space, [payloads(space, b, BATCH)], logs[space]
            )

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(writer() for _ in range(WRITERS))), 120)
    wrote = time.monotonic() - t0

    for space, log in logs.items():
        assert not log.refused, f"{space}: writes refused: {[str(r) for r in log.refused[:3]]}"
        log.check_tiles(per_space)
    assert sum(la - f + 1 for lg in logs.values() for f, la, _ in lg.acked) == TOTAL_ENTRIES

    compared = 0
    for space, (primary, replicas, _policy) in SPACES.items():
        view = await cluster.wait_replicated(space, primary, timeout=60)
        assert view["last_sequence"] == per_space
        await cluster.wait_healthy(space, primary, timeout=10)
        compared += cluster.assert_wal_identical(space, primary, replicas)
        for n in (primary, *replicas):
            cluster.assert_wal_valid(n, space, per_space)
        assert len(cluster[primary].wal_segments(space)) > 1, "expected several segments"
        check_payloads(cluster, replicas[0], space, logs[space])
    print(f"wrote {TOTAL_ENTRIES} entries in {wrote:.1f} s; compared {compared} WAL bytes")


# ---- a replica SIGKILLed mid-stream resumes from its durable sequence --------------------------


@pytest.mark.timeout(90)
async def test_replica_sigkill_restart_resumes_without_gap_or_duplicate(cluster: Cluster) -> None:
    # catchup_threshold above the whole log: the restarted replica always catches up entry by
    # entry (what this test counts), never by a snapshot, however far the writer got meanwhile.
    await cluster.start_nodes(3, segment_bytes=256 * 1024, catchup_threshold=1_000_000)
    space = "kilo"
    await cluster.assign(space, "n0", ["n1", "n2"])
    log = WriteLog()
    batches = [payloads(space, b, 200) for b in range(60)]
    killed_at: dict[str, int] = {}
    # The writer holds after 20 batches until n1 is killed, so the kill always lands mid-log
    # even when n1's assignment arrives late and the writer would otherwise finish first.
    killed = asyncio.Event()

    async def n1_holds_some() -> bool:
        view = await cluster.space_view("n1", space)
        return int(view.get("last_sequence", 0)) >= 1

    async def chaos() -> None:
        await cluster.wait_until(
            lambda: _acked_at_least(log, 2_000), timeout=30, what="2000 entries written"
        )
        await cluster.wait_until(n1_holds_some, timeout=30, what="n1 to hold an entry")
        cluster["n1"].kill()  # SIGKILL: no shutdown, no final fsync
        killed.set()
        # What survived, as the restart will find it (a torn last entry is cut at recovery).
        wal = cluster["n1"].wal_entries(space, torn_tail_ok=True)
        killed_at["last"] = wal[-1].sequence if wal else 0
        await cluster.wait_until(
            lambda: _acked_at_least(log, killed_at["last"] + 2_000),
            timeout=30,
            what="writes to continue without n1",
        )
        await cluster.start("n1")

    async def writer() -> None:
        for i, b in enumerate(batches):
            if i == 20:
                await asyncio.wait_for(killed.wait(), 40)
            await write_batches(cluster, "n0", space, [b], log)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(chaos(), writer()), 60)
    assert not log.refused, [str(r) for r in log.refused[:3]]
    last = 60 * 200
    log.check_tiles(last)
    assert 0 < killed_at["last"] < last, killed_at

    await cluster.wait_replicated(space, "n0", timeout=30)
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    cluster.assert_wal_valid("n1", space, last)
    check_payloads(cluster, "n1", space, log)
    # The restarted process appended exactly what it lacked: resent overlap was trimmed, not
    # appended twice, and nothing it already held was asked for again.
    applied = await cluster.metric("n1", "engram_replication_entries_applied_total", space=space)
    assert applied == last - killed_at["last"], (applied, last, killed_at)


async def _acked_at_least(log: WriteLog, n: int) -> bool:
    return max((la for _, la, _ in log.acked), default=0) >= n


# ---- a replica SIGSTOPped for 3 s: Lagging/Degraded and back; async writes never blocked ------

STALL_FLAGS: dict[str, object] = {
    "lag_monitor_interval": 0.2,
    "lag_warning_seconds": 0.5,
    "lag_critical_seconds": 2,
    "heartbeat_interval": 0.1,
}


@pytest.mark.timeout(90)
async def test_replica_sigstop_goes_lagging_and_back_writes_not_blocked(cluster: Cluster) -> None:
    cluster.add_node("n0", **STALL_FLAGS)
    cluster.add_node("n1")
    cluster.add_node("n2")
    await cluster.start()
    space = "lima"
    await cluster.assign(space, "n0", ["n1", "n2"], ack_policy="async")
    log = WriteLog()
    stop_writing = asyncio.Event()
    states: list[tuple[float, str]] = []

    async def writer() -> None:
        b = 0
        while not stop_writing.is_set() and b < 2_000:
            await write_batches(cluster, "n0", space, [payloads(space, b, 20)], log, timeout=10)
            b += 1
            await asyncio.sleep(0.02)

    async def state_of_n1() -> str:
        view = await cluster.space_view("n0", space)
        state: str = view["replicas"]["n1"]["state"]
        states.append((time.monotonic(), state))
        return state

    async def healthy() -> bool:
        return await state_of_n1() == "Healthy"

    task = asyncio.create_task(writer())
    try:
        await cluster.wait_until(healthy, timeout=10, what="n1 Healthy before the stop")
        await asyncio.sleep(0.3)
        cluster["n1"].pause()
        paused = time.monotonic()
        try:
            while time.monotonic() - paused < 3.0:
                await state_of_n1()
                await asyncio.sleep(0.1)
        finally:
            cluster["n1"].resume()
        during = {s for t, s in states if t >= paused}
        assert during & {"Lagging", "Degraded"}, f"n1 stayed {during} while stopped: {states}"
        await cluster.wait_until(healthy, timeout=20, what="n1 back to Healthy", interval=0.1)
    finally:
        stop_writing.set()
        await asyncio.wait_for(task, 30)

    assert not log.refused, [str(r) for r in log.refused[:3]]
    assert log.slowest < WRITE_BOUND, f"a write took {log.slowest:.2f} s while n1 was stopped"
    assert len(log.acked) > 20, "the writer barely ran"
    last = log.acked[-1][1]
    log.check_tiles(last)
    await cluster.wait_replicated(space, "n0", timeout=30)
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    transitions = [ln for ln in cluster["n0"].log_text().splitlines() if "replica n1" in ln]
    assert transitions, "the primary logged no state transition for n1"


# ---- quorum: no majority, no acknowledgement ----------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sigstop", "sigkill"])
async def test_quorum_without_majority_fails_fast_and_acks_nothing(
    cluster: Cluster, how: str
) -> None:
    cluster.add_node("n0", ack_timeout=1, write_lease_seconds=5)
    cluster.add_node("n1")
    cluster.add_node("n2")
    await cluster.start()
    space = "quebec"
    await cluster.assign(space, "n0", ["n1", "n2"], ack_policy="quorum")
    ok = WriteLog()
    await write_batches(cluster, "n0", space, [payloads(space, b, 50) for b in range(5)], ok)
    assert not ok.refused and len(ok.acked) == 5
    await cluster.wait_replicated(space, "n0", timeout=20)

    for rep in ("n1", "n2"):
        if how == "sigstop":
            cluster[rep].pause()
        else:
            cluster[rep].kill()
    try:
        held = {rep: cluster[rep].wal_entries(space, torn_tail_ok=True) for rep in ("n1", "n2")}
        held_max = max((e[-1].sequence if e else 0) for e in held.values())
        failed = WriteLog()
        await write_batches(
            cluster, "n0", space, [payloads(space, 100 + b, 10) for b in range(3)], failed
        )
        assert not failed.acked, f"acknowledged without a majority: {failed.acked}"
        assert len(failed.refused) == 3
        for r in failed.refused:
            assert r.status == 503, r
            assert r.body["error"] == "not_acknowledged", r
            # The lease (5 s) outlives these three writes: each one waits for its acks and is
            # refused by the quorum rule, after being appended to the primary's log.
            assert "The entry is in the primary's log but NOT acknowledged" in r.body["message"], r
            assert r.elapsed < 5.0, f"refusal took {r.elapsed:.2f} s with ack_timeout 1 s"
        # Refused writes were appended: the primary holds them, unacknowledged.
        assert (await cluster.space_view("n0", space))["last_sequence"] == 5 * 50 + 3 * 10
        # Everything acknowledged is held by a majority: the primary and a replica.
        assert max(la for _, la, _ in ok.acked) <= held_max
        # The replicas really held nothing new meanwhile.
        for rep in ("n1", "n2"):
            now = cluster[rep].wal_entries(space, torn_tail_ok=True)
            assert len(now) == len(held[rep])
    finally:
        for rep in ("n1", "n2"):
            if how == "sigstop":
                with contextlib.suppress(IntegrationError):
                    cluster[rep].resume()
    if how == "sigkill":
        await cluster.start("n1", "n2")

    # With the majority back, writes are acknowledged again and everything converges.
    again = WriteLog()

    async def accepted() -> bool:
        await write_batches(cluster, "n0", space, [payloads(space, 999, 5)], again, timeout=10)
        return bool(again.acked)

    await cluster.wait_until(accepted, timeout=30, what="a quorum write to succeed", interval=0.2)
    await cluster.wait_replicated(space, "n0", timeout=30)
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    last = (await cluster.space_view("n0", space))["last_sequence"]
    cluster.assert_wal_valid("n1", space, last)


async def test_peer_address_change_moves_every_space_to_the_new_link(cluster: Cluster) -> None:
    # One link per peer node: when a later assignment names the replica at a new address, the
    # spaces already shipping to it must follow, not die with the retired link.
    await cluster.start_nodes(2)
    n1 = cluster["n1"]
    async with FaultProxy("127.0.0.1", n1.replication_port, seed=3) as proxy:
        await cluster.assign("alpha", "n0", ["n1"])
        await cluster.assign("bravo", "n0", ["n1"], addresses={"n1": f"127.0.0.1:{proxy.port}"})
        log = WriteLog()
        await write_batches(cluster, "n0", "alpha", [payloads("alpha", 0, 50)], log)
        await write_batches(cluster, "n0", "bravo", [payloads("bravo", 0, 50)], log)
        assert not log.refused
        await cluster.wait_replicated("alpha", "n0", timeout=15)
        await cluster.wait_replicated("bravo", "n0", timeout=15)
        assert proxy.stats["frames_up"] > 0
