"""Raw asyncio TCP processes: the baselines' far end.

Plain asyncio servers in their own processes, with none of the sidecar's work: `sink` reads
frames (a frame header, then as many body bytes as its body-length field says, as on the wire)
and answers each with one bare frame header; `relay` forwards each frame to one or more sinks
and answers once all of them have; `delay` is a TCP proxy that holds every chunk, both ways, for
a fixed time. Every wait is bounded, and each process dies with the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Final

from engram_bench.sidecars import BenchError, rss_bytes
from engram_contract.formats.frame import BODY_LENGTH_OFFSET, HEADER_SIZE
from engram_contract.launcher import READY_TIMEOUT, STOP_TIMEOUT, die_with_parent

# The frame layout comes from the contract (the prelude below), not typed into the script: the
# script runs as `python -c`, and importing nothing of ours keeps the baseline's process lean.
_RAW_PRELUDE: Final = f"HDR = {HEADER_SIZE}\nBODY_LENGTH_OFFSET = {BODY_LENGTH_OFFSET}\n"
_RAW_SCRIPT: Final = (
    _RAW_PRELUDE
    + r"""
import asyncio, struct, sys
ACK = bytes(HDR)  # a bare frame header
BODY_LEN = struct.Struct("<I")

async def read_frame(r):
    head = await r.readexactly(HDR)
    n = BODY_LEN.unpack_from(head, BODY_LENGTH_OFFSET)[0]
    return head + (await r.readexactly(n) if n else b"")

async def sink(r, w):
    w.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY
    try:
        while True:
            await read_frame(r)
            w.write(ACK)
            if w.transport.get_write_buffer_size() > 65536:
                await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()

def relay_to(ports):
    async def relay(r, w):
        w.get_extra_info("socket").setsockopt(6, 1, 1)
        outs = [await asyncio.open_connection("127.0.0.1", p) for p in ports]
        for _, ow in outs:
            ow.get_extra_info("socket").setsockopt(6, 1, 1)
        counts = [0] * len(outs)
        acked = 0

        async def acks(i, orr):
            nonlocal acked
            while True:
                await orr.readexactly(HDR)
                counts[i] += 1
                low = min(counts)
                while acked < low:
                    w.write(ACK)
                    acked += 1

        tasks = [asyncio.create_task(acks(i, o[0])) for i, o in enumerate(outs)]
        try:
            while True:
                frame = await read_frame(r)
                for _, ow in outs:
                    ow.write(frame)
                for _, ow in outs:
                    if ow.transport.get_write_buffer_size() > 262144:
                        await ow.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        for t in tasks:
            t.cancel()
        for _, ow in outs:
            ow.close()
        w.close()
    return relay

def delay_to(port, delay_us):
    delay = delay_us / 1e6

    async def pump(src, dst, loop):
        # One FIFO per direction and one writer task: every chunk leaves `delay` after it
        # arrived, in order (timer heaps do not order equal deadlines).
        queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                if data is None:
                    dst.close()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                if dst.transport.get_write_buffer_size() > 4194304:
                    await dst.drain()

        task = asyncio.create_task(deliver())
        try:
            while True:
                data = await src.read(262144)
                if not data:
                    break
                queue.put_nowait((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + delay, None))
        try:
            await task
        except (ConnectionError, OSError):
            pass

    async def proxy(r, w):
        w.get_extra_info("socket").setsockopt(6, 1, 1)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            w.close()
            return
        uw.get_extra_info("socket").setsockopt(6, 1, 1)
        loop = asyncio.get_running_loop()
        await asyncio.gather(pump(r, uw, loop), pump(ur, w, loop))
    return proxy

async def main():
    role = sys.argv[1]
    if role == "sink":
        handler = sink
    elif role == "delay":
        handler = delay_to(int(sys.argv[2]), int(sys.argv[3]))
    else:
        handler = relay_to([int(p) for p in sys.argv[2:]])
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""
)


class RawProcess:
    """One raw helper process: `sink` (answers each frame with a bare frame header), `relay`
    (forwards each frame to every sink port and answers once all of them have), or `delay` (a
    TCP proxy to the port given first that holds every chunk, both ways, for the microseconds
    given second: ``RawProcess("delay", target_port, delay_us)``)."""

    def __init__(self, role: str, *ports: int) -> None:
        self.role = role
        self.ports = ports
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> RawProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _RAW_SCRIPT,
            self.role,
            *map(str, self.ports),
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), READY_TIMEOUT)
        if not line.strip():
            raise BenchError(f"raw {self.role} process did not start")
        self.port = int(line)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.proc is not None else 0
