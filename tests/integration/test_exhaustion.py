"""Unauthenticated sockets on the replication port, against real sidecar processes.

Issue 11, finding 6: 200 sockets that each sent a HELLO declaring a 16 MiB body, and trickled
it, made a replica hold 3.2 GiB; sockets that trickled a byte at a time were never dropped,
because each read had its own timeout. Here a replica takes such sockets while it replicates:
its memory stays bounded, every socket is closed by the handshake deadline (the large ones at
their header), and replication goes on during and after. With the default caps, sockets past
the per-source cap are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from tests.integration.cluster import (
    HOST,
    Cluster,
    WriteLog,
    check_payloads,
    payloads,
    write_batches,
)

from engram_contract.formats.frame import HEADER, MAGIC, VERSION, MessageType

pytestmark = pytest.mark.integration

SPACE = "kilo"
SOCKETS = 200
HANDSHAKE_TIMEOUT = 3.0
SLACK = 3.0  # scheduling on a loaded 2-core machine, on top of the deadline
RSS_GROWTH_BOUND = 64 * 1024 * 1024
DECLARED = 16 * 1024 * 1024  # what each large HELLO claims its body is
PIECE = 16 * 1024  # large HELLOs send their body this much at a time ...
PIECE_EVERY = 0.05  # ... this often: 320 KB/s per socket; 96 MB in 3 s from 100 of them
BYTE_EVERY = 0.1  # slow HELLOs send one byte this often: each read is "on time"


def _hello_header(body_length: int) -> bytes:
    """A well-formed HELLO header declaring `body_length` bytes of body."""
    return HEADER.pack(
        MAGIC, VERSION, MessageType.HELLO, 0, 0, bytes(16), 0, 0, 0, body_length, 0, 0
    )


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def _closed(reader: asyncio.StreamReader, limit: float) -> float:
    """Monotonic time at which the server closed the connection (EOF or reset)."""
    deadline = time.monotonic() + limit
    with contextlib.suppress(ConnectionError):
        while time.monotonic() < deadline:
            left = deadline - time.monotonic()
            with contextlib.suppress(TimeoutError):
                if not await asyncio.wait_for(reader.read(64 * 1024), max(left, 0.01)):
                    break
    return time.monotonic()


async def _attack(
    port: int, first: bytes, send_next: Callable[[], bytes], every: float, limit: float
) -> float:
    """Open a socket, send `first`, then `send_next()` every `every` s until the server closes
    it (or `limit` passes). Returns seconds from connect to the server's close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10.0)
    t0 = time.monotonic()
    closed = asyncio.create_task(_closed(reader, limit))
    try:
        writer.write(first)
        while not closed.done() and time.monotonic() - t0 < limit:
            await asyncio.wait_for(writer.drain(), every + 1.0)
            await asyncio.sleep(every)
            writer.write(send_next())
    except (ConnectionError, TimeoutError):
        pass
    took = await asyncio.wait_for(closed, limit + 1.0) - t0
    writer.transport.abort()
    return took


async def _sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _rss(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def _with_rss_peak(pid: int, work: Awaitable[list[float]]) -> tuple[list[float], int]:
    stop, peak = asyncio.Event(), [0]
    sampler = asyncio.create_task(_sample_rss(pid, stop, peak))
    try:
        return await work, peak[0]
    finally:
        stop.set()
        await asyncio.wait_for(sampler, 5.0)


async def _replicate_some(cluster: Cluster, batch: int, log: WriteLog) -> None:
    await write_batches(cluster, "n0", SPACE, [payloads("x", batch, 50)], log)
    await cluster.wait_replicated(SPACE, "n0", timeout=30)


@pytest.mark.timeout(120)
async def test_unauthenticated_sockets_cost_bounded_memory_and_end_at_the_deadline(
    cluster: Cluster,
) -> None:
    cluster.add_node("n0")
    # Every attacking socket comes from 127.0.0.1: let all 200 in, so that what bounds them is
    # the handshake's body limit and deadline, not the per-source cap (tested below).
    cluster.add_node("n1", max_peer_handshakes_per_source=256, handshake_timeout=HANDSHAKE_TIMEOUT)
    await cluster.start()
    await cluster.assign(SPACE, "n0", ["n1"], ack_policy="one")
    log = WriteLog()
    await _replicate_some(cluster, 0, log)
    victim = cluster["n1"]
    before = _rss(victim.pid)

    limit = HANDSHAKE_TIMEOUT + SLACK + 2.0  # the attackers' patience, past every bound below
    large = [
        _attack(
            victim.replication_port,
            _hello_header(DECLARED),
            lambda: bytes(PIECE),
            PIECE_EVERY,
            limit,
        )
        for _ in range(SOCKETS // 2)
    ]
    # A valid header for a small body, then the body a byte at a time: 51 s to send in full.
    slow = [
        _attack(victim.replication_port, _hello_header(512), lambda: b"\x00", BYTE_EVERY, limit)
        for _ in range(SOCKETS - SOCKETS // 2)
    ]

    async def attack_while_writing() -> list[float]:
        sockets = asyncio.gather(*large, *slow)
        await _replicate_some(cluster, 1, log)  # an authenticated link is not disturbed
        return list(await asyncio.wait_for(sockets, limit + 10.0))

    took, peak = await _with_rss_peak(victim.pid, attack_while_writing())

    assert peak - before < RSS_GROWTH_BOUND, f"RSS grew {(peak - before) / 2**20:.1f} MiB"
    half = SOCKETS // 2
    assert max(took[:half]) < HANDSHAKE_TIMEOUT / 2, (
        f"large HELLOs must be refused at their header, not at the deadline: {max(took[:half])}"
    )
    assert max(took[half:]) < HANDSHAKE_TIMEOUT + SLACK, f"slowest close {max(took[half:]):.2f} s"
    assert min(took[half:]) > HANDSHAKE_TIMEOUT * 0.8  # trickled bytes kept them open until then

    assert await cluster.metric("n1", "engram_replication_auth_failures_total") >= SOCKETS
    open_handshakes = "engram_replication_peer_connections"

    async def drained() -> bool:
        return await cluster.metric("n1", open_handshakes, state="handshake") == 0

    await cluster.wait_until(drained, timeout=10, what="n1 to hold no handshake")
    await _replicate_some(cluster, 2, log)
    assert not log.refused, [str(r) for r in log.refused[:3]]
    cluster.assert_wal_identical(SPACE, "n0", ["n1"])
    check_payloads(cluster, "n1", SPACE, log)


@pytest.mark.timeout(120)
async def test_sockets_past_the_per_source_cap_are_closed_at_once(cluster: Cluster) -> None:
    cluster.add_node("n0")
    cluster.add_node("n1", handshake_timeout=HANDSHAKE_TIMEOUT)  # default caps: 256 and 32
    await cluster.start()
    await cluster.assign(SPACE, "n0", ["n1"])
    log = WriteLog()
    await _replicate_some(cluster, 0, log)

    limit = HANDSHAKE_TIMEOUT + SLACK + 2.0  # the attackers' patience, past every bound below
    took = await asyncio.wait_for(
        asyncio.gather(
            *(
                _attack(cluster["n1"].replication_port, b"E", lambda: b"N", BYTE_EVERY, limit)
                for _ in range(100)
            )
        ),
        limit + 10.0,
    )
    at_once = [t for t in took if t < HANDSHAKE_TIMEOUT / 2]
    assert len(at_once) == 100 - 32, sorted(took)
    refused = await cluster.metric(
        "n1", "engram_replication_connections_refused_total", reason="max_handshakes_per_source"
    )
    assert refused == 100 - 32
    await _replicate_some(cluster, 1, log)
    cluster.assert_wal_identical(SPACE, "n0", ["n1"])
