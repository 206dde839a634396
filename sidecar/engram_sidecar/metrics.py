"""Every Prometheus metric the sidecar exports, on an injected registry.

Label cardinality is bounded by what a node hosts: `space` takes only ids of spaces assigned to
this node, `replica` and `peer` only node names from those assignments, `direction` two values.
When a space leaves the node its series are removed (`forget_space`), so a long-lived sidecar does
not accumulate dead series. docs/metrics.md describes each one.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

P = "engram_replication_"

# Write latency spans a page-cache write (~50 µs) to a quorum round trip under load (~100 ms).
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)
# Loop lag: a timer's resolution (~0.1 ms) to a stall long enough to lapse a write lease (1.5 s).
_LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

WRITE_ERROR_REASONS = ("not_primary", "unavailable", "not_acknowledged", "wal")
STORAGE_ERROR_KINDS = ("DiskFull", "StorageError")  # errors.StorageKind
LAG_SEVERITIES = ("warning", "critical")  # lag_threshold_seconds' severity label
STATE_VALUES = {"Healthy": 3, "CatchingUp": 2, "Lagging": 2, "Degraded": 1, "Failed": 0}


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.lag_entries = Gauge(
            P + "lag_entries",
            "Entries the replica lacks (primary last sequence - replica acked sequence).",
            ["space", "replica"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            P + "lag_seconds",
            "Age of the oldest entry the replica lacks; 0 when caught up.",
            ["space", "replica"],
            registry=r,
        )
        # Exported next to lag_seconds (by the primary), so an alert can compare each space's lag
        # with its own thresholds: `lag > on(namespace, space) group_left threshold`.
        self.lag_threshold = Gauge(
            P + "lag_threshold_seconds",
            "The space's lag thresholds in seconds (spec.lag, else the node's lag_*_seconds), "
            "by severity: warning (Lagging) and critical (Degraded). Exported by its primary.",
            ["space", "severity"],
            registry=r,
        )
        self.replica_state = Gauge(
            P + "replica_state",
            "Replica state: 3 healthy, 2 lagging or catching up, 1 degraded, 0 failed.",
            ["space", "replica"],
            registry=r,
        )
        self.entries_shipped = Counter(
            P + "entries_shipped",
            "Entries sent to replicas (resends included).",
            ["space", "replica"],
            registry=r,
        )
        self.batches_sent = Counter(
            P + "batches_sent", "BATCH frames sent to replicas.", ["space", "replica"], registry=r
        )
        self.batch_entries = Histogram(
            P + "batch_entries",
            "Entries per batch as encoded by the primary.",
            ["space"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            P + "bytes",
            "Replication bytes on the wire, frame headers included.",
            ["direction"],
            registry=r,
        )
        self.event_loop_lag = Histogram(
            P + "event_loop_lag_seconds",
            "How much later than asked the event loop ran a timer, sampled every 0.1 s: the "
            "delay every request and lease renewal waiting on the loop saw.",
            buckets=_LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.write_latency = Histogram(
            P + "write_latency_seconds",
            "Time from a write request's arrival to its acknowledgement (ack policy met).",
            ["space"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.checksum_failures = Counter(
            P + "checksum_failures",
            "Frames or entries whose CRC32C did not match.",
            ["peer"],
            registry=r,
        )
        self.circuit_open = Gauge(
            P + "circuit_open",
            "1 while the circuit breaker to a peer is open.",
            ["peer"],
            registry=r,
        )
        self.epoch = Gauge(
            P + "epoch",
            "Highest epoch this node has accepted for the space.",
            ["space"],
            registry=r,
        )
        self.last_sequence = Gauge(
            P + "last_sequence",
            "Last sequence in this node's WAL for the space.",
            ["space"],
            registry=r,
        )
        self.role = Gauge(
            P + "role",
            "1 when this node is the space's primary, 0 when a replica.",
            ["space"],
            registry=r,
        )
        self.entries_written = Counter(
            P + "entries_written",
            "Entries accepted by write requests on this primary.",
            ["space"],
            registry=r,
        )
        self.entries_applied = Counter(
            P + "entries_applied",
            "Entries appended from received batches on this replica.",
            ["space"],
            registry=r,
        )
        self.write_errors = Counter(
            P + "write_errors",
            "Write requests refused, by reason.",
            ["space", "reason"],
            registry=r,
        )
        self.nacks = Counter(
            P + "nacks",
            "NACK frames sent or received, by reason.",
            ["direction", "reason"],
            registry=r,
        )
        self.connections = Counter(
            P + "connections",
            "Peer connections opened, by outcome.",
            ["peer", "outcome"],
            registry=r,
        )
        self.auth_failures = Counter(
            P + "auth_failures", "Handshakes refused for a bad or missing proof.", registry=r
        )
        self.torn_tail_bytes = Counter(
            P + "torn_tail_bytes",
            "Bytes cut from torn WAL tails at recovery.",
            ["space"],
            registry=r,
        )
        self.truncated_entries = Counter(
            P + "truncated_entries",
            "Entries dropped when a deposed primary cut its log to the fork point.",
            ["space"],
            registry=r,
        )
        self.wal_bytes = Gauge(
            P + "wal_bytes", "Bytes of WAL retained on disk for the space.", ["space"], registry=r
        )
        self.write_lease_valid = Gauge(
            P + "write_lease_valid",
            "1 while this primary holds its write lease for the space.",
            ["space"],
            registry=r,
        )
        self.late_grants = Counter(
            P + "late_grants",
            "Write-lease grants refused because they arrived late (this node was stopped or "
            "overloaded while they waited).",
            registry=r,
        )
        self.add_catchup_metrics()
        self.add_storage_metrics()
        self.add_tail_metrics()
        self.add_admission_metrics()

    def forget_space(self, space: str, replicas: list[str]) -> None:
        for g in (
            self.epoch,
            self.last_sequence,
            self.role,
            self.wal_bytes,
            self.write_lease_valid,
            self.batch_entries,
            self.write_latency,
            self.entries_written,
            self.entries_applied,
            self.torn_tail_bytes,
            self.truncated_entries,
            self.retention_released,
            self.retention_forced,
        ):
            _remove(g, space)
        for reason in WRITE_ERROR_REASONS:
            _remove(self.write_errors, space, reason)
        self.forget_primary(space)
        for rep in replicas:
            self.forget_replica(space, rep)

    def add_catchup_metrics(self) -> None:
        r, P = self.registry, "engram_replication_"
        self.catchups = Counter(
            P + "catchups",
            "Catch-ups begun, by path (snapshot or incremental).",
            ["space", "path"],
            registry=r,
        )
        self.catchup_bytes = Counter(
            P + "catchup_bytes",
            "Snapshot bytes sent to a catching-up replica.",
            ["space", "replica"],
            registry=r,
        )
        self.catchup_remaining = Gauge(
            P + "catchup_remaining_entries",
            "Entries a catching-up replica still needs; 0 when not catching up.",
            ["space", "replica"],
            registry=r,
        )
        self.retention_released = Counter(
            P + "retention_released_bytes", "WAL bytes deleted by retention.", ["space"], registry=r
        )
        self.retention_forced = Counter(
            P + "retention_forced_releases",
            "Releases past retention_max_bytes of segments a replica still needed "
            "(it will need a snapshot).",
            ["space"],
            registry=r,
        )

    def forget_primary(self, space: str) -> None:
        """Series only a space's primary exports; dropped when this node stops leading it."""
        _remove(self.write_lease_valid, space)
        for severity in LAG_SEVERITIES:
            _remove(self.lag_threshold, space, severity)

    def forget_peer(self, peer: str) -> None:
        _remove(self.circuit_open, peer)

    def forget_replica(self, space: str, replica: str) -> None:
        for m in (
            self.lag_entries,
            self.lag_seconds,
            self.replica_state,
            self.entries_shipped,
            self.batches_sent,
            self.catchup_bytes,
            self.catchup_remaining,
        ):
            _remove(m, space, replica)

    def add_storage_metrics(self) -> None:
        r, P = self.registry, "engram_replication_"
        self.storage_errors = Counter(
            P + "storage_errors",
            "Failed disk operations (write, fsync, create, rename) on the space's files, by "
            "kind: DiskFull (ENOSPC, EDQUOT) or StorageError (anything else).",
            ["space", "kind"],
            registry=r,
        )
        self.storage_healthy = Gauge(
            P + "storage_healthy",
            "1 while the space's last disk operation succeeded, 0 after a storage error.",
            ["space"],
            registry=r,
        )

    def storage_failed(self, space: str, kind: str) -> None:
        """A StorageError for `space` (kind: StorageError.kind)."""
        self.storage_errors.labels(space, kind).inc()
        self.storage_healthy.labels(space).set(0)

    def storage_ok(self, space: str) -> None:
        self.storage_healthy.labels(space).set(1)

    def forget_storage(self, space: str) -> None:
        _remove(self.storage_healthy, space)
        for kind in STORAGE_ERROR_KINDS:
            _remove(self.storage_errors, space, kind)

    def add_tail_metrics(self) -> None:
        """Tail mode: shipping Engram's own WAL, and the replica's Engram-format mirror
        (engram_sidecar.tail, docs/engram.md)."""
        r, P = self.registry, "engram_replication_"
        self.tail_entries = Counter(
            P + "engram_tail_entries",
            "Entries read from Engram's WAL files and appended to the space's log.",
            ["space"],
            registry=r,
        )
        self.tail_delay = Histogram(
            P + "engram_tail_delay_seconds",
            "From an entry's Engram timestamp to its durable append here (last entry of each "
            "append).",
            ["space"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tail_errors = Counter(
            P + "engram_tail_errors",
            "Errors that stopped the tail of a space's Engram WAL, by kind: corrupt (a bad "
            "entry) or cursor (the stored position can't be trusted).",
            ["space", "kind"],
            registry=r,
        )
        self.tail_stopped = Gauge(
            P + "engram_tail_stopped",
            "1 while the tail of the space's Engram WAL is stopped by an error, else 0.",
            ["space"],
            registry=r,
        )
        self.tail_torn_bytes = Counter(
            P + "engram_tail_torn_bytes",
            "Bytes of torn entries left behind at the end of Engram files whose writer is gone.",
            ["space"],
            registry=r,
        )
        self.tail_compactions = Counter(
            P + "engram_tail_compactions",
            "Engram files recognised as compaction output and not shipped again.",
            ["space"],
            registry=r,
        )
        self.mirror_entries = Counter(
            P + "engram_mirror_entries",
            "Entries a replica wrote to Engram-format WAL files under engram_data_root.",
            ["space"],
            registry=r,
        )

    def add_admission_metrics(self) -> None:
        """The replication listener's connection caps (engram_sidecar.replication.admission)."""
        r, P = self.registry, "engram_replication_"
        self.connections_refused = Counter(
            P + "connections_refused",
            "Incoming replication connections closed at accept because a cap was reached, by "
            "reason: max_connections or max_handshakes_per_source.",
            ["reason"],
            registry=r,
        )
        for reason in ("max_connections", "max_handshakes_per_source"):
            self.connections_refused.labels(reason)  # exported as 0 before the first refusal
        self.peer_connections = Gauge(
            P + "peer_connections",
            "Incoming replication connections open, by state: handshake or authenticated.",
            ["state"],
            registry=r,
        )
        for state in ("handshake", "authenticated"):
            self.peer_connections.labels(state).set(0)


def _remove(metric: Gauge | Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
