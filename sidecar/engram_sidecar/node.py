"""The node process: the spaces hosted here, and the services around them.

`Node` is the facade the HTTP API (and the Kubernetes agent) talks to. It opens spaces, applies
assignments (refusing stale epochs) and wires each space to the peer pool, judges control-plane
grants, and hands writes to the space. The work is done by the parts: `space` (one space and its
one write path), `replication` (the receiver, the peer pool), `monitor` (lag, retention) and
`views` (the JSON a space shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from engram_contract.assignment import Assignment
from engram_contract.formats.entry import Record
from engram_contract.ids import NodeName, SpaceId, validate_space_id
from engram_sidecar import views
from engram_sidecar.config import SidecarConfig
from engram_sidecar.grants import MAX_GRANT_DELAY_NS, Grant, GrantClock
from engram_sidecar.log import assignment_store as assignment_file
from engram_sidecar.log import fsync_engine, snapshot
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.offload import Offload, to_thread
from engram_sidecar.log.wal import FsyncPolicy, SpaceLog, WalStore
from engram_sidecar.looplag import LoopLagProbe
from engram_sidecar.metrics import Metrics
from engram_sidecar.monitor import Monitor
from engram_sidecar.replication.catchup import TokenBucket
from engram_sidecar.replication.peers import PeerPool
from engram_sidecar.replication.receiver import Receiver
from engram_sidecar.replication.stream import CHUNK_BYTES
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.membership import NotWritable
from engram_sidecar.tail.service import TailService

log = logging.getLogger(__name__)
# Retired incarnations of spaces: `<data>/RETIRED_DIR/<space>/<incarnation>/`, holding the
# space's files (deletionPolicy Retain) or nothing (Delete). Its presence refuses that
# incarnation for good. Not a valid space id, so never taken for a space's directory.
RETIRED_DIR = ".retired"
# A control plane that stopped heartbeating this long ago will not move our spaces any more.
DRAIN_HANDLER_SILENCE = 10.0


class StaleAssignment(Exception):
    pass


class OtherIncarnation(StaleAssignment):
    """The request is for another incarnation of a space than the one hosted here."""


def incarnation_of(sp: Space) -> str | None:
    """The incarnation (MemorySpace uid) a hosted space belongs to, None when never told."""
    a = sp.assignment
    return a.incarnation if a is not None else None


class Node:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        offload: Offload = to_thread,
    ) -> None:
        self.cfg = cfg
        self.name = NodeName(cfg.node)
        self.clock = clock
        # Where blocking file work goes (snapshot installs, segment scans): never the loop.
        self.offload = offload
        self.metrics = Metrics(registry or CollectorRegistry())
        # Re-read when the file changes (a rotation, docs/operations.md): every new handshake,
        # either way, uses the keys of the moment; connections already up stay up.
        self.secret_keys = cfg.secret_keys()
        self._secret_reloads = 0
        self.store = WalStore(
            cfg.data_dir,
            segment_bytes=cfg.segment_bytes,
            on_torn_tail=lambda s, n: self.metrics.torn_tail_bytes.labels(s).inc(n),
        )
        self.spaces: dict[SpaceId, Space] = {}
        self._by_wire: dict[bytes, Space] = {}
        self.receiver = Receiver(
            cfg=cfg,
            node=self.name,
            secret=self.secret,
            metrics=self.metrics,
            lookup=self._by_wire.get,
            install_snapshot=self.install_snapshot,
            offload=offload,
        )
        # One catch-up budget for the whole node, shared by every catching-up stream.
        bucket = TokenBucket(
            rate=float(cfg.catchup_bytes_per_second),
            burst=float(max(CHUNK_BYTES, cfg.catchup_bytes_per_second // 10)),
            clock=clock,
        )
        self.peers = PeerPool(
            cfg=cfg,
            node=self.name,
            secret=self.secret,
            metrics=self.metrics,
            bucket=bucket,
            clock=clock,
        )
        self.monitor = Monitor(
            cfg=cfg, metrics=self.metrics, spaces=self.spaces.values, peers=self.peers, clock=clock
        )
        self.grant_clock = GrantClock(MAX_GRANT_DELAY_NS)
        self.loop_lag = LoopLagProbe(self.metrics.event_loop_lag.observe)
        # Tail mode (docs/engram.md): ship Engram's own WAL as primary, mirror it as replica.
        self.tail: TailService | None = None
        if cfg.engram_data_root is not None:
            self.tail = TailService(
                root=cfg.engram_data_root,
                spaces=self.spaces.values,
                metrics=self.metrics,
                watch=cfg.engram_watch,  # type: ignore[arg-type]
                poll_interval=cfg.engram_poll_interval,
            )
        self.replication_port = 0
        # Set on SIGTERM (`drain`): the control plane moves the spaces led here elsewhere.
        self.draining = False
        # When a control plane that acts on drains last said so (a heartbeat's handles_drain).
        self._drain_handler_at: float | None = None
        self._installs: set[asyncio.Task[None]] = set()
        self.started_at = time.time()
        # Where fsyncs run: worker threads until `start` picks the configured engine.
        self.fsyncer: fsync_engine.Fsyncer = fsync_engine.ThreadFsyncer()

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        # Before any space opens: their group commits share it (fsync_engine.py).
        self.fsyncer = await fsync_engine.open_engine(self.cfg.fsync_engine, self.cfg.data_dir)
        log.info(
            "node %s: fsyncs run in %s (fsync_engine: %s)",
            self.name,
            "kernel AIO" if self.fsyncer.name == "aio" else "worker threads",
            self.cfg.fsync_engine,
        )
        for sid in self.store.spaces_on_disk():
            saved = assignment_file.load(self.cfg.data_dir / sid / "assignment.json")
            if saved is not None:
                a, accepted = saved
                space = self._space(sid)
                space.membership.accepted_epoch = accepted
                self._adopt(space, a)
                space.resume()
                self.metrics.epoch.labels(sid).set(space.accepted_epoch)
        if self.tail is not None:
            self.tail.start()  # before the node serves: tails open their files first
        self.replication_port = await self.receiver.start(
            self.cfg.replication_host, self.cfg.replication_port
        )
        self.monitor.start()
        self.loop_lag.start()

    async def stop(self) -> None:
        await self.loop_lag.stop()
        await self.monitor.stop()
        if self.tail is not None:
            await self.tail.stop()
        await self.peers.stop()
        await self.receiver.stop()
        if self._installs:  # a snapshot install outlives its cancelled connection: let it end
            await asyncio.wait(self._installs, timeout=10.0)
        for sp in self.spaces.values():
            await sp.writer.stop()
        self.fsyncer.close()
        self.store.close()

    def secret(self) -> bytes:
        """The replication handshake's keys now (engram_contract.tokens.KeyFile)."""
        keys = self.secret_keys.secret()
        if self.secret_keys.reloads != self._secret_reloads:
            self._secret_reloads = self.secret_keys.reloads
            log.info("secret_file changed: new handshakes use its %d key(s)", keys.count(b"\n") + 1)
        return keys

    def note_drain_handler(self) -> None:
        self._drain_handler_at = self.clock()

    def drain_handled(self) -> bool:
        """Did a control plane that moves a draining node's spaces heartbeat us lately? Without
        one (a test harness, a bare node), waiting on SIGTERM would only delay the exit."""
        at = self._drain_handler_at
        return at is not None and self.clock() - at < DRAIN_HANDLER_SILENCE

    def led(self) -> list[SpaceId]:
        """The spaces this node leads now that a replica could take over (fenced ones too: until
        demoted they are still ours). A space without replicas has nowhere to go: a drain does
        not wait for it."""
        return sorted(
            sid
            for sid, sp in self.spaces.items()
            if sp.role == "primary" and sp.assignment is not None and sp.assignment.replicas
        )

    async def drain(
        self,
        timeout: float,
        *,
        announce: Callable[[], Awaitable[object]] | None = None,
        interrupt: asyncio.Event | None = None,
    ) -> bool:
        """Shut down without loss: mark this node draining (its status says so, and `announce`
        tells the control plane at once, e.g. the node Lease), then wait up to `timeout` for
        the control plane to switch every space led here over to a replica (a lag-aware
        handover: fence, the target applies the last entry, promote, demote us). True when
        nothing is led here any more."""
        self.draining = True
        led = self.led()
        if not led or timeout <= 0:
            return not led
        log.warning(
            "node %s: draining: waiting up to %.1f s for the control plane to move %s",
            self.name,
            timeout,
            ", ".join(led),
        )
        if announce is not None:
            try:
                await announce()
            except Exception as err:  # the status still says so, on the next heartbeat
                log.warning("node %s: could not announce the drain: %r", self.name, err)
        deadline = self.clock() + timeout
        interrupt = interrupt or asyncio.Event()
        while self.led() and self.clock() < deadline and not interrupt.is_set():
            # Polled: a demotion arrives as an assignment, on the HTTP API's task.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupt.wait(), 0.05)
        left = self.led()
        if left:
            log.warning(
                "node %s: drain timed out after %.1f s; still leading %s (an unplanned"
                " failover follows)",
                self.name,
                timeout,
                ", ".join(left),
            )
        else:
            log.warning("node %s: drained: every space it led has another primary", self.name)
        return not left

    def readiness(self) -> str | None:
        """None when every hosted space is caught up (`Space.readiness_problem`), else why not."""
        if self.replication_port == 0:
            return "replication listener not up yet"
        if self.draining:
            return "draining: shutting down"
        for sid, sp in sorted(self.spaces.items()):
            why = sp.readiness_problem(self.cfg.ready_max_lag_entries)
            if why is not None:
                return f"space {sid}: {sp.role} {why}"
        return None

    # ---- spaces and assignments -----------------------------------------------------------

    def _commit(self, wal: SpaceLog) -> GroupCommit:
        policy: FsyncPolicy = self.cfg.fsync  # type: ignore[assignment]
        commit = GroupCommit(
            wal, policy=policy, interval=self.cfg.fsync_interval, engine=self.fsyncer
        )
        commit.start()
        return commit

    def _space(self, sid: SpaceId) -> Space:
        sp = self.spaces.get(sid)
        if sp is None:
            snapshot.recover(self.cfg.data_dir / sid)
            wal = self.store.open(sid)
            sp = Space(
                space=sid,
                node=self.name,
                wal=wal,
                commit=self._commit(wal),
                batch_max_entries=self.cfg.batch_max_entries,
                batch_max_delay=self.cfg.batch_max_delay,
                clock=self.clock,
            )
            sp.membership.lease_seconds = self.cfg.write_lease_seconds
            sp.writer.on_storage_change = self._storage_metric(sid)
            sp.on_appended = self.metrics.last_sequence.labels(sid).set
            self.metrics.storage_ok(sid)
            self.spaces[sid] = sp
            self._by_wire[sp.wire_id] = sp
        return sp

    def _storage_metric(self, sid: SpaceId) -> Callable[[str], None]:
        def update(state: str) -> None:
            if state == "ok":
                self.metrics.storage_ok(sid)
            else:
                self.metrics.storage_failed(sid, state)

        return update

    def assign(
        self, space: str, a: Assignment, *, grant: Grant | None = None
    ) -> tuple[bool, Space]:
        """Apply an assignment. Returns (changed, space). Raises StaleAssignment on old epochs.

        `grant`: the control plane pushed it with its send stamp, so it also vouches for the
        primary's write lease. An assignment read back (from the Kubernetes API or from disk)
        carries none and vouches for nothing.
        """
        sid = validate_space_id(space)
        sp = self.spaces.get(sid)
        if a.incarnation is not None and (sp is None or incarnation_of(sp) != a.incarnation):
            if self.retired(sid, a.incarnation):
                raise StaleAssignment(
                    f"incarnation {a.incarnation} of space {sid} was retired on this node"
                )
            if sp is not None and incarnation_of(sp) is not None:
                raise OtherIncarnation(
                    f"space {sid} here is incarnation {incarnation_of(sp)}, not {a.incarnation}"
                    " (retire it first)"
                )
        if sp is not None and a.epoch < sp.accepted_epoch:
            raise StaleAssignment(
                f"assignment epoch {a.epoch} is older than epoch {sp.accepted_epoch} "
                f"already accepted for space {sid}"
            )
        if sp is not None and sp.assignment == a:
            return False, sp
        if (
            sp is not None
            and sp.assignment is not None
            and a.epoch == sp.assignment.epoch
            and a.primary != sp.assignment.primary
        ):
            raise StaleAssignment(
                f"epoch {a.epoch} already names {sp.assignment.primary.node} as primary of "
                f"{sid}; a new primary needs a new epoch"
            )
        sp = self._space(sid)
        self._adopt(sp, a)
        if sp.role == "primary" and grant is not None:
            # The control plane just vouched for this node. An assignment reloaded from disk at
            # start-up does not: a restarted primary waits for a heartbeat.
            self.grant_leases(grant, {sid: a.epoch})
        return True, sp

    async def accept(
        self, space: str, a: Assignment, *, grant: Grant | None = None
    ) -> tuple[bool, Space]:
        """`assign`, after retiring another incarnation of the space held here: a MemorySpace
        re-created under the same name is a new space (another uid), and the old one's object
        is gone, or the control plane could not be assigning the new one. Its files are kept
        (moved aside): deleting data is only ever done on request (`retire`)."""
        sid = validate_space_id(space)
        sp = self.spaces.get(sid)
        old = incarnation_of(sp) if sp is not None else None
        inc = a.incarnation
        if inc is not None and old not in (None, inc) and not self.retired(sid, inc):
            log.warning(
                "space %s: incarnation %s replaces %s; retiring the old one (files kept)",
                sid,
                inc,
                old,
            )
            await self.retire(sid, incarnation=old, delete=False)
        return self.assign(sid, a, grant=grant)

    def _retired_path(self, sid: SpaceId, incarnation: str) -> Path:
        return self.cfg.data_dir / RETIRED_DIR / sid / incarnation

    def retired(self, sid: SpaceId, incarnation: str) -> bool:
        return self._retired_path(sid, incarnation).exists()

    async def retire(self, space: str, *, incarnation: str | None, delete: bool) -> dict[str, Any]:
        """The space's MemorySpace is gone: stop it here for good. Fenced first (no write is
        acknowledged after this begins), its streams and writer stopped, then its directory
        moved to RETIRED_DIR (or deleted with `delete`), which also refuses `incarnation` from
        now on. Idempotent. Raises OtherIncarnation when this node holds another incarnation
        (that one is not being deleted)."""
        sid = validate_space_id(space)
        sp = self.spaces.get(sid)
        held = incarnation_of(sp) if sp is not None else None
        if incarnation is not None and held is not None and held != incarnation:
            raise OtherIncarnation(
                f"space {sid} here is incarnation {held}, not {incarnation}; not retired"
            )
        hosted = sp is not None
        if sp is not None:
            sp.fence("retired: its MemorySpace was deleted")
            for link in self.peers.links.values():
                link.remove(sp)
            del self.spaces[sid]
            self._by_wire.pop(sp.wire_id, None)
            await sp.writer.stop()
            old = sp.assignment
            self.metrics.forget_space(sid, [r.node for r in old.replicas] if old else [])
        self.store.forget(sid)
        source = self.cfg.data_dir / sid
        name = incarnation or held or f"unknown-{time.time_ns()}"
        target = self._retired_path(sid, name)
        kept = False
        if target.exists():
            pass  # retired before (a repeated request): nothing more to do
        elif source.exists() and not delete:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            kept = True
        else:
            if source.exists():
                await asyncio.to_thread(shutil.rmtree, source)
            target.mkdir(parents=True, exist_ok=True)
        if hosted:
            log.warning(
                "space %s: retired (incarnation %s); files %s",
                sid,
                name,
                f"kept in {target}" if kept else "deleted",
            )
        return {"space": sid, "hosted": hosted, "incarnation": name, "kept": kept}

    def _adopt(self, sp: Space, a: Assignment) -> None:
        old = sp.assignment
        sp.apply_assignment(a)
        self.metrics.epoch.labels(sp.id).set(sp.accepted_epoch)
        self.metrics.role.labels(sp.id).set(1 if sp.role == "primary" else 0)
        self.metrics.last_sequence.labels(sp.id).set(sp.log.last_sequence)
        if old is not None:
            for r in old.replicas:
                if sp.role != "primary" or r.node not in sp.replicas:
                    self.metrics.forget_replica(sp.id, r.node)
        if sp.role == "none":
            # No longer a member: keep the files (an operator may want them), drop the series.
            self.metrics.forget_space(sp.id, [r.node for r in old.replicas] if old else [])
        elif sp.role != "primary":
            self.metrics.forget_primary(sp.id)
        sp.ring.on_batch = self.metrics.batch_entries.labels(sp.id).observe
        self.peers.follow(sp, self.spaces.values())

    def grant_leases(self, grant: Grant, epochs: dict[str, int]) -> dict[str, bool]:
        """A control-plane grant: renew the write lease of each space led here at `epoch`.

        A pushed grant runs from its arrival, unless `GrantClock` can tell it arrived late (it
        sat in a queue while this process was stopped or overloaded, and the control plane may
        have acted on our silence since): then it is refused. A grant earned by a request this
        node sent itself (a Lease renewal) runs from that request's send time.
        """
        out = {}
        since = self.clock() if grant.sent_by_us is None else grant.sent_by_us
        late = False
        if grant.sent_by_us is None:
            arrived = int(since * 1e9)
            lateness = self.grant_clock.lateness_ns(grant.source, grant.sent_ns, arrived)
            late = lateness > self.grant_clock.max_delay_ns
            if late:
                self.metrics.late_grants.inc()
                log.warning("refused a write-lease grant that arrived %.2f s late", lateness / 1e9)
        for sid, epoch in epochs.items():
            sp = self.lookup(sid)
            ok = (
                not late
                and sp is not None
                and sp.role == "primary"
                and sp.assignment_epoch() == epoch
                and sp.accepted_epoch == epoch
            )
            if ok and sp is not None:
                sp.membership.grant_lease(since, grant.seconds)
            out[sid] = ok
        return out

    def lookup(self, space: str) -> Space | None:
        try:
            return self.spaces.get(validate_space_id(space))
        except ValueError:
            return None

    # ---- writes ---------------------------------------------------------------------------

    async def write(self, sp: Space, records: Sequence[Record]) -> tuple[int, int, int]:
        """`Space.write` with the ack timeout of this node, timed and counted."""
        if self.tail is not None and self.tail.tails(sp.id):
            raise NotWritable(
                f"space {sp.id} is fed by Engram's WAL on {self.name} (engram_data_root); "
                "write through Engram"
            )
        t0 = time.perf_counter()
        first, last, epoch = await sp.write(records, ack_timeout=self.cfg.ack_timeout)
        self.metrics.entries_written.labels(sp.id).inc(len(records))
        self.metrics.write_latency.labels(sp.id).observe(time.perf_counter() - t0)
        return first, last, epoch

    async def install_snapshot(self, sp: Space) -> None:
        """Swap a finished snapshot in for `sp`'s log and reopen it (replica side).

        The file work runs in a worker thread (`offload`), in the order `snapshot.install`
        makes crash-safe: the old log's owed fsyncs and fd closes, the swap (renames and
        fsyncs), deleting the old log, then opening the new one (its recovery scan and fsyncs).
        The loop only closes the old log as it sees it first and adopts the new one after, so
        nothing reads or writes a log whose files are being replaced. Runs to the end even if
        the connection that asked is cancelled: a half-done swap would leave the space with
        no log until a restart.
        """
        task = asyncio.get_running_loop().create_task(self._install(sp))
        self._installs.add(task)
        task.add_done_callback(self._installs.discard)
        await asyncio.shield(task)

    async def _install(self, sp: Space) -> None:
        sp.installing_snapshot = True
        try:
            old_commit = sp.writer.commit
            await old_commit.stop()  # no interval fsync of the old log from here on
            finish_old = self.store.detach(sp.id)
            path, sid = sp.path, sp.id

            def swap() -> SpaceLog:
                finish_old()
                snapshot.install(path)
                return self.store.build(sid)

            wal = await self.offload(swap)
            self.store.adopt(wal)
            sp.replace_log(wal, self._commit(wal))
            log.info(
                "space %s: installed a snapshot; log now %d..%d",
                sp.id,
                wal.first_sequence,
                wal.last_sequence,
            )
        finally:
            sp.installing_snapshot = False

    # ---- views ----------------------------------------------------------------------------

    def space_view(self, sp: Space) -> dict[str, Any]:
        view = views.space_view(sp, self.peers, self.cfg)
        if self.tail is not None:
            view["engram"] = self.tail.view(sp.id)
        return view

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "pid": os.getpid(),
            "replication_address": self.cfg.address,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "draining": self.draining,
            "fsync_engine": self.fsyncer.name,
            "spaces": {sid: self.space_view(sp) for sid, sp in sorted(self.spaces.items())},
        }
