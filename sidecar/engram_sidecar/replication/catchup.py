"""Catch-up decisions: which path a replica takes, and the throttle every catch-up shares.

Pure where it decides (`choose_path`), clock-injected where it measures (`TokenBucket`), so every
rule is testable on virtual time. A replica's progress through a catch-up, shown in status, is
`engram_sidecar.space.replicas.CatchUpProgress`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from engram_sidecar.space.replicas import CatchUpPath


@dataclass(frozen=True, slots=True)
class PathChoice:
    path: CatchUpPath
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
