"""The raw loopback pipeline: the same bytes the sidecars ship, with none of their work.

Shared baseline of the replication, fan-out, compression and catch-up scenarios: a writer sends
BATCH-sized frames of real stored entries through a relay process to `sinks` sink processes,
which ack each frame, WIRE_BATCH entries at a time with RAW_WINDOW frames in flight — what
moving the bytes alone costs on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Final

from engram_bench.cluster import HOST, RawProcess
from engram_contract.formats.entry import encode_entry

PAYLOAD: Final = 100  # bytes per stored payload; 164 bytes per entry with its header
WIRE_BATCH: Final = 100  # entries per BATCH frame (the sidecar's batch_max_entries default)
RAW_WINDOW: Final = 32  # frames in flight (the sidecar's max_inflight_batches)


def raw_frame(entries: int) -> bytes:
    body = b"".join(
        encode_entry(
            sequence=s, timestamp_ns=time.time_ns(), entry_type=1, epoch=1, payload=b"p" * PAYLOAD
        )
        for s in range(1, entries + 1)
    )
    head = bytearray(64)
    struct.pack_into("<I", head, 52, len(body))
    return bytes(head) + body


def nodelay(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def raw_pipeline(sinks: int, duration: float) -> float:
    """Entries/s through writer → relay → `sinks` sink processes, acked end to end."""
    frame = raw_frame(WIRE_BATCH)
    async with contextlib.AsyncExitStack() as stack:
        ports = [(await stack.enter_async_context(RawProcess("sink"))).port for _ in range(sinks)]
        relay = await stack.enter_async_context(RawProcess("relay", *ports))
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, relay.port), 5.0)
        nodelay(w)
        acked = 0
        more = asyncio.Event()

        async def reader() -> None:
            nonlocal acked
            while True:
                await r.readexactly(64)
                acked += 1
                more.set()

        task = asyncio.create_task(reader())
        sent = 0
        t0 = time.perf_counter()
        stop_at = t0 + duration
        try:
            while time.perf_counter() < stop_at:
                while sent - acked < RAW_WINDOW:
                    w.write(frame)
                    sent += 1
                await w.drain()
                more.clear()
                await asyncio.wait_for(more.wait(), 10.0)
            while acked < sent:
                more.clear()
                await asyncio.wait_for(more.wait(), 10.0)
            elapsed = time.perf_counter() - t0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            w.close()
    return acked * WIRE_BATCH / elapsed
