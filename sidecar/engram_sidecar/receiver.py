"""Replica side of replication: the listener that authenticates peers and applies their batches.

Per frame: CRC (decoder), authentication (handshake first), space (known here?), epoch (not
stale), then sequence: a duplicate is acked again without writing, an overlap is trimmed to what
is new, a gap is answered with NACK GAP carrying resend-from. Applied entries go to the local WAL
under its fsync policy; the ACK carries the highest contiguous durable sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from engram_sidecar.config import SidecarConfig
from engram_sidecar.contract import Epoch, NodeName, Sequence
from engram_sidecar.entry import HEADER_SIZE
from engram_sidecar.errors import ChecksumMismatch, EngramError, SequenceError, WalError, WireError
from engram_sidecar.messages import (
    Ack,
    Heartbeat,
    Nack,
    NackReason,
    SnapshotAck,
    SnapshotBegin,
    SnapshotEnd,
    decode_message,
)
from engram_sidecar.metrics import Metrics
from engram_sidecar.snapshot import SnapshotBuilder
from engram_sidecar.space import Space
from engram_sidecar.transport import PeerClosed, next_frames, server_handshake, tune_socket
from engram_sidecar.wire import Frame, FrameDecoder, MessageType
from engram_sidecar.wire_batch import Batch, BatchMismatch

log = logging.getLogger(__name__)
_SNAPSHOT_TYPES = frozenset(
    {MessageType.SNAPSHOT_BEGIN, MessageType.SNAPSHOT_CHUNK, MessageType.SNAPSHOT_END}
)


class Receiver:
    def __init__(
        self,
        *,
        cfg: SidecarConfig,
        node: NodeName,
        secret: bytes,
        metrics: Metrics,
        lookup: Callable[[bytes], Space | None],
        install_snapshot: Callable[[Space], None] = lambda sp: None,
    ) -> None:
        self.install_snapshot = install_snapshot
        self.cfg = cfg
        self.node = node
        self.secret = secret
        self.metrics = metrics
        self.lookup = lookup
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Cancel, and also cut the sockets: on 3.11 asyncio.wait_for can swallow a cancellation
        # that lands as a read completes, and the handler would go on serving. Bounded wait.
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        for w in list(self._writers):
            w.transport.abort()
        if conns:
            await asyncio.wait(conns, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        peer = "?"
        try:
            tune_socket(writer, self.cfg.keepalive)
            decoder = FrameDecoder(max_body=self.cfg.max_frame_bytes)
            try:
                peer, early = await server_handshake(
                    reader,
                    writer,
                    decoder,
                    secret=self.secret,
                    node=self.node,
                    timeout=self.cfg.io_timeout,
                )
            except PeerClosed as err:
                if decoder.buffered or (err.args and "no data" in str(err.args[0])):
                    self.metrics.auth_failures.inc()
                # A connect-and-close with nothing sent is a primary's liveness probe.
                return
            except WireError as err:
                self.metrics.auth_failures.inc()
                log.warning("refused replication peer: %s", err)
                return
            await self._serve(NodeName(peer), reader, writer, decoder, early)
        except PeerClosed:
            pass
        except asyncio.CancelledError:
            # Receiver.stop() cancels connection handlers; nobody else awaits them, and asyncio
            # (3.11) would log each cancelled start_server handler as an ERROR with a traceback.
            pass
        except (ChecksumMismatch, BatchMismatch) as err:
            self.metrics.checksum_failures.labels(peer).inc()
            log.warning("corrupt frame from %s, recycling the connection: %s", peer, err)
            with contextlib.suppress(Exception):
                writer.write(Nack(NackReason.CHECKSUM, message=str(err)[:200]).encode())
        except WireError as err:
            log.warning("bad frame from %s, recycling the connection: %s", peer, err)
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(
        self,
        peer: NodeName,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        pending: list[Frame],
    ) -> None:
        # A peer that sends nothing (not even heartbeats) for 3 io_timeouts is gone.
        idle = self.cfg.io_timeout * 3
        acks: set[asyncio.Task[None]] = set()
        try:
            while True:
                if not pending:
                    pending = await next_frames(reader, decoder, idle)
                for frame in pending:
                    self.metrics.bytes.labels("in").inc(HEADER_SIZE + len(frame.body))
                    reply = await self._on_frame(peer, frame, writer, acks)
                    if reply:
                        writer.write(reply)
                pending = []
                await asyncio.wait_for(writer.drain(), self.cfg.io_timeout)
        finally:
            for t in acks:
                t.cancel()

    async def _on_frame(
        self,
        peer: NodeName,
        frame: Frame,
        writer: asyncio.StreamWriter,
        acks: set[asyncio.Task[None]],
    ) -> bytes:
        space = self.lookup(frame.space)
        if space is None or space.assignment is None:
            return self._nack(NackReason.UNKNOWN_SPACE, frame, "space not assigned to this node")
        if frame.epoch < space.accepted_epoch:
            return self._nack(
                NackReason.STALE_EPOCH,
                frame,
                f"epoch {frame.epoch} is older than {space.accepted_epoch} on {self.node}",
                epoch=space.accepted_epoch,
            )
        if space.role == "primary" and frame.epoch == space.accepted_epoch:
            return self._nack(
                NackReason.NOT_REPLICA, frame, f"{self.node} is the primary at epoch {frame.epoch}"
            )
        if frame.epoch > space.accepted_epoch:
            space.note_epoch(frame.epoch)
        snap = frame.msg_type in _SNAPSHOT_TYPES
        if not space.fork_checked and not snap:  # a snapshot replaces the log: no fork to find
            return self._nack(
                NackReason.NOT_REPLICA, frame, f"{self.node} is still finding its fork point"
            )
        msg = decode_message(frame, max_batch_size=self.cfg.max_frame_bytes)
        if isinstance(msg, Heartbeat):
            space.primary_last_seq = max(space.primary_last_seq, int(msg.last_seq))
            space.primary_last_ts_ns = msg.last_timestamp_ns
            return self._ack(space)
        if snap:
            return await self._snapshot(space, frame, msg)
        if isinstance(msg, Batch):
            return await self._apply(space, msg, writer, acks)
        return b""

    async def _snapshot(self, space: Space, frame: Frame, msg: object) -> bytes:
        """Build a snapshot beside the live log; install it on SNAPSHOT_END."""
        b = space.snapshot_builder
        try:
            if isinstance(msg, SnapshotBegin):
                if b is not None:
                    b.abandon()
                space.snapshot_builder = b = SnapshotBuilder(
                    space.path,
                    space=space.id,
                    first=int(msg.first_seq),
                    last=int(msg.last_seq),
                    epoch=int(msg.epoch),
                    history=list(msg.epochs),
                    segment_bytes=msg.segment_bytes,
                )
                log.info(
                    "space %s: receiving a snapshot of %d..%d (%d bytes)",
                    space.id,
                    msg.first_seq,
                    msg.last_seq,
                    msg.total_bytes,
                )
                return self._snap_ack(space, b.log.last_sequence, installed=False)
            if b is None:
                return self._nack(NackReason.INTERNAL, frame, "no snapshot in progress")
            if isinstance(msg, Batch):
                if msg.first_seq != b.log.next_sequence:
                    raise SequenceError(
                        f"chunk starts at {msg.first_seq}, snapshot expects {b.log.next_sequence}"
                    )
                b.append(msg.entries)
                await asyncio.to_thread(b.durable)
                return self._snap_ack(space, b.log.last_sequence, installed=False)
            if isinstance(msg, SnapshotEnd):
                b.finish()
                space.snapshot_builder = None
                self.install_snapshot(space)
                return self._snap_ack(space, space.log.last_sequence, installed=True)
        except (WalError, OSError) as err:
            log.error("space %s: snapshot failed, starting over: %s", space.id, err)
            if space.snapshot_builder is not None:
                space.snapshot_builder.abandon()
                space.snapshot_builder = None
            return self._nack(NackReason.INTERNAL, frame, f"snapshot failed: {err}"[:200])
        return b""

    def _snap_ack(self, space: Space, seq: int, *, installed: bool) -> bytes:
        return SnapshotAck(
            space.wire_id, Epoch(space.accepted_epoch), Sequence(seq), installed
        ).encode()

    async def _apply(
        self,
        space: Space,
        batch: Batch,
        writer: asyncio.StreamWriter,
        acks: set[asyncio.Task[None]],
    ) -> bytes:
        wal = space.log
        space.primary_last_seq = max(space.primary_last_seq, int(batch.last_seq))
        if batch.last_seq <= wal.last_sequence:
            return self._ack(space)  # a duplicate: already have it
        if batch.first_seq > wal.next_sequence:
            return self._nack(
                NackReason.GAP,
                None,
                f"expected {wal.next_sequence}",
                space=space,
                resend_from=wal.next_sequence,
            )
        data = _skip_entries(batch.entries, wal.next_sequence - batch.first_seq)
        try:
            first, last = wal.append_stored(data, payloads_checked=True)
        except WalError as err:
            log.error("space %s: cannot apply batch: %s", space.id, err)
            return self._nack(NackReason.INTERNAL, None, str(err)[:200], space=space)
        self.metrics.entries_applied.labels(space.id).inc(last - first + 1)
        if space.commit.policy == "always":
            t = asyncio.create_task(self._ack_when_durable(space, last, writer))
            acks.add(t)
            t.add_done_callback(acks.discard)
            return b""
        return self._ack(space, wal.last_sequence)

    async def _ack_when_durable(self, space: Space, seq: int, writer: asyncio.StreamWriter) -> None:
        try:
            await space.commit.wait_durable(seq)
        except EngramError as err:
            log.error("space %s: fsync failed; not acking %d: %s", space.id, seq, err)
            writer.close()
            return
        if not writer.is_closing():
            writer.write(self._ack(space))

    def _ack(self, space: Space, seq: int | None = None) -> bytes:
        s = space.applied_sequence if seq is None else seq
        return Ack(space.wire_id, Epoch(space.accepted_epoch), Sequence(s), time.time_ns()).encode()

    def _nack(
        self,
        reason: NackReason,
        frame: Frame | None,
        message: str,
        *,
        space: Space | None = None,
        resend_from: int = 0,
        epoch: int = 0,
    ) -> bytes:
        self.metrics.nacks.labels("out", reason.name).inc()
        sid = space.wire_id if space is not None else (frame.space if frame else bytes(16))
        ep = epoch or (space.accepted_epoch if space else (frame.epoch if frame else 0))
        return Nack(reason, Sequence(resend_from), message, sid, Epoch(ep)).encode()


def _skip_entries(data: bytes, n: int) -> bytes:
    """`data` without its first `n` stored entries (the part of an overlap we already hold)."""
    pos = 0
    for _ in range(n):
        size = int.from_bytes(data[pos + 24 : pos + 28], "little")
        pos += HEADER_SIZE + size
    return data[pos:] if pos else data
