"""Catch-up decisions and bookkeeping: which path a replica takes, its progress, and the throttle.

Pure where it decides (`choose_path`), clock-injected where it measures (`Progress`,
`TokenBucket`), so every rule is testable on virtual time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Path = Literal["incremental", "snapshot"]


@dataclass(frozen=True, slots=True)
class PathChoice:
    path: Path
    reason: str


def choose_path(
    *, replica_next: int, primary_first: int, primary_last: int, threshold: int
) -> PathChoice:
    """How a replica that next needs `replica_next` gets back to the primary's `primary_last`.

    Incremental when the gap is at most `threshold` entries and the primary still retains every
    entry the replica lacks; a snapshot otherwise (a replica far behind would replay more than
    a copy of the log costs, and entries already released can only come from a snapshot).
    """
    gap = max(0, primary_last - replica_next + 1)
    if replica_next < primary_first and gap > 0:
        return PathChoice(
            "snapshot",
            f"needs sequence {replica_next}, but the primary keeps only {primary_first} onwards",
        )
    if gap > threshold:
        return PathChoice("snapshot", f"{gap} entries behind, over catchupThreshold {threshold}")
    return PathChoice("incremental", f"{gap} entries behind, within catchupThreshold {threshold}")


@dataclass
class Progress:
    """One replica's catch-up, for status, metrics and the CaughtUp record."""

    path: Path
    reason: str
    start_sequence: int  # the replica's position when catch-up began
    target: int  # the primary's last sequence when catch-up began
    total_bytes: int = 0
    done_bytes: int = 0
    done_sequence: int = 0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        self.done_sequence = self.start_sequence

    @property
    def total_entries(self) -> int:
        return max(0, self.target - self.start_sequence)

    @property
    def done_entries(self) -> int:
        return max(0, min(self.done_sequence, self.target) - self.start_sequence)

    def rate(self) -> float:
        """Entries per second so far."""
        elapsed = self.clock() - self.started_at
        return self.done_entries / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        r = self.rate()
        left = self.total_entries - self.done_entries
        return None if r <= 0 else left / r

    def view(self) -> dict[str, object]:
        eta = self.eta_seconds()
        return {
            "phase": self.path,
            "reason": self.reason,
            "entries_done": self.done_entries,
            "entries_total": self.total_entries,
            "bytes_done": self.done_bytes,
            "bytes_total": self.total_bytes,
            "rate_entries_per_second": round(self.rate(), 1),
            "eta_seconds": None if eta is None else round(eta, 1),
        }


@dataclass
class TokenBucket:
    """A bytes-per-second cap shared by every catch-up stream of a node.

    Streams take tokens before sending a chunk and skip the round when there are too few, so
    catch-up never delays live batches on the same connection, and several catching-up replicas
    share the cap in turn.
    """

    rate: float  # bytes per second
    burst: float  # bytes
    clock: Callable[[], float] = time.monotonic
    tokens: float = 0.0
    updated: float = -1.0

    def _refill(self) -> None:
        now = self.clock()
        if self.updated < 0:
            self.tokens, self.updated = self.burst, now
            return
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, n: int) -> bool:
        self._refill()
        # A chunk larger than the burst may go once the bucket is full, or it would never go.
        need = min(float(n), self.burst)
        if self.tokens < need:
            return False
        self.tokens -= n
        return True

    def wait_time(self, n: int) -> float:
        self._refill()
        need = min(float(n), self.burst) - self.tokens
        return 0.0 if need <= 0 else need / self.rate
