"""Primary side of replication: the pooled connection to one peer node, one stream per space on it.

`PeerLink` dials a peer, authenticates, keeps the connection (keepalive, I/O timeouts), and
redials with backoff; its circuit breaker marks the peer's replicas Degraded after repeated
failures and lets a half-open attempt through later. Every space that replicates to that peer
multiplexes its stream over the one connection (the Kafka pattern).

A stream has its own cursor per replica, advanced only by that replica's acks (engram-facts §5.6):
on reconnect it resends from `acked + 1`. Several batches are in flight at once (up to
`max_inflight_batches`), since stop-and-wait caps a stream at batch/RTT (§5.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from engram_contract.assignment import split_hostport
from engram_contract.formats.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from engram_contract.formats.frame import Frame, FrameDecoder
from engram_contract.formats.messages import Ack, Nack, SnapshotAck, decode_message
from engram_contract.ids import NodeName
from engram_sidecar.config import SidecarConfig
from engram_sidecar.errors import ChecksumMismatch, EngramError, WireError
from engram_sidecar.log.offload import prepare_read
from engram_sidecar.metrics import Metrics
from engram_sidecar.replication.breaker import Backoff, CircuitBreaker
from engram_sidecar.replication.catchup import TokenBucket
from engram_sidecar.replication.stream import Stream, StreamRefused
from engram_sidecar.replication.transport import (
    PeerClosed,
    client_handshake,
    next_frames,
    send,
    tune_socket,
)
from engram_sidecar.space.hosted import Space

log = logging.getLogger(__name__)
# While backing off, a cheap connect probe runs this often (seconds).
PROBE_EVERY = 1.0


class PeerLink:
    def __init__(
        self,
        *,
        cfg: SidecarConfig,
        node: NodeName,
        peer: NodeName,
        address: str,
        secret: Callable[[], bytes],
        metrics: Metrics,
        bucket: TokenBucket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.bucket = bucket
        self.node = node
        self.peer = peer
        self.address = address
        self.secret = secret
        self.metrics = metrics
        self.clock = clock
        self.streams: dict[bytes, Stream] = {}
        self.backoff = Backoff(cfg.backoff_steps)
        self.breaker = CircuitBreaker(cfg.breaker_failures, clock)
        self.connected = False
        self.last_error = ""
        self._writer: asyncio.StreamWriter | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- membership -----------------------------------------------------------------------

    def add(self, space: Space) -> None:
        if space.wire_id not in self.streams:
            st = Stream(
                space,
                self.peer,
                metrics=self.metrics,
                bucket=self.bucket,
                threshold=self.cfg.catchup_threshold,
                heartbeat_interval=self.cfg.heartbeat_interval,
                window=self.cfg.max_inflight_batches,
                clock=self.clock,
            )
            st.reset()
            self.streams[space.wire_id] = st
            space.ring.inflight = self._space_inflight(space)
        self._wake.set()

    def remove(self, space: Space) -> None:
        self.streams.pop(space.wire_id, None)

    def _space_inflight(self, space: Space) -> Callable[[], bool]:
        prev = space.ring.inflight

        def any_inflight() -> bool:
            s = self.streams.get(space.wire_id)
            return bool(s and s.inflight) or prev()

        return any_inflight

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"peer-{self.peer}")

    async def stop(self) -> None:
        # The flag, not only the cancel: on 3.11, asyncio.wait_for can swallow a cancellation
        # that lands as its inner call completes (e.g. a refused connect), and the loop would
        # then redial forever. The wait is bounded for the same reason.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        await self._close()

    # ---- connection lifecycle -------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._connect_and_serve()
            except asyncio.CancelledError:
                raise
            except (EngramError, OSError, TimeoutError) as err:
                self.last_error = str(err) or type(err).__name__
            except Exception as err:  # a bug must not kill replication to this peer for good
                self.last_error = f"internal error: {err!r}"
                log.exception("link %s -> %s failed", self.node, self.peer)
            await self._close()
            if self._stopping:
                return
            delay = self.backoff.next_delay()
            if self.breaker.record_failure(delay):
                log.warning(
                    "circuit to %s opened after %d failures: %s",
                    self.peer,
                    self.breaker.consecutive_failures,
                    self.last_error,
                )
            self.metrics.circuit_open.labels(self.peer).set(int(self.breaker.is_open))
            self._mark_disconnected()
            await self._wait_to_redial(delay)

    async def _wait_to_redial(self, delay: float) -> None:
        """Sleep out the backoff step, but probe the port cheaply every PROBE_EVERY seconds.

        Long steps (10 s, 60 s) protect a sick peer from full reconnects and handshakes; a bare
        TCP connect that succeeds means the peer's listener is back, so redial at once: a
        restarted replica rejoins within about a second instead of waiting out the step.
        """
        deadline = self.clock() + delay
        host, port = split_hostport(self.address)
        while not self._stopping:
            left = deadline - self.clock()
            if left <= 0:
                return
            await asyncio.sleep(min(left, PROBE_EVERY))
            if left <= PROBE_EVERY:
                return
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_EVERY)
            except (OSError, TimeoutError):
                continue
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)
            return

    def _mark_disconnected(self) -> None:
        now = self.clock()
        for s in self.streams.values():
            prog = s.space.replicas.get(self.peer)
            if prog is not None and prog.disconnected_since is None:
                prog.disconnected_since = now

    async def _close(self) -> None:
        self.connected = False
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)

    async def _connect_and_serve(self) -> None:
        host, port = split_hostport(self.address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.cfg.connect_timeout
            )
        except (OSError, TimeoutError) as err:
            self.metrics.connections.labels(self.peer, "refused").inc()
            raise PeerClosed(f"connect to {self.peer} at {self.address}: {err!r}") from err
        self._writer = writer
        tune_socket(writer, self.cfg.keepalive)
        decoder = FrameDecoder(max_body=self.cfg.max_frame_bytes)
        try:
            early = await client_handshake(
                reader,
                writer,
                decoder,
                secret=self.secret(),
                node=self.node,
                expect=self.peer,
                timeout=self.cfg.io_timeout,
            )
        except WireError:
            self.metrics.connections.labels(self.peer, "auth_failed").inc()
            raise
        self.metrics.connections.labels(self.peer, "ok").inc()
        self.connected = True
        self.backoff.reset()
        if self.breaker.record_success():
            log.info("circuit to %s closed", self.peer)
        self.metrics.circuit_open.labels(self.peer).set(0)
        for s in self.streams.values():
            s.reset()
            prog = s.space.replicas.get(self.peer)
            if prog is not None:
                prog.disconnected_since = None
        # The reader returns why it stopped rather than raising it: asyncio.run's shutdown
        # reports every task that ends in an exception, retrieved or not, and a peer that
        # closes while the node shuts down is no error.
        reader_task = asyncio.create_task(_stopped_by(self._read_loop(reader, decoder, early)))
        try:
            await self._send_loop(writer, reader_task)
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    async def _send_loop(
        self, writer: asyncio.StreamWriter, reader: asyncio.Task[Exception | None]
    ) -> None:
        while True:
            if reader.done():
                err = reader.result()
                if err is not None:
                    raise err  # why the connection ended
                raise PeerClosed("reader stopped")
            self._wake.clear()
            now = self.clock()
            wait = self.cfg.heartbeat_interval
            for s in list(self.streams.values()):
                seq = s.read_ahead()
                if seq is not None and not await prepare_read(s.space.log, seq):
                    s.read_anyway(seq)
                retry = s.fill(functools.partial(send, writer), now)
                if retry is not None:
                    wait = min(wait, max(retry, 0.001))
            # asyncio.timeout, not wait_for: this loop turns at least once per write and ack,
            # and wait_for would start a Task for each of the two waits every time.
            async with asyncio.timeout(self.cfg.io_timeout):
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _read_loop(
        self, reader: asyncio.StreamReader, decoder: FrameDecoder, early: list[Frame]
    ) -> None:
        # Replicas ack at least once per heartbeat, so silence past io_timeout means trouble.
        pending = list(early)
        while True:
            if not pending:
                try:
                    pending = await next_frames(reader, decoder, self.cfg.io_timeout)
                except ChecksumMismatch:
                    self.metrics.checksum_failures.labels(self.peer).inc()
                    raise
            for frame in pending:
                self.metrics.bytes.labels("in").inc(FRAME_HEADER_SIZE + len(frame.body))
                msg = decode_message(frame)
                s = self.streams.get(frame.space)
                if s is None:
                    continue
                try:
                    if isinstance(msg, Ack):
                        s.on_ack(msg)
                    elif isinstance(msg, SnapshotAck):
                        s.on_snapshot_ack(msg)
                    elif isinstance(msg, Nack):
                        s.on_nack(msg)
                except StreamRefused as err:
                    raise PeerClosed(str(err)) from err
            pending = []
            self._wake.set()


async def _stopped_by(work: Coroutine[Any, Any, None]) -> Exception | None:
    try:
        await work
    except Exception as err:  # handed to the send loop, which raises it
        return err
    return None
