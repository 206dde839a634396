"""Replica lag and state: pure functions over numbers, so every rule is testable on virtual time
(and `timestamp_of`, the one fact of the log a lag needs, kept in memory for recent entries).

Lag has two explicit units (engram-facts.md §5.4 mixes them): `entries` = primary last sequence
minus the replica's acked sequence, and `seconds` = the age of the oldest entry the replica lacks,
0 when caught up. An idle, caught-up space therefore reads 0, not "time since last commit".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engram_sidecar.log.wal import SpaceLog

ReplicaState = Literal["Healthy", "Lagging", "Degraded", "Failed", "CatchingUp"]


@dataclass(frozen=True, slots=True)
class LagThresholds:
    warning_seconds: float = 1.0  # Healthy -> Lagging
    critical_seconds: float = 5.0  # Lagging -> Degraded
    failed_after_seconds: float = 30.0  # unreachable this long -> Failed


@dataclass(frozen=True, slots=True)
class Lag:
    entries: int
    seconds: float


def compute_lag(
    *, primary_last: int, replica_acked: int, oldest_missing_ts_ns: int | None, now_ns: int
) -> Lag:
    """Lag of one replica. `oldest_missing_ts_ns` is the timestamp of entry replica_acked + 1."""
    entries = max(0, primary_last - replica_acked)
    if entries == 0 or oldest_missing_ts_ns is None:
        return Lag(entries, 0.0)
    return Lag(entries, max(0.0, (now_ns - oldest_missing_ts_ns) / 1e9))


def timestamp_of(log: SpaceLog, sequence: int) -> int | None:
    """When the entry at `sequence` was written, or None if the log lacks it: from what the log
    keeps in memory for its recent appends, read from disk only for older entries."""
    return log.timestamp_of(sequence)


def classify(
    lag: Lag,
    *,
    thresholds: LagThresholds,
    breaker_open: bool,
    unreachable_for: float | None,
    catching_up: bool = False,
) -> ReplicaState:
    """The state a replica is in now. `unreachable_for` is None while connected.

    The breaker counts only while the replica is disconnected: a replica that is connected and
    caught up is Healthy even if the breaker has not recorded the success yet (issue 15: the
    demo showed a caught-up replica Degraded until some later success).
    """
    disconnected = unreachable_for is not None
    if unreachable_for is not None and unreachable_for >= thresholds.failed_after_seconds:
        return "Failed"
    if (disconnected and breaker_open) or lag.seconds > thresholds.critical_seconds:
        return "Degraded"
    if catching_up:
        return "CatchingUp"
    if lag.seconds > thresholds.warning_seconds:
        return "Lagging"
    return "Healthy"


def transition_message(
    space: str, replica: str, old: ReplicaState, new: ReplicaState, lag: Lag
) -> str:
    return (
        f"space {space}: replica {replica} {old} -> {new} "
        f"(lag {lag.entries} entries, {lag.seconds:.2f} s)"
    )
