"""What a primary knows of each replica of a space: how far it acknowledged, when it was last
heard from, its lag and state, and its progress through a catch-up (for status and metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from engram_contract.ids import NodeName
from engram_sidecar.space.lag import Lag, ReplicaState

CatchUpPath = Literal["incremental", "snapshot"]


@dataclass
class CatchUpProgress:
    """One replica's catch-up, for status, metrics and the CaughtUp record."""

    path: CatchUpPath
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
class ReplicaProgress:
    node: NodeName
    acked: int = 0  # highest sequence the replica reported durable
    last_contact: float | None = None  # monotonic time of its last ACK
    disconnected_since: float | None = None
    state: ReplicaState = "Healthy"
    lag: Lag = field(default_factory=lambda: Lag(0, 0.0))
    catchup: CatchUpProgress | None = None  # set while the replica catches up
