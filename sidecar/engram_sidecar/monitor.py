"""The node's periodic tick (every `lag_monitor_interval`): retention, the per-space gauges, and
each replica's lag and state as its primary sees them, with a log line per state change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from engram_sidecar.config import SidecarConfig
from engram_sidecar.errors import WalError
from engram_sidecar.log import retention
from engram_sidecar.log.offload import prepare_read
from engram_sidecar.metrics import STATE_VALUES, Metrics
from engram_sidecar.replication.peers import PeerPool
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.lag import (
    Lag,
    LagThresholds,
    ReplicaState,
    classify,
    transition_message,
)
from engram_sidecar.space.replicas import ReplicaProgress

log = logging.getLogger(__name__)


def node_thresholds(cfg: SidecarConfig) -> LagThresholds:
    return LagThresholds(
        cfg.lag_warning_seconds, cfg.lag_critical_seconds, cfg.failed_after_seconds
    )


def replica_state(
    sp: Space,
    r: ReplicaProgress,
    *,
    peers: PeerPool,
    cfg: SidecarConfig,
    now: float,
    now_ns: int,
) -> tuple[Lag, ReplicaState]:
    """A replica's lag and state as its primary sees them now: the monitor's tick and every
    view compute it the same way, so a view never shows a state older than its lag."""
    link = peers.get(r.node)
    lag = sp.replica_lag(r, now_ns)
    away = None if r.disconnected_since is None else now - r.disconnected_since
    state = classify(
        lag,
        thresholds=sp.lag_thresholds(node_thresholds(cfg)),
        breaker_open=bool(link and link.breaker.is_open),
        unreachable_for=away,
        catching_up=r.catchup is not None,
    )
    return lag, state


class Monitor:
    def __init__(
        self,
        *,
        cfg: SidecarConfig,
        metrics: Metrics,
        spaces: Callable[[], Iterable[Space]],
        peers: PeerPool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.spaces = spaces
        self.peers = peers
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._prepare_reads()
                self.tick()
            except Exception:
                log.exception("lag monitor tick failed")
            await asyncio.sleep(self.cfg.lag_monitor_interval)

    async def _prepare_reads(self) -> None:
        """A lagging replica's lag by age may read its oldest missing entry from an old segment:
        index that segment off the loop first, so the tick never scans it on the loop."""
        for sp in list(self.spaces()):
            if sp.role != "primary":
                continue
            for r in list(sp.replicas.values()):
                if r.acked < sp.log.last_sequence:
                    await prepare_read(sp.log, r.acked + 1)

    def apply_retention(self, sp: Space) -> None:
        """Delete sealed segments no member needs, within a floor and a ceiling (issue 6)."""
        needed_from = None
        if sp.role == "primary" and sp.replicas:
            needed_from = min(r.acked for r in sp.replicas.values()) + 1
        done = retention.release(
            sp.log,
            needed_from=needed_from,
            min_entries=self.cfg.retention_min_entries,
            max_bytes=self.cfg.retention_max_bytes,
        )
        if done.freed:
            self.metrics.retention_released.labels(sp.id).inc(done.freed)
            if done.forced:
                self.metrics.retention_forced.labels(sp.id).inc()
                log.warning(
                    "space %s: released %d bytes past retention_max_bytes; replicas "
                    "behind sequence %d will need a snapshot",
                    sp.id,
                    done.freed,
                    done.keep_from,
                )

    def tick(self) -> None:
        now = self.clock()
        now_ns = time.time_ns()
        for sp in self.spaces():
            if sp.role == "none":
                continue
            try:
                self.apply_retention(sp)
            except WalError as err:
                log.error("space %s: retention failed: %s", sp.id, err)
            self.metrics.last_sequence.labels(sp.id).set(sp.log.last_sequence)
            self.metrics.wal_bytes.labels(sp.id).set(sp.log.size_bytes)
            if sp.role != "primary":
                continue
            self.metrics.write_lease_valid.labels(sp.id).set(int(sp.lease_valid()))
            limits = sp.lag_thresholds(node_thresholds(self.cfg))
            self.metrics.lag_threshold.labels(sp.id, "warning").set(limits.warning_seconds)
            self.metrics.lag_threshold.labels(sp.id, "critical").set(limits.critical_seconds)
            for r in sp.replicas.values():
                r.lag, new = replica_state(
                    sp, r, peers=self.peers, cfg=self.cfg, now=now, now_ns=now_ns
                )
                remaining = 0
                if r.catchup is not None:
                    remaining = r.catchup.total_entries - r.catchup.done_entries
                self.metrics.catchup_remaining.labels(sp.id, r.node).set(remaining)
                if new != r.state:
                    log.warning(transition_message(sp.id, r.node, r.state, new, r.lag))
                    r.state = new
                self.metrics.lag_entries.labels(sp.id, r.node).set(r.lag.entries)
                self.metrics.lag_seconds.labels(sp.id, r.node).set(r.lag.seconds)
                self.metrics.replica_state.labels(sp.id, r.node).set(STATE_VALUES[new])
