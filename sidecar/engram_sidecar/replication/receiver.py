"""Replica side of replication: the listener that authenticates peers and applies their batches.

Per frame: CRC (decoder), authentication (handshake first), space (known here?), sender (only
the assignment's primary, at the assignment's epoch), then log matching (`matching`): the batch
applies only after the entry it follows; entries already held are compared by epoch, and a
divergent tail is cut. A gap or a mismatch is answered with NACK GAP/DIVERGED naming this log's
entry to resume after. Applied entries go through the space's one write path (`Space.apply`,
then `Space.settle` as its fsync policy says), checked once: the frame decoder checked every
entry's CRCs, sequence and epoch (`Batch.checked`) and the log takes them as checked. The ACK
carries the highest durable sequence proven identical to the primary's
(`Space.matched_sequence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from engram_contract.formats.batch import Batch, BatchMismatch
from engram_contract.formats.entry import CheckedRun, RunProblem, check_run
from engram_contract.formats.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from engram_contract.formats.frame import Frame, FrameDecoder, MessageType
from engram_contract.formats.messages import (
    Ack,
    Heartbeat,
    Nack,
    NackReason,
    SnapshotAck,
    SnapshotBegin,
    SnapshotEnd,
    decode_message,
)
from engram_contract.ids import Epoch, NodeName, Sequence
from engram_sidecar.config import SidecarConfig
from engram_sidecar.errors import (
    ChecksumMismatch,
    EngramError,
    SequenceError,
    WalCorruption,
    WalError,
    WalTruncated,
    WireError,
)
from engram_sidecar.log.epochs import fork_point
from engram_sidecar.log.offload import Offload, to_thread
from engram_sidecar.log.snapshot import SnapshotBuilder
from engram_sidecar.metrics import Metrics
from engram_sidecar.replication import matching
from engram_sidecar.replication.admission import Admission, Refused
from engram_sidecar.replication.transport import (
    ClosedSilently,
    PeerClosed,
    next_frames,
    peer_source,
    send,
    server_handshake,
    tune_socket,
)
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.writer import Written

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
        secret: Callable[[], bytes],
        metrics: Metrics,
        lookup: Callable[[bytes], Space | None],
        install_snapshot: Callable[[Space], Awaitable[None]] | None = None,
        offload: Offload = to_thread,
    ) -> None:
        self.install_snapshot = install_snapshot
        # Snapshot files are made, finished and dropped in a worker thread, never on the loop.
        self.offload = offload
        self.cfg = cfg
        self.node = node
        self.secret = secret
        self.metrics = metrics
        self.lookup = lookup
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._admission = Admission(
            max_connections=cfg.max_peer_connections,
            max_handshakes_per_source=cfg.max_peer_handshakes_per_source,
        )

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
        try:
            ticket = self._admission.admit(peer_source(writer))
        except Refused as err:
            # Before a byte is read: over a cap, a socket costs no more than its accept.
            self.metrics.connections_refused.labels(err.reason).inc()
            log.debug("refused a replication connection: %s", err)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        self._count_connections()
        peer = "?"
        try:
            tune_socket(writer, self.cfg.keepalive)
            try:
                peer = await server_handshake(
                    reader,
                    writer,
                    secret=self.secret(),
                    node=self.node,
                    timeout=self.cfg.handshake_timeout,
                )
            except ClosedSilently:
                return  # a connect-and-close with nothing sent is a primary's liveness probe
            except PeerClosed as err:
                # Cut off mid-handshake or at its deadline: not logged above debug, or a flood
                # of trickling sockets would flood the log too.
                self.metrics.auth_failures.inc()
                log.debug("replication handshake from %s dropped: %s", ticket.source, err)
                return
            except WireError as err:
                self.metrics.auth_failures.inc()
                log.warning("refused replication peer: %s", err)
                return
            self._admission.authenticated(ticket)
            self._count_connections()
            # The handshake read exactly its own frames: this decoder starts at a frame boundary.
            decoder = FrameDecoder(max_body=self.cfg.max_frame_bytes)
            await self._serve(NodeName(peer), reader, writer, decoder, [])
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
            self._admission.release(ticket)
            self._count_connections()
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _count_connections(self) -> None:
        adm = self._admission
        self.metrics.peer_connections.labels("handshake").set(adm.handshaking)
        self.metrics.peer_connections.labels("authenticated").set(adm.open - adm.handshaking)

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
                    self.metrics.bytes.labels("in").inc(FRAME_HEADER_SIZE + len(frame.body))
                    reply = await self._on_frame(peer, frame, writer, acks)
                    if reply:
                        send(writer, reply)
                pending = []
                async with asyncio.timeout(self.cfg.io_timeout):  # no Task per batch, as wait_for
                    await writer.drain()
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
        if space.installing_snapshot:
            # Another connection's SNAPSHOT_END is swapping the log's files: its log is closed.
            return self._nack(NackReason.INTERNAL, frame, "installing a snapshot; try again")
        refusal = self._admit(peer, frame, space)
        if refusal:
            return refusal
        msg = decode_message(frame, max_batch_size=self.cfg.max_frame_bytes)
        if isinstance(msg, Heartbeat):
            space.primary_last_seq = max(space.primary_last_seq, int(msg.last_seq))
            space.primary_last_ts_ns = msg.last_timestamp_ns
            wal = space.log
            if msg.last_seq <= wal.last_sequence and matching.epoch_at(
                wal.history, int(msg.last_seq)
            ) == int(msg.last_epoch):
                space.matched_upto = max(space.matched_upto, int(msg.last_seq))
            return self._ack(space)
        if frame.msg_type in _SNAPSHOT_TYPES:
            return await self._snapshot(space, frame, msg)
        if isinstance(msg, Batch):
            return await self._apply(space, msg, writer, acks)
        return b""

    def _admit(self, peer: NodeName, frame: Frame, space: Space) -> bytes:
        """Refuse any frame but one from this assignment's primary at this assignment's epoch.

        A higher epoch proves the control plane moved on: it fences this node if it leads, and
        nothing is applied or acknowledged until the matching assignment arrives, so an ack can
        never vouch for entries this node holds from an older primary (issue 11, finding 1).
        """
        a = space.assignment
        assert a is not None
        if frame.epoch < space.accepted_epoch:
            return self._nack(
                NackReason.STALE_EPOCH,
                frame,
                f"epoch {frame.epoch} is older than {space.accepted_epoch} on {self.node}",
                epoch=space.accepted_epoch,
            )
        if frame.epoch > space.accepted_epoch:
            try:
                space.note_epoch(frame.epoch)
            except EngramError as err:
                space.writer.note_error(err)
                return self._nack(NackReason.INTERNAL, frame, f"cannot record epoch: {err}"[:200])
        if frame.epoch != a.epoch:
            return self._nack(
                NackReason.NOT_REPLICA,
                frame,
                f"{self.node} has no assignment at epoch {frame.epoch} yet (holds {a.epoch})",
            )
        if space.role != "replica":
            return self._nack(
                NackReason.NOT_REPLICA,
                frame,
                f"{self.node} is {space.role} of this space at epoch {frame.epoch}",
            )
        if peer != a.primary.node:
            return self._nack(
                NackReason.NOT_REPLICA,
                frame,
                f"{peer} is not the primary at epoch {a.epoch}; {a.primary.node} is",
            )
        return b""

    async def _snapshot(self, space: Space, frame: Frame, msg: object) -> bytes:
        """Build a snapshot beside the live log; install it on SNAPSHOT_END.

        A SNAPSHOT_BEGIN of the same primary, epoch, start and history as the snapshot being
        built resumes it: the answer names the last entry it holds durably and the primary
        continues from there. A catch-up cut by a dropped connection or a corrupt frame so
        loses at most the chunks in flight, never the whole transfer (issue 11, item 7).
        """
        b = space.snapshot_builder
        try:
            if isinstance(msg, SnapshotBegin):
                key = (int(msg.epoch), int(msg.first_seq), tuple(msg.epochs))
                if (
                    b is not None
                    and space.snapshot_key == key
                    and b.log.last_sequence <= msg.last_seq
                ):
                    b.last = int(msg.last_seq)
                    log.info(
                        "space %s: resuming the snapshot at %d of %d..%d",
                        space.id,
                        b.log.last_sequence,
                        msg.first_seq,
                        msg.last_seq,
                    )
                    return self._snap_ack(space, b.log.last_sequence, installed=False)
                space.snapshot_builder, space.snapshot_key = None, None
                if b is not None:
                    await self.offload(b.abandon)
                path, sid = space.path, space.id

                def begin() -> SnapshotBuilder:
                    return SnapshotBuilder(
                        path,
                        space=sid,
                        first=int(msg.first_seq),
                        last=int(msg.last_seq),
                        epoch=int(msg.epoch),
                        history=list(msg.epochs),
                        segment_bytes=msg.segment_bytes,
                    )

                space.snapshot_builder = b = await self.offload(begin)
                space.snapshot_key = key
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
                have = b.log.last_sequence
                if msg.first_seq > have + 1:
                    raise SequenceError(
                        f"chunk starts at {msg.first_seq}, snapshot expects {have + 1}"
                    )
                if msg.last_seq > have:  # a resent chunk may overlap what is held
                    data, rest = _skip_entries(msg, _checked(msg), have + 1 - int(msg.first_seq))
                    b.append(data, rest)
                    await self.offload(b.durable)
                    if space.snapshot_builder is not b:
                        return b""  # replaced meanwhile by a newer SNAPSHOT_BEGIN
                return self._snap_ack(space, b.log.last_sequence, installed=False)
            if isinstance(msg, SnapshotEnd):
                space.snapshot_builder = None
                await self.offload(b.finish)
                # What of this log the snapshot discards that the primary never had: a deposed
                # primary's divergent tail, replaced wholesale instead of cut by log matching.
                # Counted like a cut, so the failover's measured loss includes it.
                # Recorded as the new log is adopted (`Space.replace_log`), in the same loop
                # turn: a space view taken between the two would show a replica whose log
                # matches its primary's and no cut, and the failover's loss measured as 0.
                begun = space.snapshot_key
                old_history, old_last = list(space.log.history), space.log.last_sequence
                if begun is not None and old_last > 0:
                    fork = fork_point(
                        local=old_history,
                        local_last=old_last,
                        leader=list(begun[2]),
                        leader_last=b.last,
                    )
                    space.discard_on_install = (fork, old_last - fork, begun[0])
                if self.install_snapshot is not None:
                    await self.install_snapshot(space)
                space.note_install_discard()  # if no install adopted a log to record it with
                return self._snap_ack(space, space.log.last_sequence, installed=True)
        except (WalError, OSError) as err:
            log.error("space %s: snapshot failed, starting over: %s", space.id, err)
            # `b` too: SNAPSHOT_END unhooks its builder before finishing it. Abandoning closes
            # its log and deletes a partial snapshot; a complete (marked) one stays for
            # recovery to install.
            dropped, space.snapshot_builder = space.snapshot_builder or b, None
            if dropped is not None:
                with contextlib.suppress(WalError, OSError):
                    await self.offload(dropped.abandon)
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
        """Log matching (design §4): append only after the entry the batch follows.

        The entry at `first_seq - 1` must have `prev_epoch` here too. Entries this log already
        holds are compared by epoch, never assumed equal by sequence: the first that differs
        and everything after it is a divergent tail, cut before the batch's entries go in.
        """
        wal = space.log
        space.primary_last_seq = max(space.primary_last_seq, int(batch.last_seq))
        try:
            space.writer.forget_unwritten_epochs()
        except (WalError, OSError) as err:
            return self._nack(NackReason.INTERNAL, None, str(err)[:200], space=space)
        verdict = matching.check_prev(
            history=wal.history,
            last=wal.last_sequence,
            prev_seq=int(batch.first_seq) - 1,
            prev_epoch=int(batch.prev_epoch),
        )
        if verdict is not None:
            reason = NackReason.GAP if verdict.gap else NackReason.DIVERGED
            return self._nack(
                reason,
                None,
                verdict.why,
                space=space,
                resend_from=verdict.resend_from,
                hint=verdict.epoch_hint,
            )
        skip = 0
        try:
            checked = _checked(batch)
            if batch.first_seq <= wal.last_sequence:
                skip, diverged_at = matching.overlap(
                    history=wal.history,
                    last=wal.last_sequence,
                    first_seq=int(batch.first_seq),
                    epochs=checked.entry_epochs(),
                )
                if diverged_at is not None:
                    self._cut(space, diverged_at - 1, int(batch.epoch))
            data, rest = _skip_entries(batch, checked, skip)
            applied, written = space.apply(data, rest, int(batch.last_seq))
        except (WalError, OSError) as err:
            log.error("space %s: cannot apply batch: %s", space.id, err)
            return self._nack(NackReason.INTERNAL, None, str(err)[:200], space=space)
        if applied:
            self.metrics.entries_applied.labels(space.id).inc(applied)
        if space.writer.waits:
            t = asyncio.create_task(self._ack_when_settled(space, written, writer))
            acks.add(t)
            t.add_done_callback(acks.discard)
            return b""
        return self._ack(space)

    def _cut(self, space: Space, keep_upto: int, epoch: int) -> None:
        dropped = space.cut(keep_upto, epoch)
        self.metrics.truncated_entries.labels(space.id).inc(dropped)
        log.warning(
            "space %s: dropped %d divergent entries after %d to follow %s at epoch %d",
            space.id,
            dropped,
            keep_upto,
            space.assignment.primary.node if space.assignment else "?",
            epoch,
        )

    async def _ack_when_settled(
        self, space: Space, written: Written, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await space.settle(written)
        except WalTruncated:
            return  # cut by a newer batch's log matching meanwhile: that batch acks for itself
        except EngramError as err:
            log.error("space %s: fsync failed; not acking %d: %s", space.id, written.last, err)
            writer.close()
            return
        with contextlib.suppress(PeerClosed):
            send(writer, self._ack(space))

    def _ack(self, space: Space) -> bytes:
        wal = space.log
        return Ack(
            space.wire_id,
            Epoch(space.accepted_epoch),
            Sequence(space.matched_sequence),
            time.time_ns(),
            Sequence(wal.last_sequence),
            Epoch(matching.epoch_at(wal.history, wal.last_sequence)),
        ).encode()

    def _nack(
        self,
        reason: NackReason,
        frame: Frame | None,
        message: str,
        *,
        space: Space | None = None,
        resend_from: int = 0,
        epoch: int = 0,
        hint: int = 0,
    ) -> bytes:
        self.metrics.nacks.labels("out", reason.name).inc()
        sid = space.wire_id if space is not None else (frame.space if frame else bytes(16))
        ep = epoch or (space.accepted_epoch if space else (frame.epoch if frame else 0))
        return Nack(reason, Sequence(resend_from), message, sid, Epoch(ep), Epoch(hint)).encode()


def _checked(batch: Batch) -> CheckedRun:
    """The batch's entries as the frame decoder checked them (`Batch.checked`); a Batch built
    any other way has none, and is checked here instead."""
    if batch.checked is not None:
        return batch.checked
    run = check_run(batch.entries, first_sequence=int(batch.first_seq))
    if isinstance(run, RunProblem):
        raise WalCorruption("batch", run.offset, run.reason)
    return run


def _skip_entries(batch: Batch, checked: CheckedRun, n: int) -> tuple[bytes, CheckedRun | None]:
    """The batch's entries without its first `n` (the part of an overlap we already hold)."""
    if n == 0:
        return batch.entries, checked
    cut, rest = checked.without_first(n)
    return batch.entries[cut:], rest
