"""The operator's Prometheus metrics: its own registry, served by prometheus-client's handler.

Owns the metric names and their meaning (docs/operator.md lists them) and nothing else: the driver
counts, this module only holds the counters. The registry is injected so tests get a fresh one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

from engram_contract.ids import METRICS_PREFIX

# A tick is one lease read, one decision and (rarely) a few API writes and sidecar pushes; the
# buckets span the healthy case (~1 ms) to a handover that waits out its catch-up bound (5 s).
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OperatorMetrics:
    """The operator's metrics, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.promotions = Counter(
            METRICS_PREFIX + "promotions_total",
            "Promotions of a replica to primary (failovers and switchovers) by this operator.",
            ["space"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            METRICS_PREFIX + "reconcile_errors_total",
            "Reconcile ticks that failed (API or sidecar errors); the next tick retries.",
            registry=self.registry,
        )
        self.ticks = Counter(
            METRICS_PREFIX + "operator_ticks_total",
            "Space ticks after node refreshes, by outcome: run; skipped (the space was steady"
            " and nothing it decides on changed); late (it waited for a slot past the node"
            " view's staleness bound, and runs after the next refresh instead), kube/cadence.py.",
            ["outcome"],
            registry=self.registry,
        )
        self.decision_duration = Histogram(
            METRICS_PREFIX + "decision_duration_seconds",
            "Time of one reconcile tick of one space: observe, decide, and execute the actions.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.status_writes = Counter(
            METRICS_PREFIX + "operator_status_writes_total",
            "MemorySpace status patches by this operator, by outcome: written, or conflict (the"
            " object changed since the version the patch carried; read again, decided again).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("written", "conflict"):
            self.status_writes.labels(outcome)
        self.leader = Gauge(
            METRICS_PREFIX + "operator_leader",
            "1 on the operator replica that is active (standalone, or no live peer outranks it"
            " in the KopfPeering object), 0 on a standby.",
            registry=self.registry,
        )
        self.peering_missing = Gauge(
            METRICS_PREFIX + "operator_peering_missing",
            "1 while the KopfPeering object named by --peering is missing: kopf pauses this"
            " operator and nothing is reconciled.",
            registry=self.registry,
        )
        self.watch_behind = Gauge(
            METRICS_PREFIX + "operator_watch_behind_objects",
            "MemorySpaces the last watch audit listed newer than the operator's copy (a stuck"
            " watch when it stays above 0).",
            registry=self.registry,
        )
        self.active_spaces = Gauge(
            METRICS_PREFIX + "operator_active_spaces",
            "Spaces this operator instance reconciles now (0 on a paused peer).",
            registry=self.registry,
        )


async def serve(
    metrics: OperatorMetrics,
    *,
    host: str,
    port: int,
    alive: Callable[[], str | None] = lambda: None,
    ready: Callable[[], str | None] = lambda: None,
) -> web.AppRunner:
    """Serve `GET /metrics`, `/healthz` and `/readyz` on host:port until the returned runner is
    cleaned up. `alive` and `ready` answer None when all is well, else the reason (503)."""
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))

    def probe(check: Callable[[], str | None]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(_: web.Request) -> web.Response:
            why = check()
            if why is not None:
                return web.json_response({"ok": False, "reason": why}, status=503)
            return web.json_response({"ok": True})

        return handle

    app.router.add_get("/healthz", probe(alive))
    app.router.add_get("/readyz", probe(ready))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
