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

from engram_bench.rawpeer import RawProcess
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE
from engram_contract.formats.entry import encode_entry
from engram_contract.formats.frame import BODY_LENGTH_OFFSET
from engram_contract.formats.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from engram_contract.launcher import HOST

PAYLOAD: Final = 100  # bytes per stored payload
ENTRY_BYTES: Final = ENTRY_HEADER_SIZE + PAYLOAD  # one stored entry, header included
WIRE_BATCH: Final = 100  # entries per BATCH frame (the sidecar's batch_max_entries default)
RAW_WINDOW: Final = 32  # frames in flight (the sidecar's max_inflight_batches)
_BODY_LENGTH: Final = struct.Struct("<I")  # the frame header's body-length field


def raw_frame(entries: int) -> bytes:
    body = b"".join(
        encode_entry(
            sequence=s, timestamp_ns=time.time_ns(), entry_type=1, epoch=1, payload=b"p" * PAYLOAD
        )
        for s in range(1, entries + 1)
    )
    return frame_header(len(body)) + body


def frame_header(body_length: int) -> bytes:
    """A bare frame header: zero but for its body length, which is all the raw peers read."""
    head = bytearray(FRAME_HEADER_SIZE)
    _BODY_LENGTH.pack_into(head, BODY_LENGTH_OFFSET, body_length)
    return bytes(head)


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
                await r.readexactly(FRAME_HEADER_SIZE)
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
